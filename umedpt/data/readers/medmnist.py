"""MedMNIST ``.npz`` files (MedMNIST v2 and MedMNIST+: 28, 64, 128 and 224 px)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from umedpt.data.normalize import NormalizationSpec
from umedpt.data.readers.base import SPLITS, FileDataset, Item, NonFinite
from umedpt.data.readers.image_io import ImageMeta
from umedpt.data.transforms import ResizeMode, TransformSpec
from umedpt.kinds import get_kind

__all__ = ["MedMNISTDataset"]


class MedMNISTDataset(FileDataset):
    """One split of a local MedMNIST ``.npz`` file (nothing is downloaded).

    The official layout holds ``train_images``, ``train_labels``, ``val_*`` and ``test_*``:
    images uint8 (N, H, W) or (N, H, W, 3); labels (N, 1) class indices, or (N, K) 0/1 for
    multi-label subsets such as ChestMNIST.

    Args:
        path: the ``.npz`` file, e.g. ``data/pathmnist_64.npz``.
        split: ``train``, ``val`` or ``test``.
        kind: ``auto`` (multilabel when labels have more than one column), ``classification``
            or ``multilabel``.
        num_classes: number of classes; None infers it (classification: largest label in any
            split + 1; multilabel: the label columns).
        class_names: optional names, one per class.
        image_size, transform, normalize, channels, resize, nonfinite: see
            :class:`~umedpt.data.readers.base.FileDataset`.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        kind: Literal["auto", "classification", "multilabel"] = "auto",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
    ) -> None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"MedMNIST file {file} not found; umedpt reads local files only (get e.g. "
                "pathmnist_64.npz from the MedMNIST release and give its path)"
            )
        with np.load(file, allow_pickle=False) as npz:
            keys = list(npz.files)
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in keys:
                    raise ValueError(
                        f"{file}: no array {key!r} (arrays present: {keys}); the MedMNIST layout has "
                        "train_images, train_labels, val_images, val_labels, test_images, test_labels"
                    )
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            every_split = [npz[f"{s}_labels"] for s in SPLITS if f"{s}_labels" in keys]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(
                f"{file}: {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3) "
                "(3D MedMNIST volumes are not supported)"
            )
        labels = labels.reshape(len(labels), -1)
        if len(labels) != len(images):
            raise ValueError(f"{file}: {len(images)} {split}_images but {len(labels)} {split}_labels")
        # "auto": one label column is a class index, several are 0/1 findings
        kind = {"auto": "multilabel" if labels.shape[1] > 1 else "classification"}.get(kind, kind)
        task_kind = get_kind(kind)
        if task_kind.label_columns is None:
            raise ValueError(f"{file}: kind {kind!r} has no label array form; use classification or multilabel")
        fewest, most = task_kind.label_columns
        if not fewest <= labels.shape[1] <= (most or labels.shape[1]):
            raise ValueError(f"{file}: {split}_labels has {labels.shape[1]} columns; {kind} needs {fewest}")
        super().__init__(split, kind, image_size=image_size, transform=transform, normalize=normalize,
                         channels=channels, resize=resize, nonfinite=nonfinite)
        self.path = file
        self.images = images
        if num_classes is None and class_names is None:
            num_classes = task_kind.array_num_classes(every_split)
        self.set_classes(num_classes, class_names)
        self.items = [
            Item(
                image=f"{file.name}:{split}_images[{i}]",
                label=task_kind.array_label(row),
                where=f"{file.name}:{split}_labels[{i}]",
                on_disk=False,
            )
            for i, row in enumerate(labels)
        ]

    def read(self, i: int) -> tuple[np.ndarray, ImageMeta]:
        """Image ``i`` of the split as stored (uint8)."""
        return self.images[i], ImageMeta()
