"""Tiny NIfTI segmentation data: int16 volumes with label volumes, stored in a non-RAS orientation.

Usage: ``python tests/data/nifti/data.py OUT_DIR``; the tests call :func:`generate` into a temporary folder.

``images/<split>/vol_<k>.nii.gz`` are 20x24x6 int16 volumes (CT-like values: -1000 air, 40 tissue,
300 in labelled boxes) and ``labels/<split>/vol_<k>.nii.gz`` the uint8 labels (0, 1, 2). The
affine flips the first axis (LAS orientation), so canonical slicing has to undo the flip; the
first train volume is uncompressed (``.nii``) to exercise direct slice reads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

SIZES = {"train": 2, "val": 1, "test": 1}
AFFINE = np.diag([-1.5, 1.0, 2.5, 1.0])


def volumes(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (int16) and label (uint8) volumes of case ``k`` in stored (voxel) order."""
    label = np.zeros((20, 24, 6), np.uint8)
    label[2 + k : 8 + k, 3:10, 1:4] = 1
    label[12:18, 14 : 20 - k, 2:6] = 2
    image = np.full(label.shape, 40, np.int16)
    image[:, :2] = -1000
    image[label > 0] = 300 + 10 * k
    image += np.arange(6, dtype=np.int16)  # each slice differs
    return image, label


def generate(root: Path) -> dict[str, Any]:
    """Write ``images/`` and ``labels/`` into ``root``."""
    k = 0
    for split, count in SIZES.items():
        for folder in ("images", "labels"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image, label = volumes(k)
            suffix = ".nii" if k == 0 else ".nii.gz"
            nib.save(nib.Nifti1Image(image, AFFINE), root / "images" / split / f"vol_{k}{suffix}")
            nib.save(nib.Nifti1Image(label, AFFINE), root / "labels" / split / f"vol_{k}{suffix}")
            k += 1
    return {"images": root / "images", "labels": root / "labels"}


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("nifti_data"))
