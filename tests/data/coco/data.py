"""Tiny COCO detection data: RGB PNG images with bright squares and ``instances_<split>.json``.

Usage: ``python tests/data/coco/data.py OUT_DIR``; the tests call :func:`generate` into a temporary folder.

Images are 64x80 (H x W); each box covers a bright rectangle (category ``nodule`` = id 3 red,
``mass`` = id 7 green: the ids are not contiguous). Every third image and the last of every split have no
annotation; one crowd annotation exists (left out by default). With ``broken=True`` the
train file gets a box reaching beyond the image and a box of zero width.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIZES = {"train": 4, "val": 2, "test": 2}
CATEGORIES = [{"id": 7, "name": "mass"}, {"id": 3, "name": "nodule"}]
COLOURS = {3: (255, 40, 40), 7: (40, 255, 40)}
HEIGHT, WIDTH = 64, 80


def boxes_of(k: int) -> list[tuple[int, list[float]]]:
    """``(category id, [x, y, w, h])`` of image ``k`` (none for every third image)."""
    if k % 3 == 2:
        return []
    return [(3, [4.0 + 3 * k, 6.0 + 2 * k, 12.0, 10.0]), (7, [40.0 + 2 * k, 30.0, 20.0, 16.0 + k])]


def generate(root: Path, broken: bool = False) -> dict[str, Any]:
    """Write ``images/<split>/`` and ``instances_<split>.json`` into ``root``."""
    truth: dict[str, list[list[tuple[int, list[float]]]]] = {}
    ann_id, k = 1, 0
    for split, count in SIZES.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        truth[split] = []
        for j in range(count):
            image = np.full((HEIGHT, WIDTH, 3), 20 + k, np.uint8)  # unique background: no duplicates
            boxes = boxes_of(k) if j < count - 1 else []
            for category, (x, y, w, h) in boxes:
                image[int(y) : int(y + h), int(x) : int(x + w)] = COLOURS[category]
                annotations.append({"id": ann_id, "image_id": 100 + k, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                ann_id += 1
            cv2.imwrite(str(root / "images" / split / f"img_{k}.png"), image[..., ::-1])
            images.append({"id": 100 + k, "file_name": f"img_{k}.png", "height": HEIGHT, "width": WIDTH})
            truth[split].append(boxes)
            k += 1
        if split == "train":
            annotations.append({"id": ann_id, "image_id": 100, "category_id": 3, "bbox": [0, 0, 8, 8],
                                "area": 64, "iscrowd": 1})
            ann_id += 1
            if broken:
                annotations.append({"id": 900, "image_id": 101, "category_id": 3, "bbox": [70, 50, 30, 30],
                                    "area": 900, "iscrowd": 0})
                annotations.append({"id": 901, "image_id": 101, "category_id": 7, "bbox": [10, 10, 0, 5],
                                    "area": 0, "iscrowd": 0})
        data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / f"instances_{split}.json").write_text(json.dumps(data))
    return {"annotations": str(root / "instances_{split}.json"), "images": str(root / "images" / "{split}"),
            "truth": truth}


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("coco_data"))
