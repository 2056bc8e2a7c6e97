"""Tiny DICOM classification data written from pydicom's bundled ``CT_small.dcm``.

Usage: ``python tests/data/dicom/data.py OUT_DIR``; the tests call :func:`generate` into a temporary folder.

Files ``case_<k>.dcm`` hold 32x32 int16 pixels with ``RescaleSlope`` 1 and ``RescaleIntercept``
-1024 (so HU = stored - 1024) and a stored value ramp unique to each file; ``case_5`` has no file
extension (found by its ``DICM`` preamble) and ``case_6`` is ``MONOCHROME1`` with its own window.
``labels.csv`` lists ``path, split, label`` with labels ``0``/``1``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

SPLITS = ("train", "train", "train", "train", "val", "val", "test", "test")


def template() -> Path:
    """Path of pydicom's bundled ``CT_small.dcm`` (checked: asking for a file pydicom lacks downloads)."""
    path = get_testdata_file("CT_small.dcm")
    if path is None or not Path(path).is_file():
        raise FileNotFoundError("pydicom's bundled test file CT_small.dcm is missing")
    return Path(path)


def pixels(k: int) -> np.ndarray:
    """Stored values of file ``k``: a ramp from 24 * k to 24 * k + 3100 (int16)."""
    return (np.arange(32 * 32, dtype=np.int16).reshape(32, 32) * 3 + 24 * k).astype(np.int16)


def generate(root: Path) -> dict[str, Any]:
    """Write the DICOM files and ``labels.csv`` into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows, truth = [], []
    for k, split in enumerate(SPLITS):
        ds = pydicom.dcmread(template())
        ds.set_pixel_data(pixels(k), "MONOCHROME2", 16)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if k == 6:
            ds.PhotometricInterpretation = "MONOCHROME1"
            ds.WindowCenter, ds.WindowWidth = 500, 1000
        name = f"case_{k}" if k == 5 else f"case_{k}.dcm"
        ds.save_as(root / name, enforce_file_format=True)
        rows.append({"path": name, "split": split, "label": k % 2})
        truth.append({"path": root / name, "hu": pixels(k).astype(np.float32) - 1024, "label": k % 2})
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "split", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return {"manifest": root / "labels.csv", "truth": truth}


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("dicom_data"))
