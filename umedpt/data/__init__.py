"""Datasets, loaders, the embedded synthetic default data and readers for real files.

The readers (:mod:`umedpt.data.readers`) load on first use, so ``umedpt`` commands that do not
read files do not pay for importing albumentations, pydicom and nibabel.
"""

from __future__ import annotations

import importlib
from typing import Any

from umedpt.data.datamodule import MultiTaskDataModule, TaskDataError
from umedpt.data.loading import EpochShuffleSampler, collate_cases

#: public names served lazily: name -> module
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "CocoDetectionDataset",
            "DataError",
            "FileDataset",
            "ImageFolderDataset",
            "ManifestDataset",
            "MedMNISTDataset",
            "NiftiSliceDataset",
            "SegmentationDataset",
            "read_image",
        ),
        "umedpt.data.readers",
    ),
    "Normalization": "umedpt.data.normalize",
    "StreamingTaskDataset": "umedpt.data.streaming",
    "CaseTransform": "umedpt.data.transforms",
}

__all__ = ["EpochShuffleSampler", "MultiTaskDataModule", "TaskDataError", "collate_cases", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umedpt.data' has no attribute {name!r}")
