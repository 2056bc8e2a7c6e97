"""The look of each synthetic world: its background and its object types."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from umedpt.data.synthetic.labels import NUM_OBJECT_TYPES
from umedpt.data.synthetic.primitives import (
    _BEZIER,
    _ELONGATED,
    _LOBULATED,
    _ROUND,
    _SPICULATED,
    _blur,
    _canvas,
    _dermoscope_field,
    _dots,
    _ellipse,
    _noise,
    _outlines,
    _ramp,
    _resize,
    _ridges,
    _u,
    _xy,
)

_LOW = 64  # side of the low-resolution smooth fields (lesion, stain, haze) before upsampling
_MAX_OBJECTS = 10
_EMPTY_PROBABILITY = 0.06
_SCALES = (0.028, 0.05, 0.088)  # base object radius (fraction of the image side) per size class
_PLACEMENT_TRIES = 8

# ----------------------------------------------------------------------------------------------
# backgrounds: each returns one float32 (H, W) plane per channel and the ellipses (cx, cy, rx, ry)
# in which objects are placed, all in fractions of the image side

Regions = list[tuple[float, float, float, float]]


@functools.lru_cache(maxsize=4)
def _ribs(side: int) -> np.ndarray:
    """Blurred posterior ribs and clavicles of a chest radiograph on a ``side`` x ``side`` canvas."""
    ribs = np.zeros((side, side), np.float32)
    for direction, arc in ((1, (270.0, 350.0)), (-1, (190.0, 270.0))):
        for k in range(9):
            _ellipse(ribs, 0.5 + direction * 0.03, 0.32 + 0.07 * k, 0.42, 0.2, 1.0, arc=arc, thickness=0.035)
    _ellipse(ribs, 0.5, 0.3, 0.3, 0.17, 1.0, arc=(195.0, 345.0), thickness=0.03)  # clavicles
    return _blur(ribs, 0.011)


def _bg_radiograph(rng: np.random.Generator, size: int, grade: int) -> tuple[list[np.ndarray], Regions]:
    c = _canvas(size, 0.06)
    _ellipse(c, 0.5, 0.66, _u(rng, 0.46, 0.52), 0.62, 0.5)  # trunk
    _ellipse(c, 0.5, 0.0, 0.12, 0.2, 0.5)  # neck
    _ellipse(c, 0.5, 0.5, 0.045, 0.7, 0.6)  # spine and mediastinum
    lungs = np.zeros_like(c)
    regions: Regions = []
    cy, ry = _u(rng, 0.46, 0.5), _u(rng, 0.3, 0.34)
    for side in (-1, 1):
        cx, rx = 0.5 + side * _u(rng, 0.19, 0.22), _u(rng, 0.14, 0.17)
        _ellipse(lungs, cx, cy, rx, ry, 1.0, angle=side * _u(rng, 2, 8))
        regions.append((cx, cy - 0.02, 0.8 * rx, 0.8 * ry))
    _ellipse(lungs, _u(rng, 0.54, 0.58), cy + 0.24, 0.15, 0.14, 0.0)  # heart shadow
    lungs = _blur(lungs, 0.02)
    c *= 1.0 - 0.68 * lungs
    c += _ribs(c.shape[0]) * (0.05 + 0.07 * lungs)
    plane = _resize(_blur(c, 0.01), size)
    reticular = (0.0, 0.16, 0.34)[grade] * _u(rng, 0.85, 1.15)
    haze = (0.0, 0.06, 0.15)[grade] * _u(rng, 0.85, 1.15)
    pattern = _ridges(_noise(rng, 22, size), 3.0)
    pattern *= reticular
    pattern += haze * np.maximum(_noise(rng, 5, size), 0.0)
    pattern *= _resize(lungs, size)
    plane += pattern
    return [plane], regions


def _bg_ct(rng: np.random.Generator, size: int, grade: int) -> tuple[list[np.ndarray], Regions]:
    c = _canvas(size, 0.03)
    bx, by = 0.5 + _u(rng, -0.02, 0.02), 0.5 + _u(rng, -0.02, 0.02)
    brx, bry = _u(rng, 0.4, 0.46), _u(rng, 0.3, 0.35)
    _ellipse(c, 0.5, by + bry + 0.42, 0.7, 0.4, 0.4, arc=(240.0, 300.0), thickness=0.015)  # table
    _ellipse(c, bx, by, brx, bry, 0.3)  # subcutaneous fat
    _ellipse(c, bx, by, brx - 0.03, bry - 0.03, 0.47)  # abdominal wall muscle
    _ellipse(c, bx, by, brx - 0.055, bry - 0.055, 0.36)  # visceral fat
    _ellipse(c, bx - 0.15, by - 0.06, 0.17, 0.15, 0.57, angle=_u(rng, -20, 20))  # liver
    _ellipse(c, bx + 0.22, by - 0.06, 0.055, 0.1, 0.54, angle=30.0)  # spleen
    for _ in range(4):  # bowel loops with gas
        gx, gy = bx + _u(rng, -0.05, 0.2), by + _u(rng, -0.2, 0.02)
        _ellipse(c, gx, gy, 0.05, 0.04, 0.44, angle=_u(rng, 0, 180))
        _ellipse(c, gx, gy, 0.02, 0.015, 0.06)
    for side in (-1, 1):
        _ellipse(c, bx + side * 0.13, by + 0.1, 0.045, 0.07, 0.62, angle=side * 20.0)  # kidneys
        _ellipse(c, bx + side * 0.1, by + 0.25, 0.08, 0.06, 0.5)  # paraspinal muscles
    _ellipse(c, bx + 0.03, by + 0.08, 0.028, 0.028, 0.72)  # aorta
    _ellipse(c, bx, by + 0.17, 0.06, 0.05, 0.92)  # vertebral body
    _ellipse(c, bx, by + 0.17, 0.042, 0.034, 0.74)
    _ellipse(c, bx, by + 0.27, 0.015, 0.06, 0.88)  # spinous process
    body = np.zeros_like(c)
    _ellipse(body, bx, by, brx - 0.03, bry - 0.03, 1.0)
    plane = _resize(_blur(c, 0.008), size)
    mottle = _noise(rng, 20, size)
    mottle *= _resize(body, size)
    mottle *= (0.0, 0.11, 0.22)[grade] * _u(rng, 0.85, 1.15)
    plane += mottle
    return [plane], [(bx, by, brx - 0.12, bry - 0.1)]


def _bg_fluorescence(rng: np.random.Generator, size: int, grade: int) -> tuple[list[np.ndarray], Regions]:
    base, tint = (0.01 + 0.03 * rng.random(3)).tolist(), (0.06 * rng.random(3)).tolist()
    haze = np.maximum(_noise(rng, 4, min(size, _LOW)), 0.0)  # out-of-focus glow
    level = _u(rng, 0.3, 0.45)
    debris = _dots(rng, (8, 40, 130)[grade], 2.0, size)
    planes = []
    for c, colour in enumerate((0.9 * level, level, 0.8 * level)):
        plane = _resize(haze * tint[c] + base[c], size)
        plane += debris * colour
        planes.append(plane)
    return planes, [(0.5, 0.5, 0.62, 0.62)]


def _bg_histology(rng: np.random.Generator, size: int, grade: int) -> tuple[list[np.ndarray], Regions]:
    base = (np.array([0.92, 0.7, 0.82]) + 0.08 * rng.random(3) - 0.04).tolist()
    low = min(size, _LOW)
    stain = _noise(rng, 5, low)  # smooth variation of the eosin stain and white tissue spaces
    spaces = np.clip(stain - 0.9, 0.0, 0.4)
    spaces *= 2.0
    fibres = _ridges(_noise(rng, (5, 40) if rng.random() < 0.5 else (40, 5), size), 3.0)
    fibres *= _resize(1.0 - spaces, size)
    nuclei = _dots(rng, (20, 90, 260)[grade], 3.0, size)
    # the stroma is lighter in proportion to the nuclei's coverage, so the mean intensity does not
    # give the grade away: only the density of nuclei does
    coverage = float(nuclei.mean())
    planes = []
    for c, (fibre, white, purple) in enumerate(
        ((-0.03, 0.97, 0.33), (-0.08, 0.94, 0.17), (-0.04, 0.96, 0.5))
    ):
        smooth = stain * (-0.5 * abs(fibre)) + base[c]
        smooth += spaces * (white - smooth)
        plane = _resize(smooth, size)
        plane += fibres * fibre
        plane += coverage * (plane - purple)
        plane += nuclei * (purple - plane)
        planes.append(plane)
    return planes, [(0.5, 0.5, 0.62, 0.62)]


def _bg_dermoscopy(rng: np.random.Generator, size: int, grade: int) -> tuple[list[np.ndarray], Regions]:
    skin = (np.array([0.88, 0.68, 0.58]) + 0.1 * rng.random(3) - 0.05).tolist()
    brown = (np.array([0.58, 0.38, 0.28]) + 0.1 * rng.random(3) - 0.05).tolist()
    cx, cy, radius = 0.5 + _u(rng, -0.05, 0.05), 0.5 + _u(rng, -0.05, 0.05), _u(rng, 0.27, 0.36)
    low = min(size, _LOW)
    lesion = np.zeros((_LOW, _LOW), np.float32)
    outline = _outlines(rng, np.array([_LOBULATED]))[0] * radius + complex(cx, cy)
    cv2.fillPoly(lesion, [np.round(_xy(outline) * _LOW * 16).astype(np.int32)], 1.0, cv2.LINE_8, 4)
    m = _resize(_blur(lesion, 0.03), low)
    shade = _noise(rng, 3, low)
    shade *= 0.03
    shade -= 0.1 * m * m  # darker centre
    network = (0.02, 0.26, 0.5)[grade] * _u(rng, 0.85, 1.15)
    net = _ridges(_noise(rng, 30, size), 4.0)
    net *= _resize(m, size)
    angle = 2 * math.pi * rng.random()
    # grades 1 and 2: colour variegation, a blue-grey tint over one side of the lesion
    if grade:
        ramp = _ramp(low)
        side = np.clip(math.cos(angle) * ramp + math.sin(angle) * ramp.T, 0.0, 1.0)
        side *= m * (0.0, 0.26, 0.52)[grade]
    planes = []
    for c, (tint, weight) in enumerate(((-0.9, 0.8), (-0.2, 0.9), (0.5, 1.0))):
        smooth = m * (brown[c] - skin[c]) + skin[c]
        smooth += shade
        if grade:
            smooth += side * tint
        plane = _resize(smooth, size)
        plane -= net * (network * weight)
        planes.append(plane)
    hairs = int(4 * rng.random())
    if hairs:  # quadratic Bezier curves, anti-aliased
        curves = _BEZIER @ (1.2 * rng.random((hairs, 3, 2)) - 0.1)
        strands = np.zeros((size, size), np.uint8)
        cv2.polylines(
            strands, list(np.round(curves * size * 16).astype(np.int32)), False, 255, 1, cv2.LINE_AA, 4
        )
        layer = strands.astype(np.float32) * np.float32(1.0 / 255.0)
        visible = (1.0 - layer) * _dermoscope_field(size)
        for plane, hair in zip(planes, (0.22, 0.16, 0.13), strict=True):
            plane *= visible
            plane += hair * layer
    else:
        for plane in planes:
            plane *= _dermoscope_field(size)
    return planes, [(cx, cy, 0.85 * radius, 0.85 * radius)]


# ----------------------------------------------------------------------------------------------
# objects


@dataclass(frozen=True)
class _Look:
    """Appearance of one object type: outline, size, colours, radial profile and texture."""

    shape: int  # _ROUND | _ELONGATED | _LOBULATED | _SPICULATED
    radius: float  # multiplier of the scene's base radius
    core: tuple[float, ...]  # colour inside (added to the background for relative styles)
    edge: tuple[float, ...]  # colour at the border
    profile: str  # "flat" (core only) | "dome" (edge -> core towards the centre) | "ring" (edge rim)
    texture: float  # amplitude of the fine texture inside the object


@dataclass(frozen=True)
class _Style:
    channels: int
    relative: bool  # objects add to the background (x-ray opacities) instead of replacing it
    looks: tuple[_Look, ...]
    background: Callable[[np.random.Generator, int, int], tuple[list[np.ndarray], Regions]]
    noise: tuple[float, float]  # range of the pixel noise standard deviation
    gain: tuple[float, float]  # range of the global exposure / white-balance gain
    offset: float  # largest global exposure offset

    @functools.cached_property
    def radii(self) -> np.ndarray:
        return np.array([look.radius for look in self.looks])

    @functools.cached_property
    def shapes(self) -> np.ndarray:
        return np.array([look.shape for look in self.looks])

    @functools.cached_property
    def colours(self) -> tuple[np.ndarray, np.ndarray]:
        """Core and edge colours of all object types, (K, channels) each."""
        return np.array([look.core for look in self.looks]), np.array([look.edge for look in self.looks])


_STYLES: dict[str, _Style] = {
    "radiograph": _Style(
        1,
        True,
        (
            _Look(_ROUND, 0.8, (0.5,), (0.15,), "dome", 0.01),
            _Look(_LOBULATED, 1.7, (0.36,), (0.18,), "dome", 0.1),
            _Look(_ROUND, 1.2, (-0.06,), (0.42,), "ring", 0.01),
            _Look(_ELONGATED, 2.1, (0.3,), (0.22,), "flat", 0.03),
        ),
        _bg_radiograph,
        (0.008, 0.018),
        (0.85, 1.15),
        0.06,
    ),
    "ct": _Style(
        1,
        False,
        (
            _Look(_ROUND, 1.06, (0.2,), (0.22,), "flat", 0.0),
            _Look(_ROUND, 1.11, (0.33,), (0.86,), "ring", 0.02),
            _Look(_LOBULATED, 0.95, (1.0,), (0.9,), "flat", 0.03),
            _Look(_SPICULATED, 1.46, (0.34,), (0.42,), "dome", 0.09),
        ),
        _bg_ct,
        (0.012, 0.025),
        (0.88, 1.12),
        0.05,
    ),
    "fluorescence": _Style(
        3,
        False,
        (
            _Look(_ROUND, 1.06, (0.3, 0.45, 1.0), (0.08, 0.12, 0.45), "dome", 0.15),
            _Look(_ELONGATED, 1.97, (0.35, 1.0, 0.4), (0.08, 0.45, 0.12), "dome", 0.05),
            _Look(_ROUND, 1.11, (0.1, 0.02, 0.06), (1.0, 0.25, 0.5), "ring", 0.05),
            _Look(_SPICULATED, 1.15, (1.0, 0.9, 0.3), (0.75, 0.55, 0.1), "flat", 0.15),
        ),
        _bg_fluorescence,
        (0.01, 0.025),
        (0.9, 1.1),
        0.0,
    ),
    "histology": _Style(
        3,
        False,
        (
            _Look(_SPICULATED, 1.46, (0.4, 0.2, 0.55), (0.52, 0.28, 0.6), "flat", 0.16),
            _Look(_ROUND, 1.16, (0.97, 0.95, 0.97), (0.55, 0.3, 0.66), "ring", 0.04),
            _Look(_ELONGATED, 1.87, (0.85, 0.18, 0.24), (0.78, 0.42, 0.55), "dome", 0.1),
            _Look(_LOBULATED, 1.11, (0.74, 0.79, 0.93), (0.68, 0.7, 0.87), "flat", 0.02),
        ),
        _bg_histology,
        (0.008, 0.018),
        (0.94, 1.06),
        0.0,
    ),
    "dermoscopy": _Style(
        3,
        False,
        (
            _Look(_ROUND, 0.9, (0.22, 0.12, 0.08), (0.4, 0.25, 0.18), "dome", 0.02),
            _Look(_LOBULATED, 1.28, (0.55, 0.63, 0.76), (0.5, 0.52, 0.62), "flat", 0.07),
            _Look(_ELONGATED, 1.87, (0.2, 0.11, 0.07), (0.3, 0.18, 0.12), "flat", 0.02),
            _Look(_SPICULATED, 1.34, (0.96, 0.91, 0.9), (0.86, 0.76, 0.72), "flat", 0.08),
        ),
        _bg_dermoscopy,
        (0.008, 0.018),
        (0.94, 1.06),
        0.0,
    ),
}


@dataclass
class _Object:
    kind: int  # object type 0..K-1
    radius: float  # in pixels
    rows: slice  # the object's crop of the image
    cols: slice
    coverage: np.ndarray  # (h, w) uint8 anti-aliased coverage 0..255 of the crop
    inside: np.ndarray  # (h, w) bool, coverage >= 50%: the object's mask pixels in the crop


def _place(rng: np.random.Generator, regions: Regions, radii: np.ndarray) -> list[complex]:
    """Object centres as complex ``x + iy`` in fractions of the side, avoiding overlaps if possible."""
    ell = np.asarray(regions)
    u = rng.random((3, len(radii), _PLACEMENT_TRIES))
    pick = (u[0] * len(ell)).astype(int)
    polar = np.sqrt(u[1]) * np.exp(2j * math.pi * u[2])
    x = (ell[pick, 0] + ell[pick, 2] * polar.real).clip(0.04, 0.96)
    y = (ell[pick, 1] + ell[pick, 3] * polar.imag).clip(0.04, 0.96)
    centres: list[complex] = []
    placed: list[tuple[complex, float]] = []
    for candidates, radius in zip((x + 1j * y).tolist(), radii.tolist(), strict=True):
        best, best_clearance = candidates[0], -math.inf
        for z in candidates:  # the first candidate that overlaps nothing, else the least overlapping
            clearance = min((abs(z - c) - radius - r for c, r in placed), default=math.inf)
            if clearance > best_clearance:
                best, best_clearance = z, clearance
            if clearance > 0:
                break
        centres.append(best)
        placed.append((best, radius))
    return centres


def _layout(rng: np.random.Generator, style: _Style, regions: Regions, size: int) -> list[_Object]:
    """Draw the objects' types, sizes and positions and rasterise their outlines."""
    u = rng.random(3)
    if u[0] < _EMPTY_PROBABILITY:
        return []
    low, high = ((1, 2), (2, 4), (4, 7), (7, _MAX_OBJECTS + 1))[int(4 * u[1])]
    n = low + int((high - low) * rng.random())
    weights = rng.random(NUM_OBJECT_TYPES) ** 3  # a few types dominate each scene
    kinds = np.searchsorted(np.cumsum(weights), weights.sum() * rng.random(n), side="right")
    radii = _SCALES[int(3 * u[2])] * style.radii[kinds] * (0.85 + 0.3 * rng.random(n))
    centres = _place(rng, regions, 0.8 * radii)
    r_px = np.maximum(radii * size, 2.0)
    outlines = _outlines(rng, style.shapes[kinds]) * r_px[:, None]
    outlines += (np.array(centres) * size - (0.5 + 0.5j))[:, None]  # OpenCV puts pixel centres at integers
    pts = _xy(outlines)
    # crops around the outlines, clipped to the image (never empty: the centres lie inside)
    lows = np.maximum(np.floor(pts.min(1)).astype(int) - 1, 0)
    highs = np.minimum(np.ceil(pts.max(1)).astype(int) + 2, size)
    fixed = np.round((pts - lows[:, None, :]) * 16).astype(np.int32)
    objects = []
    for kind, r, (x0, y0), (x1, y1), poly in zip(
        kinds.tolist(), r_px.tolist(), lows.tolist(), highs.tolist(), fixed, strict=True
    ):
        coverage = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(coverage, [poly], 255, cv2.LINE_AA, 4)
        objects.append(_Object(kind, r, slice(y0, y1), slice(x0, x1), coverage, coverage >= 128))
    return objects


def _instances(objects: list[_Object], size: int) -> np.ndarray:
    """(H, W) uint8 map of the visible object, 1-based in drawing order (later objects win)."""
    inst = np.zeros((size, size), np.uint8)
    for i, obj in enumerate(objects, start=1):
        inst[obj.rows, obj.cols][obj.inside] = i
    return inst


def _measure(objects: list[_Object], inst: np.ndarray) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Visible area and tight ``xyxy`` box (exclusive ends) of each object in the instance map."""
    areas, boxes = [], []
    for i, obj in enumerate(objects, start=1):
        visible = (inst[obj.rows, obj.cols] == i).view(np.uint8)
        x, y, w, h = cv2.boundingRect(visible)
        x, y = x + obj.cols.start, y + obj.rows.start
        areas.append(cv2.countNonZero(visible))
        boxes.append((x, y, x + w, y + h))
    return areas, boxes


def _paint(
    image: np.ndarray,
    background: np.ndarray | None,
    obj: _Object,
    look: _Look,
    core: np.ndarray,
    edge: np.ndarray,
    texture: np.ndarray,
) -> None:
    """Composite one object onto the (H, W, C) image in place with its anti-aliased coverage."""
    if look.profile == "flat":
        colour = core
    else:
        depth = cv2.distanceTransform(obj.inside.view(np.uint8), cv2.DIST_L2, 3)
        if look.profile == "dome":
            weight = np.minimum(depth * (1.0 / (0.6 * obj.radius)), 1.0)
        else:
            weight = np.clip(depth - max(0.28 * obj.radius, 1.0), 0.0, 1.0)
        colour = weight[..., None] * (core - edge)
        colour += edge
    if look.texture:
        colour = colour + (look.texture * texture[obj.rows, obj.cols])[..., None]
    if background is not None:
        colour = colour + background[obj.rows, obj.cols]
    alpha = np.multiply(obj.coverage, np.float32(1.0 / 255.0), dtype=np.float32)[..., None]
    region = image[obj.rows, obj.cols]
    region += alpha * (colour - region)
