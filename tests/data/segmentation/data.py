"""Tiny segmentation data: 16-bit images with class-index masks, paired by file name.

Usage: ``python tests/data/segmentation/data.py OUT_DIR``; the tests call :func:`generate` into a temporary folder.

Layout ``images/<split>/case_<k>.<ext>`` and ``masks/<split>/case_<k>_mask.<ext>``: train has
16-bit PNG images with 8-bit PNG masks, val 16-bit TIFF images with NPY masks, test NPY float
images with PNG masks. Images are 48x64 (H x W) with a class-1 rectangle (value 30000) and a
class-2 rectangle (value 50000) on a background of 1000; masks hold 0, 1, 2 and 255 (ignored)
on the top two rows. With ``broken=True`` the first train mask is 44x64 (size mismatch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIZES = {"train": 4, "val": 2, "test": 2}
FORMATS = {"train": (".png", ".png"), "val": (".tif", ".npy"), "test": (".npy", ".png")}
VALUES = (1000, 30000, 50000)


def scene(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint16) and mask (uint8) of case ``k``."""
    mask = np.zeros((48, 64), np.uint8)
    x, y = 4 + 5 * k, 8 + 3 * k
    mask[y : y + 12, x : x + 16] = 1
    mask[30:44, 40 - 2 * k : 58 - 2 * k] = 2
    image = np.asarray(VALUES, np.uint16)[mask] + np.uint16(k)
    mask[:2] = 255
    return image, mask


def _write(path: Path, array: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        cv2.imwrite(str(path), array)


def generate(root: Path, broken: bool = False) -> dict[str, Any]:
    """Write ``images/`` and ``masks/`` into ``root``; return the folders and each split's arrays."""
    truth: dict[str, list[dict[str, Any]]] = {}
    k = 0
    for split, count in SIZES.items():
        image_suffix, mask_suffix = FORMATS[split]
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        truth[split] = []
        for _ in range(count):
            image, mask = scene(k)
            stored = image.astype(np.float32) if image_suffix == ".npy" else image
            _write(root / "images" / split / f"case_{k}{image_suffix}", stored)
            if broken and k == 0:
                mask = mask[:44]
            _write(root / "masks" / split / f"case_{k}_mask{mask_suffix}", mask)
            truth[split].append({"image": stored, "mask": mask})
            k += 1
    return {"images": root / "images", "masks": root / "masks", "truth": truth}


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("segmentation_data"))
