"""Manifest records as tensors: the images and each task's targets (:class:`CaseBuilder`), the
image-centric and per-task datasets, and the image-centric collate function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from umedpt.data.imax.manifest import ImageRecord, ManifestError
from umedpt.data.loading import collate_cases
from umedpt.data.normalize import Normalization
from umedpt.data.readers import read_image
from umedpt.tasks import Task


@dataclass
class CaseBuilder:
    """Turns manifest records into tensors: image, and each task's target at the image's size.

    Args:
        root: directory that relative paths start from.
        tasks: task name -> task.
        image_size: resize images (bilinear/area), masks (nearest) and boxes to this square
            size; ``None`` keeps the stored size.
        channels: 3 (grayscale repeated) or 1 (colour converted to luminance).
        mean, std: the image, scaled to [0, 1] by its integer range (floats as stored), becomes
            ``(x - mean) / std``.
        ignore_index: mask value of pixels without a label (also fills missing masks).
        source: the manifest, for error messages.
    """

    root: Path
    tasks: dict[str, Task]
    image_size: int | None = None
    channels: int = 3
    mean: float = 0.5
    std: float = 0.25
    ignore_index: int = 255
    source: str = "manifest"

    @functools.cached_property
    def normalization(self) -> Normalization:
        """The standardisation ``(x - mean) / std``, as the file readers apply it."""
        return Normalization(mean=self.mean, std=self.std)

    def image(self, record: ImageRecord) -> tuple[Tensor, tuple[int, int]]:
        """The normalised (C, H, W) image and the stored (H, W) size."""
        array = read_image(self.root / record.image)  # (H, W) or (H, W, 3 | 4), values as stored
        if array.ndim == 2:
            array = array[..., None]
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
        array = array[..., :3].astype(np.float32, copy=False)
        stored = (array.shape[0], array.shape[1])
        if self.image_size is not None and stored != (self.image_size, self.image_size):
            shrink = min(stored) >= 2 * self.image_size
            array = cv2.resize(
                array, (self.image_size,) * 2, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            )
            array = array.reshape(self.image_size, self.image_size, -1)
        if self.channels == 1 and array.shape[2] == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)[..., None]
        elif self.channels == 3 and array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        array = self.normalization.standardize(array)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), stored

    def target(
        self, record: ImageRecord, name: str, stored: tuple[int, int], size: tuple[int, int]
    ) -> dict[str, Any]:
        """Task ``name``'s target for ``record`` at ``size`` plus the ``present``/``pseudo`` flags.

        A missing annotation gives a placeholder (class 0, no positives, an all-ignored mask,
        no boxes) with ``present=False``; the module leaves such samples out of the task's loss.
        """
        task, a = self.tasks[name], record.annotations.get(name)
        kind = task.task_kind
        where = f"{self.source} line {record.line} ({record.id!r}), field 'annotations.{name}'"
        out: dict[str, Any] = {"present": a is not None, "pseudo": bool(a is not None and a.pseudo)}
        if a is None:
            out.update(kind.annotation_targets(None, task.num_classes, size, self.ignore_index))
            return out
        values = {f: getattr(a, f) for f in kind.annotation_fields}
        files = {f: self.root / values[f] for f in kind.file_fields}
        for f, path in files.items():
            values[f] = self._read_file(path, f"{where}.{f}'")
        try:
            targets = kind.annotation_targets(values, task.num_classes, stored, self.ignore_index)
        except ValueError as err:
            named = "".join(f" ({f} {path})" for f, path in files.items())
            raise ManifestError(f"{where}{named}: {err}") from err
        out.update(kind.resize_targets(targets, stored, size))
        return out

    @staticmethod
    def _read_file(path: Path, where: str) -> np.ndarray:
        """A file field's array (a mask), single channel."""
        try:
            array = read_image(path)
        except (OSError, ValueError) as err:
            raise ManifestError(f"{where}: cannot read {path}: {err}") from err
        return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


class ImageCentricDataset(Dataset):
    """Each item is one image with the targets of every task: ``{"image", "tasks": {name: target}}``.

    Targets carry the flags ``present`` (the image has this task's annotation) and ``pseudo``.
    Batch items with :func:`collate_image_centric`.
    """

    def __init__(self, records: Sequence[ImageRecord], builder: CaseBuilder) -> None:
        self.records = list(records)
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        image, stored = self.builder.image(record)
        size = (image.shape[1], image.shape[2])
        targets = {name: self.builder.target(record, name, stored, size) for name in self.builder.tasks}
        return {"image": image, "tasks": targets}


class ManifestTaskDataset(Dataset):
    """One task's view of a manifest: case dicts (image + target + ``pseudo`` flag) of its annotated images."""

    def __init__(self, records: Sequence[ImageRecord], task: str, builder: CaseBuilder) -> None:
        self.records = [r for r in records if task in r.annotations]
        self.task = task
        self.builder = builder
        self.num_classes = builder.tasks[task].num_classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        image, stored = self.builder.image(record)
        case = self.builder.target(record, self.task, stored, (image.shape[1], image.shape[2]))
        del case["present"]
        return {"image": image, **case}


def collate_image_centric(cases: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Batch :class:`ImageCentricDataset` items as ``{task: task_batch}``.

    Every task batch holds the SAME image tensor object (so the module encodes it once) plus the
    task's targets and the ``present``/``pseudo`` flags as bool tensors (B,).
    """
    try:
        image = torch.stack([c["image"] for c in cases])
    except RuntimeError as err:
        raise ValueError(f"images of one batch differ in size; set data image_size: {err}") from err
    batch = {}
    for name in cases[0]["tasks"]:
        task_batch = collate_cases([c["tasks"][name] for c in cases])
        task_batch["image"] = image
        batch[name] = task_batch
    return batch
