"""Synthetic worlds: procedurally generated biomedical-like images with consistent labels.

This module is the library's embedded default data. It needs no files and no downloads: every
image is *synthetic*, rendered on the fly by numpy and OpenCV, so pipelines, tests and tutorials
run anywhere. The images only imitate the look of real modalities; nothing here is patient data.

Styles (imaging "worlds")
-------------------------
``radiograph``    grayscale chest-x-ray-like: dark lung fields, ribs, mediastinum; opacities.
``ct``            grayscale axial abdominal CT-slice-like: body ellipse, organs, spine; lesions.
``fluorescence``  fluorescence microscopy: dark background, glowing cells in colour channels.
``histology``     H&E-like: pink fibrous stroma, purple nuclei, glands, vessels.
``dermoscopy``    dermoscopy photo: skin, hairs, a pigmented lesion with dermoscopic structures.

Every style has ``NUM_OBJECT_TYPES`` (K = 4) object types that differ in shape (round, ring-like,
elongated, lobulated or spiculated), size, intensity or colour and texture (see ``OBJECT_NAMES``),
and a global image-level grade with three levels (see ``GRADE_NAMES``). The grade changes the
image's texture (reticular pattern, parenchymal mottling, debris, inflammatory cells, pigment
network and colour variegation) while exposure and stain vary at random, so the mean intensity
alone does not give it away.

Labels of a scene (:class:`Scene`)
----------------------------------
``mask``        (H, W) int64, 0 = background, ``t + 1`` = object type ``t``; objects may overlap
                and the one drawn later wins, exactly as in the image.
``boxes``       (n, 4) float32 ``xyxy`` in pixels: the tight box of each object's *visible* mask
                pixels, ``x2``/``y2`` exclusive (a single pixel at column 3 spans ``x1=3, x2=4``).
                Objects with fewer than ``MIN_VISIBLE_AREA`` visible pixels are not drawn at all.
``box_labels``  (n,) int64 object types in ``0 .. K-1``.
``labels``      the label families:

================  ==============  ==================================================================
family            kind            definition
================  ==============  ==================================================================
``grade``         classification  global grade, 0..2 (names in ``GRADE_NAMES``)
``objects``       multilabel      float32 (K,) 0/1 presence of each object type
``dominant``      classification  type with the largest total visible area; K ("none") if empty,
                                  so it has K + 1 classes; ties go to the lower type
``count``         (integer)       number of visible objects, ``len(boxes)``
``count_bin``     classification  ``count`` binned as 0-1, 2-3, 4-6, 7+ (``COUNT_BIN_EDGES``)
``size_bin``      classification  median over objects of sqrt(visible area) / image size, binned
                                  small / medium / large by ``SIZE_BIN_EDGES``; 0 if empty
================  ==============  ==================================================================

``count_bin`` and ``size_bin`` are held-out families for probing frozen encoders; pretraining uses
``grade``, ``objects``, ``dominant``, ``segmentation`` (the mask) and ``detection`` (the boxes).
About 6% of the scenes have no object.

Determinism
-----------
A scene is a pure function of ``(style, seed, index, size)``: all randomness comes from
``np.random.default_rng([seed, style_id, index])`` and no random draw depends on the size, so a
scene rendered at two sizes shows the same layout (objects are at least 2 pixels in radius, and
those left with fewer than ``MIN_VISIBLE_AREA`` visible pixels drop out, so tiny sizes may differ).
:class:`SyntheticTaskDataset` maps its splits to disjoint index ranges (``SPLIT_OFFSETS``), so
splits never share a scene, and all label families of a world share the same images.

Speed: rendering is vectorised, works on object-sized crops and draws smooth fields at low
resolution; one core renders roughly 1000-1400 images/s at 64 x 64 and 600-900 images/s at
224 x 224 depending on the style. ``python -m umedpt.data.synthetic`` prints the rates measured
on the current machine.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from umedpt.kinds import get_kind

__all__ = [
    "COUNT_BIN_EDGES",
    "GRADE_NAMES",
    "LABEL_FAMILIES",
    "MAX_SIZE",
    "MIN_SIZE",
    "MIN_VISIBLE_AREA",
    "NUM_OBJECT_TYPES",
    "OBJECT_NAMES",
    "SIZE_BIN_EDGES",
    "SPLIT_OFFSETS",
    "STYLES",
    "Scene",
    "SyntheticTaskDataset",
    "class_names",
    "num_classes",
    "render_scene",
]

STYLES: tuple[str, ...] = ("radiograph", "ct", "fluorescence", "histology", "dermoscopy")
NUM_OBJECT_TYPES = 4

OBJECT_NAMES: dict[str, tuple[str, ...]] = {
    "radiograph": ("nodule", "mass", "cavity", "linear_opacity"),
    "ct": ("cyst", "rim_enhancing_lesion", "calcification", "infiltrative_lesion"),
    "fluorescence": ("nucleus", "spindle_cell", "ring_cell", "apoptotic_body"),
    "histology": ("tumor_nest", "gland", "vessel", "mucin_pool"),
    "dermoscopy": ("globule", "blue_white_veil", "streak", "regression_area"),
}
GRADE_NAMES: dict[str, tuple[str, ...]] = {
    "radiograph": ("clear", "reticular", "diffuse_opacity"),
    "ct": ("homogeneous", "mottled", "heterogeneous"),
    "fluorescence": ("low_debris", "moderate_debris", "heavy_debris"),
    "histology": ("no_inflammation", "mild_inflammation", "marked_inflammation"),
    "dermoscopy": ("regular_network", "atypical_network", "variegated"),
}
LABEL_FAMILIES: dict[str, str] = {
    "grade": "classification",
    "objects": "multilabel",
    "dominant": "classification",
    "count_bin": "classification",
    "size_bin": "classification",
    "segmentation": "segmentation",
    "detection": "detection",
}

#: objects with fewer visible pixels than this are not drawn (and get neither box nor mask)
MIN_VISIBLE_AREA = 6
#: upper edges (exclusive) of the count bins 0-1, 2-3, 4-6; larger counts fall in the last bin
COUNT_BIN_EDGES: tuple[int, ...] = (2, 4, 7)
#: upper edges (exclusive) of the small and medium bins of median sqrt(area) / image size
SIZE_BIN_EDGES: tuple[float, ...] = (0.066, 0.118)
MIN_SIZE, MAX_SIZE = 32, 512
#: first scene index of each split of :class:`SyntheticTaskDataset`
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 1 << 28, "test": 2 << 28}

_COUNT_BIN_NAMES = ("0-1", "2-3", "4-6", "7+")
_SIZE_BIN_NAMES = ("small", "medium", "large")
_LOW = 64  # side of the low-resolution smooth fields (lesion, stain, haze) before upsampling
_MAX_OBJECTS = 10
_EMPTY_PROBABILITY = 0.06
_SCALES = (0.028, 0.05, 0.088)  # base object radius (fraction of the image side) per size class
_PLACEMENT_TRIES = 8


@dataclass
class Scene:
    """One rendered synthetic scene and all of its labels (see the module docstring)."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]; grayscale styles have three equal channels
    mask: np.ndarray  # (H, W) int64, 0 = background, 1..K = object type + 1
    boxes: np.ndarray  # (n, 4) float32 xyxy in pixels, tight around the visible mask pixels
    box_labels: np.ndarray  # (n,) int64 in 0..K-1
    labels: dict[str, Any]  # grade, objects, dominant, count, count_bin, size_bin


# ----------------------------------------------------------------------------------------------
# drawing helpers (all random draws are independent of the image size)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform random float (faster than ``Generator.uniform`` for scalars)."""
    return low + (high - low) * rng.random()


def _canvas(size: int, value: float) -> np.ndarray:
    """Square low-resolution canvas for anatomy; drawn in fractions of its side, then resized."""
    side = min(max(size, 64), 128)
    return np.full((side, side), value, np.float32)


def _ellipse(
    canvas: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    value: float,
    angle: float = 0.0,
    arc: tuple[float, float] = (0.0, 360.0),
    thickness: float = -1,
) -> None:
    """Draw an ellipse given in fractions of the (float, later blurred) canvas side, sub-pixel precise."""
    side = canvas.shape[0]
    f = 16.0 * side
    cv2.ellipse(
        canvas,
        (round(cx * f), round(cy * f)),
        (max(round(rx * f), 1), max(round(ry * f), 1)),
        angle,
        arc[0],
        arc[1],
        value,
        -1 if thickness < 0 else max(round(thickness * side), 1),
        cv2.LINE_8,
        4,
    )


def _blur(canvas: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` in fractions of the canvas side."""
    return cv2.GaussianBlur(canvas, (0, 0), sigma * canvas.shape[0])


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a map to ``size`` x ``size`` (area averaging when shrinking by 2 or more)."""
    method = cv2.INTER_AREA if min(image.shape[:2]) >= 2 * size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=method)


def _noise(rng: np.random.Generator, cells: int | tuple[int, int], size: int) -> np.ndarray:
    """Smooth zero-mean noise (standard deviation 0.65-0.85) with ``cells`` values across the side."""
    rows, cols = (cells, cells) if isinstance(cells, int) else cells
    field = rng.random((rows, cols), dtype=np.float32)
    field -= 0.5
    field *= 3.46
    if max(rows, cols) < size:  # cubic up to 8x, so that any further linear upsampling shows no grid
        scale = min(8.0, size / max(rows, cols))
        field = cv2.resize(field, (round(scale * cols), round(scale * rows)), interpolation=cv2.INTER_CUBIC)
    return _resize(field, size)


def _ridges(field: np.ndarray, sharpness: float) -> np.ndarray:
    """A network of thin curved lines along the zero crossings of a smooth noise field."""
    return np.maximum(1.0 - sharpness * np.abs(field), 0.0)


_BANK_SIDE, _WINDOW = 1024, 256


@functools.lru_cache(maxsize=24)
def _dot_bank(per_window: int, radius: float, shrink: int) -> np.ndarray:
    """uint8 map of small random ellipses (nuclei, debris), ``per_window`` per 256 x 256 window.

    ``shrink`` > 1 gives the map downsampled by that factor, for rendering small images quickly.
    """
    if shrink > 1:
        full = _dot_bank(per_window, radius, 1)
        return cv2.resize(full, (_BANK_SIDE // shrink,) * 2, interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng([per_window, round(radius * 100)])
    n = per_window * (_BANK_SIDE // _WINDOW) ** 2
    centres = np.round(rng.random((n, 2)) * _BANK_SIDE * 16).astype(int).tolist()
    axes = np.round(radius * 16 * (0.75 + 0.5 * rng.random((n, 2)))).astype(int).tolist()
    angles, values = (rng.random(n) * 180).tolist(), (140 + 115 * rng.random(n)).tolist()
    bank = np.zeros((_BANK_SIDE, _BANK_SIDE), np.uint8)
    for centre, axis, angle, value in zip(centres, axes, angles, values, strict=True):
        cv2.ellipse(bank, centre, axis, angle, 0, 360, value, -1, cv2.LINE_AA, 4)
    return bank


def _dots(rng: np.random.Generator, per_window: int, radius: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of ``per_window`` dots of ``radius`` (in 1/256 of the side) per image."""
    shrink = 4 if size <= _WINDOW // 4 else 2 if size <= _WINDOW // 2 else 1
    bank, window = _dot_bank(per_window, radius, shrink), _WINDOW // shrink
    oy, ox = (int(v * (bank.shape[0] - window)) for v in rng.random(2))
    dots = _resize(bank[oy : oy + window, ox : ox + window], size)
    return dots.astype(np.float32) * np.float32(1.0 / 255.0)


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Pixel noise shared by all scenes; scenes read it at random offsets (fast, deterministic)."""
    return np.random.default_rng(20240521).standard_normal((2 * MAX_SIZE, 3 * MAX_SIZE), dtype=np.float32)


def _pixel_noise(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """Unit white noise of shape (size, size, channels) cut from the noise bank."""
    bank = _noise_bank()
    oy = int(rng.random() * (bank.shape[0] - size))
    ox = int(rng.random() * (bank.shape[1] - channels * size))
    return bank[oy : oy + size, ox : ox + channels * size].reshape(size, size, channels)


_BEZIER_T = np.linspace(0.0, 1.0, 12)[:, None]
_BEZIER = np.hstack([(1 - _BEZIER_T) ** 2, 2 * _BEZIER_T * (1 - _BEZIER_T), _BEZIER_T**2])  # (12, 3)


@functools.lru_cache(maxsize=16)
def _ramp(size: int) -> np.ndarray:
    """A (1, size) row going linearly from -1 to 1."""
    return np.linspace(-1.0, 1.0, size, dtype=np.float32)[None, :]


@functools.lru_cache(maxsize=16)
def _dermoscope_field(size: int) -> np.ndarray:
    """Circular field of view of a dermoscope: 1 inside, dark towards the corners."""
    y, x = np.ogrid[:size, :size]
    c = (size - 1) / 2.0
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2) / size
    return np.clip((0.6 - r) / 0.06, 0.12, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# outlines of objects (and of the dermoscopy lesion)

_ROUND, _ELONGATED, _LOBULATED, _SPICULATED = range(4)
_VERTICES = 48
_ANGLES = np.linspace(0.0, 2.0 * math.pi, _VERTICES, endpoint=False)
_COS_HARMONICS = np.cos(np.arange(2, 6)[:, None] * _ANGLES)  # (4, vertices)
_SIN_HARMONICS = np.sin(np.arange(2, 6)[:, None] * _ANGLES)
_WOBBLE = np.array([0.03, 0.03, 0.13, 0.06])  # harmonic amplitude per shape
_ASPECT = np.array([(0.8, 1.0), (0.2, 0.32), (0.65, 0.95), (0.75, 1.0)])  # minor / major axis per shape
_SPIKES = 7
_BANK_OUTLINES = 512  # random outlines per shape, drawn from by index and rotated


@functools.lru_cache(maxsize=1)
def _outline_bank() -> np.ndarray:
    """Unrotated closed outlines of about unit radius as complex ``x + iy``, (4, _BANK_OUTLINES, vertices)."""
    rng = np.random.default_rng(7)
    shapes = np.repeat(np.arange(4), _BANK_OUTLINES)
    u = rng.random((len(shapes), 9 + 3 * _SPIKES))
    amplitude, phase = u[:, :4] * _WOBBLE[shapes, None], 2 * math.pi * u[:, 4:8]
    radius = 1.0 + (amplitude * np.cos(phase)) @ _COS_HARMONICS - (amplitude * np.sin(phase)) @ _SIN_HARMONICS
    # spiculated outlines: a smaller body with narrow radial spikes
    angle, length, keep = np.split(u[:, 9:, None], 3, axis=1)
    gap = (_ANGLES - 2 * math.pi * angle + math.pi) % (2 * math.pi) - math.pi
    spikes = ((0.35 + 0.45 * length) * (keep < 0.85) * np.exp(-((gap / 0.11) ** 2))).sum(1)
    radius = np.where((shapes == _SPICULATED)[:, None], 0.72 * radius + spikes, radius)
    low, high = _ASPECT[shapes].T
    ratio = (low + (high - low) * u[:, 8])[:, None]  # minor / major axis
    outlines = radius * (np.cos(_ANGLES) + 1j * ratio * np.sin(_ANGLES))
    return outlines.reshape(4, _BANK_OUTLINES, _VERTICES)


def _outlines(rng: np.random.Generator, shapes: np.ndarray) -> np.ndarray:
    """Randomly rotated closed outlines of about unit radius, complex ``x + iy``: (n, vertices)."""
    u = rng.random((2, len(shapes)))
    rotation = np.exp(2j * math.pi * u[1])[:, None]
    return _outline_bank()[shapes, (u[0] * _BANK_OUTLINES).astype(int)] * rotation


def _xy(points: np.ndarray) -> np.ndarray:
    """Complex points (..., vertices) as float (..., vertices, 2) ``(x, y)`` pairs (a view)."""
    return points.view(np.float64).reshape(*points.shape, 2)


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


# ----------------------------------------------------------------------------------------------
# public API


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int, or an error naming the argument, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return int(value)


def _check_choice(name: str, value: Any, allowed: Any) -> None:
    """An error naming the argument, the value and the allowed values unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)!r}, got {value!r}")


def render_scene(style: str, seed: int, index: int, size: int = 224) -> Scene:
    """Render scene ``index`` of the synthetic world ``(style, seed)`` at ``size`` x ``size`` pixels.

    Args:
        style: one of ``STYLES``.
        seed: non-negative world seed.
        index: non-negative scene index.
        size: image side in pixels, ``MIN_SIZE`` to ``MAX_SIZE``; objects scale with it.

    Returns:
        The :class:`Scene`; identical inputs give bit-identical outputs.
    """
    _check_choice("style", style, STYLES)
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    size = _check_int("size", size, MIN_SIZE, MAX_SIZE)
    spec = _STYLES[style]
    rng = np.random.default_rng([seed, STYLES.index(style), index])
    grade = int(3 * rng.random())
    planes, regions = spec.background(rng, size, grade)
    objects = _layout(rng, spec, regions, size)
    inst = _instances(objects, size)
    areas, boxes = _measure(objects, inst)
    if min(areas, default=MIN_VISIBLE_AREA) < MIN_VISIBLE_AREA:
        # removing objects only uncovers the others, so every remaining one stays large enough
        objects = [obj for obj, area in zip(objects, areas, strict=True) if area >= MIN_VISIBLE_AREA]
        inst = _instances(objects, size)
        areas, boxes = _measure(objects, inst)

    # global exposure / white balance, applied to the background planes and the object colours alike
    gain = spec.gain[0] + (spec.gain[1] - spec.gain[0]) * rng.random(spec.channels)
    offset = spec.offset * (2 * rng.random() - 1)
    for plane, g in zip(planes, gain.tolist(), strict=True):
        plane *= g
        plane += offset
    image = cv2.merge(planes) if spec.channels > 1 else planes[0][..., None]
    if objects:
        background = image.copy() if spec.relative else None
        texture = _noise(rng, 40, size)
        shift = 0.0 if spec.relative else offset
        cores, edges = ((gain * colours + shift).astype(np.float32) for colours in spec.colours)
        for obj in objects:
            _paint(image, background, obj, spec.looks[obj.kind], cores[obj.kind], edges[obj.kind], texture)
    image += _pixel_noise(rng, size, spec.channels) * np.float32(_u(rng, *spec.noise))
    np.clip(image, 0.0, 1.0, out=image)
    if spec.channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)

    kinds = [obj.kind for obj in objects]
    lut = np.zeros(256, np.uint8)
    lut[1 : len(objects) + 1] = np.add(kinds, 1)
    mask = cv2.LUT(inst, lut).astype(np.int64)
    return Scene(
        image,
        mask,
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(kinds, np.int64),
        _labels(grade, kinds, areas, size),
    )


def _labels(grade: int, kinds: list[int], areas: list[int], size: int) -> dict[str, Any]:
    """The label families of a scene from its objects' types and visible areas."""
    type_area = [0] * NUM_OBJECT_TYPES
    for kind, area in zip(kinds, areas, strict=True):
        type_area[kind] += area
    count = len(kinds)
    if count:
        sides = sorted(math.sqrt(area) / size for area in areas)
        median = (sides[(count - 1) // 2] + sides[count // 2]) / 2
        dominant = type_area.index(max(type_area))
    else:
        median, dominant = 0.0, NUM_OBJECT_TYPES
    return {
        "grade": grade,
        "objects": np.array([area > 0 for area in type_area], np.float32),
        "dominant": dominant,
        "count": count,
        "count_bin": bisect.bisect_right(COUNT_BIN_EDGES, count),
        "size_bin": bisect.bisect_right(SIZE_BIN_EDGES, median) if count else 0,
    }


def class_names(style: str, family: str) -> list[str]:
    """Names of the classes of ``family`` in world ``style`` (segmentation includes background)."""
    _check_choice("style", style, STYLES)
    _check_choice("family", family, LABEL_FAMILIES)
    objects = list(OBJECT_NAMES[style])
    return {
        "grade": list(GRADE_NAMES[style]),
        "objects": objects,
        "dominant": [*objects, "none"],
        "count_bin": list(_COUNT_BIN_NAMES),
        "size_bin": list(_SIZE_BIN_NAMES),
        "segmentation": ["background", *objects],
        "detection": objects,
    }[family]


def num_classes(style: str, family: str) -> int:
    """Number of classes of ``family`` in world ``style``."""
    return len(class_names(style, family))


#: scenes kept by datasets built with ``cache=True``, keyed by ``(style, seed, index, size)``
_SCENE_CACHE: dict[tuple[str, int, int, int], Scene] = {}


class SyntheticTaskDataset(Dataset):
    """One task over one synthetic world.

    Items are case dicts: ``image`` float32 (C, H, W) normalised as ``(x - 0.5) / 0.25``, plus
    ``label`` (int for classification families, float32 (K,) for ``objects``), ``mask``
    (int64 (H, W), segmentation) or ``boxes`` float32 (n, 4) xyxy and ``box_labels`` int64 (n,)
    (detection). All families of a world share the same images for the same split and seed.

    Args:
        style: one of ``STYLES``.
        family: one of ``LABEL_FAMILIES``.
        split: ``"train"``, ``"val"`` or ``"test"``; splits use disjoint scene indices.
        num_samples: number of scenes, 1 to 2**28, or a mapping from split to that number
            (e.g. ``{"train": 10000, "val": 1000, "test": 2000}``).
        image_size: image side in pixels, ``MIN_SIZE`` to ``MAX_SIZE``.
        seed: non-negative world seed.
        channels: 3 for RGB or 1 for the luminance.
        cache: keep rendered scenes in memory, shared by all datasets of the process that show
            the same world (about 80 KB per scene at 64 px, 1 MB at 224 px): epochs after the
            first cost no rendering. Each DataLoader worker process holds its own cache.
    """

    def __init__(
        self,
        style: str,
        family: str,
        split: str = "train",
        num_samples: int | dict[str, int] = 512,
        image_size: int = 224,
        seed: int = 0,
        channels: int = 3,
        cache: bool = False,
    ) -> None:
        _check_choice("style", style, STYLES)
        _check_choice("family", family, LABEL_FAMILIES)
        _check_choice("split", split, SPLIT_OFFSETS)
        _check_choice("channels", channels, (1, 3))
        self.style, self.family, self.split = style, family, split
        if isinstance(num_samples, dict):
            if split not in num_samples:
                raise ValueError(f"num_samples has no entry for split {split!r}: {num_samples!r}")
            num_samples = num_samples[split]
        self.num_samples = _check_int("num_samples", num_samples, 1, SPLIT_OFFSETS["val"])
        self.image_size = _check_int("image_size", image_size, MIN_SIZE, MAX_SIZE)
        self.seed = _check_int("seed", seed, 0)
        self.channels = channels
        self.cache = bool(cache)
        self.kind = LABEL_FAMILIES[family]
        self.task_kind = get_kind(self.kind)
        self.class_names = class_names(style, family)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, i: int) -> Scene:
        """The full :class:`Scene` behind item ``i``."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {i!r} of type {type(i).__name__}")
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index must be in [0, {self.num_samples}), got {i}")
        key = (self.style, self.seed, SPLIT_OFFSETS[self.split] + int(i), self.image_size)
        if not self.cache:
            return render_scene(*key)
        if key not in _SCENE_CACHE:
            _SCENE_CACHE[key] = render_scene(*key)
        return _SCENE_CACHE[key]

    def __getitem__(self, i: int) -> dict[str, Any]:
        """The case dict of item ``i`` (see the class docstring)."""
        scene = self.scene(i)
        image = scene.image
        if self.channels == 1:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
        image = torch.from_numpy(np.ascontiguousarray(((image - 0.5) * 4.0).transpose(2, 0, 1)))
        targets = self.task_kind.case_targets(
            label=scene.labels.get(self.family), mask=scene.mask, boxes=scene.boxes, box_labels=scene.box_labels
        )
        return {"image": image, **targets}


def _benchmark(sizes: tuple[int, ...] = (64, 224), seconds: float = 1.0) -> None:
    """Print the rendering speed per style and size: images per CPU second on one thread."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    for size in sizes:
        for style in STYLES:
            render_scene(style, 0, 0, size)
            count, start = 0, time.process_time()
            while time.process_time() - start < seconds:
                render_scene(style, 0, count, size)
                count += 1
            print(f"{style:>12s} {size:4d}px: {count / (time.process_time() - start):7.0f} images/s")


if __name__ == "__main__":
    _benchmark()
