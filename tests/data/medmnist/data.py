"""Tiny MedMNIST-layout ``.npz`` files: a 3-class RGB set (like PathMNIST) and a 4-label grey set (like ChestMNIST).

Usage: ``python tests/data/medmnist/data.py OUT_DIR``; the tests call :func:`generate` into a temporary folder.
Image ``i`` of a split is a flat field whose value encodes (split, i), so every image is unique.
With ``broken=True`` the 3-class file plants two problems: ``val_labels[1] = 7`` (out of range
for 3 classes) and ``test_images[0]`` equal to ``train_images[0]`` (a duplicate across splits).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"train": 8, "val": 4, "test": 4}


def _images(split: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    values = (np.arange(n) * 20 + split * 5 + 10).astype(np.uint8)
    return np.broadcast_to(values.reshape(n, *[1] * len(shape)), (n, *shape)).copy()


def generate(root: Path, broken: bool = False) -> dict[str, Any]:
    """Write ``multiclass.npz`` and ``multilabel.npz`` into ``root``; return their paths and labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    multiclass: dict[str, np.ndarray] = {}
    multilabel: dict[str, np.ndarray] = {}
    for s, (split, n) in enumerate(SIZES.items()):
        multiclass[f"{split}_images"] = _images(s, n, (28, 28, 3))
        multiclass[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
        multilabel[f"{split}_images"] = _images(s, n, (28, 28))
        multilabel[f"{split}_labels"] = rng.integers(0, 2, (n, 4)).astype(np.uint8)
    if broken:
        multiclass["val_labels"][1, 0] = 7
        multiclass["test_images"][0] = multiclass["train_images"][0]
    np.savez_compressed(root / "multiclass.npz", **multiclass)
    np.savez_compressed(root / "multilabel.npz", **multilabel)
    return {
        "multiclass": root / "multiclass.npz",
        "multilabel": root / "multilabel.npz",
        "labels": {"multiclass": multiclass, "multilabel": multilabel},
    }


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("medmnist_data"))
