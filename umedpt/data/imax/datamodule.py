"""The data module of an IMAX manifest: image-centric batches, or one loader per task (DMAX).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from umedpt.data.datamodule import MultiTaskDataModule
from umedpt.data.imax.cases import (
    CaseBuilder,
    ImageCentricDataset,
    ManifestTaskDataset,
    collate_image_centric,
)
from umedpt.data.imax.manifest import FLAG_KEYS, ImageRecord, read_manifest
from umedpt.data.loading import EpochShuffleSampler, ResumableDataLoader
from umedpt.data.normalize import NormalizationSpec
from umedpt.data.transforms import ResizeMode, TransformSpec
from umedpt.device import batch_to_device
from umedpt.tasks import Task


class ImageCentricDataModule(MultiTaskDataModule):
    """Builds every task of ``tasks`` from one image-centric manifest.

    Training batches are ``{task: task_batch}``. With ``sampling="image"`` one loader draws
    images; every task batch holds the same images (with ``present``/``pseudo`` flags), so
    :class:`umedpt.image_centric.ImageCentricModule` encodes them once. With ``sampling="task"``
    each task draws its own images among those annotated for it (the decentralised mix, as
    :class:`MultiTaskDataModule`; batch size from each task's ``batch_size``). Validation and test
    use one loader per task over the images with a real (not pseudo) annotation of that task.

    Args:
        manifest: JSON-lines or CSV manifest (see the module docstring).
        tasks: the tasks (the CLI links the model's ``tasks`` here); annotations of
            other tasks in the manifest are ignored.
        sampling: ``"image"`` (image-centric batches) or ``"task"`` (one loader per task).
        batch_size: images per image-centric training batch.
        image_size: resize images, masks and boxes to this square size (``None``: as stored).
        channels: 3 or 1 image channels.
        mean: intensity mean subtracted after scaling to [0, 1].
        std: intensity standard deviation divided by.
        normalize: how stored values are scaled to [0, 1], as for the file readers (``unit``,
            the default: integers by their type's range, floats as in [0, 1]; ``auto``: 8-bit
            by its range, DICOM by its window, others by percentiles).
        transform: augmentation of the training images, a preset (``xray``, ``histology``, ...)
            or a list of albumentations specs (:mod:`umedpt.data.transforms`); every task's mask
            and boxes of an image move with it.
        resize: ``stretch`` (to a square) or ``letterbox`` (keep the aspect ratio, pad).
        ignore_index: mask value of unlabelled pixels (segmentation heads ignore it; default 255).
        num_workers: DataLoader worker processes.
        eval_batch_size: batch size of validation/test/predict loaders (``None``: ``batch_size``).
        seed: seed of the training shuffles.
    """

    def __init__(
        self,
        manifest: str,
        tasks: list[Task] | None = None,
        sampling: Literal["image", "task"] = "image",
        batch_size: int = 16,
        image_size: int | None = None,
        channels: int = 3,
        mean: float = 0.5,
        std: float = 0.25,
        ignore_index: int = 255,
        num_workers: int = 0,
        normalize: NormalizationSpec = "unit",
        transform: TransformSpec = "none",
        resize: ResizeMode = "stretch",
        eval_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            tasks=tasks, num_workers=num_workers, eval_batch_size=eval_batch_size or batch_size, seed=seed
        )
        if sampling not in ("image", "task"):
            raise ValueError(f"ImageCentricDataModule: sampling must be 'image' or 'task', got {sampling!r}")
        if batch_size < 1:
            raise ValueError(f"ImageCentricDataModule: batch_size must be >= 1, got {batch_size}")
        if channels not in (1, 3):
            raise ValueError(f"ImageCentricDataModule: channels must be 1 or 3, got {channels}")
        self.manifest = Path(manifest)
        self.sampling = sampling
        self.batch_size = batch_size
        self.preprocessing = {
            "image_size": image_size,
            "channels": channels,
            "mean": mean,
            "std": std,
            "ignore_index": ignore_index,
            "normalize": normalize,
            "resize": resize,
        }
        self.transform = transform
        # a bad normalisation or augmentation spec fails here, not in a DataLoader worker
        _ = CaseBuilder(self.manifest.parent, {}, transform=transform, train=True, **self.preprocessing).pipeline
        self.records: list[ImageRecord] | None = None
        self.image_dataset: ImageCentricDataset | None = None
        # what a later step (pseudo-labelling) needs to load images the same way
        self.save_hyperparameters({"manifest": str(manifest), **self.preprocessing})

    @property
    def builder(self) -> CaseBuilder:
        """Loads images and targets of the current task list the configured way, without augmentation."""
        return self.builder_for("val")

    def builder_for(self, split: str) -> CaseBuilder:
        """The case builder of ``split``: the training split draws the augmentations of ``transform``."""
        tasks = {t.name: t for t in self.tasks}
        return CaseBuilder(self.manifest.parent, tasks, **self.preprocessing, source=str(self.manifest),
                           transform=self.transform, train=split == "train")
    def load_records(self) -> list[ImageRecord]:
        """The manifest's records, read and validated against the tasks once."""
        if self.records is None:
            self.records = read_manifest(self.manifest, self.tasks)
        return self.records

    def build_dataset(self, task: Task, split: str) -> Dataset:
        """``task``'s view of ``split``: images annotated for it (val/test: real annotations only)."""
        records = [r for r in self.load_records() if r.split == split]
        if split != "train":
            records = [
                r for r in records if task.name in r.annotations and not r.annotations[task.name].pseudo
            ]
        dataset = ManifestTaskDataset(records, task.name, self.builder_for(split))
        if len(dataset) == 0:
            raise ValueError(
                f"task {task.name!r}: manifest {self.manifest} has no {split} image annotated for it"
            )
        if split == "train" and self.sampling == "task" and len(dataset) < task.batch_size:
            raise ValueError(
                f"task {task.name!r}: {len(dataset)} train images annotated, fewer than batch_size={task.batch_size}"
            )
        return dataset

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.sampling == "image" and self.image_dataset is None:
            names = set(self.builder.tasks)
            records = [r for r in self.load_records() if r.split == "train" and names & set(r.annotations)]
            if len(records) < self.batch_size:
                raise ValueError(
                    f"manifest {self.manifest}: {len(records)} annotated train images, fewer than "
                    f"batch_size={self.batch_size}"
                )
            self.image_dataset = ImageCentricDataset(records, self.builder_for("train"))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move tensors to ``device`` keeping shared tensors shared; ``present``/``pseudo`` stay on the CPU.

        An image tensor shared by several task batches is copied once, so the tasks still share
        it (and one encoder pass) on the device. The flags stay on the host, so selecting the
        annotated samples needs no device synchronisation.
        """
        return batch_to_device(batch, device, keep_on_host=FLAG_KEYS)

    def train_dataloader(self) -> Any:
        if self.sampling == "task":
            return super().train_dataloader()
        # resumable mid-epoch, worker seeds from the loader's own stream (as the per-task loaders)
        return ResumableDataLoader(
            self.image_dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.image_dataset), seed=self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_image_centric,
            generator=torch.Generator().manual_seed(self.seed),
        )
