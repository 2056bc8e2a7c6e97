"""Manifest records as tensors: the images and each task's targets (:class:`CaseBuilder`), the
image-centric and per-task datasets, and the image-centric collate function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from umedpt.data.case import CasePipeline
from umedpt.data.imax.manifest import ImageRecord, ManifestError
from umedpt.data.loading import collate_cases
from umedpt.data.normalize import Normalization, NormalizationSpec
from umedpt.data.readers import load_image, read_image
from umedpt.data.transforms import ResizeMode, TransformSpec
from umedpt.tasks import Task


@dataclass
class CaseBuilder:
    """Turns manifest records into cases: the image and each task's target, through the same
    :class:`~umedpt.data.case.CasePipeline` as the file readers (scale, channels, resize and
    augment with every task's mask and boxes in one draw, standardise).

    Args:
        root: directory that relative paths start from.
        tasks: task name -> task.
        image_size: resize images, masks (nearest) and boxes to this square size; ``None`` keeps
            the stored size.
        channels: 3 (grayscale repeated) or 1 (colour converted to luminance).
        mean, std: the image, scaled to [0, 1] (see ``normalize``), becomes ``(x - mean) / std``.
        ignore_index: mask value of pixels without a label (also fills missing masks).
        source: the manifest, for error messages.
        normalize: how stored values are scaled to [0, 1], as for the readers
            (:class:`~umedpt.data.normalize.Normalization`; ``unit``, the default: integers by
            their type's range, floats as in [0, 1]); its mean and std are ``mean``, ``std``.
        transform: augmentation preset or list (:mod:`umedpt.data.transforms`), applied when ``train``.
        resize: ``stretch`` or ``letterbox``.
        train: draw the random augmentations (the training split).
    """

    root: Path
    tasks: dict[str, Task]
    image_size: int | None = None
    channels: int = 3
    mean: float = 0.5
    std: float = 0.25
    ignore_index: int = 255
    source: str = "manifest"
    normalize: NormalizationSpec = "unit"
    transform: TransformSpec = "none"
    resize: ResizeMode = "stretch"
    train: bool = False

    @functools.cached_property
    def pipeline(self) -> CasePipeline:
        """The readers' case pipeline with this builder's settings."""
        scaling = replace(Normalization.from_spec(self.normalize), mean=self.mean, std=self.std)
        return CasePipeline(
            scaling, self.channels, self.image_size, self.transform, self.resize, train=self.train,
            boxes=any("boxes" in t.task_kind.target_keys for t in self.tasks.values()),
            ignore_index=self.ignore_index,
        )

    @property
    def normalization(self) -> Normalization:
        """The scaling and standardisation, as the file readers apply them."""
        return self.pipeline.normalization

    def image(self, record: ImageRecord) -> tuple[Tensor, tuple[int, int]]:
        """The normalised (C, H, W) image and the stored (H, W) size."""
        array, meta = self._load(record)
        return self.pipeline(array, meta).image, (array.shape[0], array.shape[1])

    def case(self, record: ImageRecord, names: Sequence[str]) -> tuple[Tensor, dict[str, dict[str, Any]]]:
        """The image and the targets of the tasks ``names`` (each with its ``present``/``pseudo``
        flags), moved together by one draw of the pipeline.

        A missing annotation gives a placeholder (class 0, no positives, an all-ignored mask,
        no boxes) with ``present=False``; the module leaves such samples out of the task's loss.
        """
        array, meta = self._load(record)
        stored = (array.shape[0], array.shape[1])
        targets = {name: self._stored_target(record, name, stored) for name in names}
        masks = {n: np.asarray(t["mask"]) for n, t in targets.items() if "mask" in t}
        boxes = {n: (np.asarray(t["boxes"]), np.asarray(t["box_labels"])) for n, t in targets.items() if "boxes" in t}
        case = self.pipeline(array, meta, masks, boxes)
        size = (case.image.shape[1], case.image.shape[2])
        for name, target in targets.items():
            if name in case.masks:
                target["mask"] = torch.from_numpy(case.masks[name])
            if name in case.boxes:
                target["boxes"], target["box_labels"] = (torch.from_numpy(a) for a in case.boxes[name])
            if name not in case.masks and name not in case.boxes:  # image-level (or a plug-in kind's own)
                targets[name] = self.tasks[name].task_kind.resize_targets(target, stored, size)
        return case.image, targets

    def target(self, record: ImageRecord, name: str, *_: Any) -> dict[str, Any]:
        """Task ``name``'s target of ``record`` with its flags, as :meth:`case` gives it (the stored
        and output sizes that earlier versions took are implied by the record and the settings)."""
        return self.case(record, [name])[1][name]

    def _load(self, record: ImageRecord) -> tuple[np.ndarray, Any]:
        path = self.root / record.image
        try:
            return load_image(path)
        except (OSError, ValueError) as err:
            raise ManifestError(f"{self.source} line {record.line} ({record.id!r}), field 'image': cannot read {path}: {err}") from err

    def _stored_target(self, record: ImageRecord, name: str, stored: tuple[int, int]) -> dict[str, Any]:
        """Task ``name``'s target for ``record`` at the stored size, with its flags."""
        task, a = self.tasks[name], record.annotations.get(name)
        kind = task.task_kind
        where = f"{self.source} line {record.line} ({record.id!r}), field 'annotations.{name}'"
        out: dict[str, Any] = {"present": a is not None, "pseudo": bool(a is not None and a.pseudo)}
        if a is None:
            out.update(kind.annotation_targets(None, task.num_classes, stored, self.ignore_index))
            return out
        values = {f: getattr(a, f) for f in kind.annotation_fields}
        files = {f: self.root / values[f] for f in kind.file_fields}
        for f, path in files.items():
            values[f] = self._read_file(path, f"{where}.{f}'")
        try:
            out.update(kind.annotation_targets(values, task.num_classes, stored, self.ignore_index))
        except ValueError as err:
            named = "".join(f" ({f} {path})" for f, path in files.items())
            raise ManifestError(f"{where}{named}: {err}") from err
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
        image, targets = self.builder.case(self.records[i], list(self.builder.tasks))
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
        image, targets = self.builder.case(self.records[i], [self.task])
        case = targets[self.task]
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
