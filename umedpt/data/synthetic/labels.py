"""What a synthetic scene is and shows: the worlds, object types, grades and label families,
their class names, and the :class:`Scene` record.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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


@dataclass
class Scene:
    """One rendered synthetic scene and all of its labels (see the module docstring)."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]; grayscale styles have three equal channels
    mask: np.ndarray  # (H, W) int64, 0 = background, 1..K = object type + 1
    boxes: np.ndarray  # (n, 4) float32 xyxy in pixels, tight around the visible mask pixels
    box_labels: np.ndarray  # (n,) int64 in 0..K-1
    labels: dict[str, Any]  # grade, objects, dominant, count, count_bin, size_bin


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
