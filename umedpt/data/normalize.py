"""Intensity normalisation per task: full-depth pixels -> [0, 1] -> standardised network input.

Normalisation has two steps around the augmentations:

1. :meth:`Normalization.to_unit` maps the stored values (8/16-bit integers, HU floats...) to
   float32 in [0, 1] with one of the :data:`METHODS`; augmentations then work on [0, 1] images.
2. :meth:`Normalization.standardize` applies ``(x - mean) / std`` per channel. The defaults
   ``mean=0.5, std=0.25`` match the embedded synthetic data, so real and synthetic tasks feed the
   encoder inputs of the same scale; ImageNet statistics are a common alternative for photos.

In YAML a task's ``normalize`` is a method name, a CT window name, or a mapping::

    normalize: percentile                                   # per-image 0.5 / 99.5 percentiles
    normalize: lung                                         # CT window preset (HU)
    normalize: {method: window, center: 40, width: 400}     # explicit window
    normalize: {method: range, min: 0, max: 4095}           # fixed range (12-bit data)
    normalize: unit                                         # integers by their type's range, floats as in [0, 1]
    normalize: {method: minmax, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["METHODS", "WINDOWS", "ImageMeta", "Normalization", "NormalizationSpec"]

#: ``auto``: 8-bit and boolean images by their type's range, images whose file has a display
#: window (DICOM) by that window, everything else by ``percentile``.
METHODS: tuple[str, ...] = ("auto", "range", "minmax", "percentile", "window", "unit")
#: CT windows ``(center, width)`` in Hounsfield units
WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (30.0, 150.0),
}
#: percentiles are estimated on at most this many pixels (a regular subsample of larger images)
PERCENTILE_PIXELS = 1 << 16

NormalizationSpec = str | Mapping[str, Any] | None


@dataclass(frozen=True)
class ImageMeta:
    """What a file says about how to display its values.

    Attributes:
        window: ``(center, width)`` of the file's display window (DICOM ``WindowCenter`` /
            ``WindowWidth``, first value), in the units of the returned array.
        invert: True when low values are displayed bright (DICOM ``MONOCHROME1``).
    """

    window: tuple[float, float] | None = None
    invert: bool = False


@dataclass(frozen=True)
class Normalization:
    """How a task's images are scaled (see the module docstring).

    Args:
        method: one of :data:`METHODS`.
        low: lower percentile (``percentile``), in [0, 100).
        high: upper percentile (``percentile``), in (low, 100].
        min: value mapped to 0 by ``range`` (default: 0 for integer images).
        max: value mapped to 1 by ``range`` (default: the largest value of the integer type).
        center: window center (``window``); with ``width`` unset too, the file's own window is used.
        width: window width (``window``).
        window: a :data:`WINDOWS` preset name (``window`` method).
        mean: per-channel (or one) mean subtracted after augmentation.
        std: per-channel (or one) standard deviation divided by after augmentation.
    """

    method: str = "auto"
    low: float = 0.5
    high: float = 99.5
    min: float | None = None
    max: float | None = None
    center: float | None = None
    width: float | None = None
    window: str | None = None
    mean: float | Sequence[float] = 0.5
    std: float | Sequence[float] = 0.25
    _mean: np.ndarray = field(init=False, repr=False, compare=False)
    _std: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = "normalize"
        if self.method not in METHODS:
            raise ValueError(f"{where}: method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"{where}: percentiles need 0 <= low < high <= 100, got {self.low}, {self.high}")
        if self.min is not None and self.max is not None and self.max <= self.min:
            raise ValueError(f"{where}: range needs max > min, got min={self.min}, max={self.max}")
        if self.window is not None and self.window not in WINDOWS:
            raise ValueError(f"{where}: window must be one of {sorted(WINDOWS)}, got {self.window!r}")
        if (self.center is None) != (self.width is None):
            raise ValueError(f"{where}: give both center and width, got center={self.center}, width={self.width}")
        if self.width is not None and self.width <= 0:
            raise ValueError(f"{where}: window width must be > 0, got {self.width}")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1)
        if len(mean) not in (1, 3) or len(std) not in (1, 3) or not (std > 0).all():
            raise ValueError(f"{where}: mean and std need 1 or 3 values, std > 0; got mean={self.mean}, std={self.std}")
        object.__setattr__(self, "_mean", mean)
        object.__setattr__(self, "_std", std)

    @classmethod
    def from_spec(cls, spec: NormalizationSpec | Normalization) -> Normalization:
        """Build from a method name, a :data:`WINDOWS` name, a mapping of the fields, or ``None`` (auto)."""
        if isinstance(spec, Normalization):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            if spec in WINDOWS:
                return cls(method="window", window=spec)
            if spec in METHODS:
                return cls(method=spec)
            raise ValueError(
                f"normalize: {spec!r} is neither a method {list(METHODS)} nor a CT window {sorted(WINDOWS)}"
            )
        if isinstance(spec, Mapping):
            known = {f.name for f in fields(cls) if f.init}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"normalize: unknown keys {unknown}; expected some of {sorted(known)}")
            return cls(**dict(spec))
        raise TypeError(f"normalize: expected a string or a mapping, got {type(spec).__name__}")

    def to_unit(self, image: np.ndarray, meta: ImageMeta | None = None) -> np.ndarray:
        """``image`` (any numeric type, any channels) as float32 in [0, 1]; all channels share the scaling."""
        meta = meta or ImageMeta()
        low, high = self._bounds(image, meta)
        scale = 1.0 / (high - low) if high > low else 0.0
        if image.dtype.kind in "biu" and image.dtype.itemsize <= 2:
            # one table lookup per pixel: the table maps every possible stored value (computed in float64)
            codes = np.dtype(f"u{image.dtype.itemsize}")
            values = np.arange(1 << (8 * codes.itemsize), dtype=codes).view(image.dtype).astype(np.float64)
            table = np.clip((values - low) * scale, 0.0, 1.0)
            if meta.invert:
                table = 1.0 - table
            return np.take(table.astype(np.float32), image.view(codes))
        out = image.astype(np.float64 if image.dtype.itemsize > 4 or image.dtype.kind != "f" else np.float32)
        if low != 0.0:  # images already in [0, 1] (unit-range floats) only need the clip
            out -= low
        if scale != 1.0:
            out *= scale
        np.clip(out, 0.0, 1.0, out=out)
        if meta.invert:
            np.subtract(1.0, out, out=out)
        return out.astype(np.float32, copy=False)

    def _bounds(self, image: np.ndarray, meta: ImageMeta) -> tuple[float, float]:
        method = self.method
        if method == "auto":
            if image.dtype == np.uint8 or image.dtype == np.bool_:
                method = "range"
            elif meta.window is not None:
                method = "window"
            else:
                method = "percentile"
        if method == "unit":  # values already meant as [0, 1] when floating point (IMAX, synthetic scenes)
            return (0.0, 1.0) if image.dtype.kind == "f" else self._range(image)
        if method == "range":
            return self._range(image)
        if method == "window":
            center, width = self._window(meta)
            return center - width / 2, center + width / 2
        if method == "minmax":
            return float(image.min()), float(image.max())
        sample = image
        if image.size > PERCENTILE_PIXELS:
            step = int(np.ceil(np.sqrt(image.size / PERCENTILE_PIXELS)))
            sample = image[::step, ::step]
        lo, hi = np.percentile(sample, (self.low, self.high))
        return float(lo), float(hi)

    def _range(self, image: np.ndarray) -> tuple[float, float]:
        if image.dtype == np.bool_:
            return 0.0, 1.0
        low, high = self.min, self.max
        if image.dtype.kind in "ui":
            info = np.iinfo(image.dtype)
            low = 0.0 if low is None else low
            high = float(info.max) if high is None else high
        if low is None or high is None:
            raise ValueError(
                f"normalize: method 'range' on {image.dtype} images needs min and max (e.g. "
                "{method: range, min: 0, max: 1})"
            )
        return float(low), float(high)

    def _window(self, meta: ImageMeta) -> tuple[float, float]:
        if self.center is not None and self.width is not None:
            return self.center, self.width
        if self.window is not None:
            return WINDOWS[self.window]
        if meta.window is not None:
            return meta.window
        raise ValueError(
            "normalize: method 'window' needs center and width, a window preset "
            f"{sorted(WINDOWS)}, or a file with its own window (DICOM WindowCenter/WindowWidth)"
        )

    def standardize(self, image: np.ndarray) -> np.ndarray:
        """``(image - mean) / std`` per channel for an (H, W, C) float image."""
        channels = image.shape[-1]
        for name, values in (("mean", self._mean), ("std", self._std)):
            if len(values) not in (1, channels):
                raise ValueError(f"normalize: {len(values)} {name} values for {channels}-channel images")
        return ((image - self._mean) / self._std).astype(np.float32, copy=False)
