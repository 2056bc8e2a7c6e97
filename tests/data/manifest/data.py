"""Tiny classification data as a CSV manifest and as an image folder.

Usage: ``python tests/data/manifest/data.py OUT_DIR``; the tests call :func:`generate` into a temporary folder.

``labels.csv`` has columns ``path, split, diagnosis`` (class names ``benign``, ``malignant``,
``normal``), three 0/1 finding columns and ``findings`` (the same findings joined by ``;``).
Images are 32x40 (H x W): 8-bit grey PNG, 8-bit RGB PNG, 16-bit grey PNG and 16-bit TIFF, each a
flat field with a unique value. ``folder/<split>/<class>/`` holds the same images by class.
With ``broken=True`` the manifest gets a row for a missing file and one for a corrupt PNG.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CLASSES = ("benign", "malignant", "normal")
FINDINGS = ("calcification", "mass", "nodule")
SIZES = {"train": 6, "val": 3, "test": 3}


def _image(kind: int, value: int) -> tuple[np.ndarray, str]:
    """A 32x40 flat image in one of four storage kinds, and its file suffix."""
    if kind == 0:
        return np.full((32, 40), value, np.uint8), ".png"
    if kind == 1:
        return np.full((32, 40, 3), (value, 255 - value, 7), np.uint8), ".png"
    if kind == 2:
        return np.full((32, 40), 1000 + 257 * value, np.uint16), ".png"
    return np.full((32, 40), 60000 - 211 * value, np.uint16), ".tif"


def generate(root: Path, broken: bool = False) -> dict[str, Any]:
    """Write ``images/``, ``labels.csv`` and ``folder/`` into ``root``; return paths and labels per split."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, truth = [], {}
    n = 0
    for split, count in SIZES.items():
        truth[split] = []
        for _ in range(count):
            image, suffix = _image(n % 4, 3 + 11 * n)
            name = f"images/case_{n:03d}{suffix}"
            cv2.imwrite(str(root / name), image if image.ndim == 2 else image[..., ::-1])  # OpenCV writes BGR
            label = CLASSES[n % 3]
            findings = [f for k, f in enumerate(FINDINGS) if (n >> k) & 1]
            rows.append({"path": name, "split": split, "diagnosis": label, "findings": ";".join(findings),
                         **{f: int(f in findings) for f in FINDINGS}})
            truth[split].append({"path": root / name, "label": CLASSES.index(label), "image": image,
                                 "findings": [int(f in findings) for f in FINDINGS]})
            folder = root / "folder" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, folder / Path(name).name)
            n += 1
    if broken:
        (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        for name in ("images/missing.png", "images/corrupt.png"):
            rows.append({"path": name, "split": "train", "diagnosis": "normal", "findings": "",
                         **dict.fromkeys(FINDINGS, 0)})
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"manifest": root / "labels.csv", "folder": root / "folder", "truth": truth}


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("manifest_data"))
