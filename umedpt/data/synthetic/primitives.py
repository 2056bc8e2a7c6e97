"""Drawing helpers of the synthetic worlds (all random draws are independent of the image size)
and the outlines of objects.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from umedpt.data.synthetic.labels import MAX_SIZE

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
