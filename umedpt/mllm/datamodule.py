"""InstructionDataModule: instruction JSONL files (or the synthetic default) as one-dataset batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from umedpt.data.datamodule import STAGE_SPLITS as TASK_STAGE_SPLITS
from umedpt.data.loading import ResumableDataLoader
from umedpt.mllm.data import DatasetBatchSampler, InstructionDataset, collate_instructions, read_records
from umedpt.mllm.synthetic import generate_instructions

DEFAULT_SYNTHETIC_IMAGES: dict[str, int] = {"train": 192, "val": 8, "test": 16}
#: splits each Lightning stage reads: those of :data:`umedpt.data.datamodule.STAGE_SPLITS`, except
#: that predict reads the instruction file's own ``predict`` split
STAGE_SPLITS: dict[str, tuple[str, ...]] = {**TASK_STAGE_SPLITS, "predict": ("predict",)}


class InstructionDataModule(LightningDataModule):
    """Serves instruction data in batches of one dataset each (so one task per batch).

    Training batches pick a dataset by ``sampling_ratios``; evaluation and prediction go through
    every dataset in order. Without any file the data are generated from the synthetic worlds
    into ``synthetic_dir`` (train/val/test JSONL and ``templates.json``; reused while the
    generator settings stay the same).

    Args:
        train_file: training JSONL (see :mod:`umedpt.mllm.data` for the record format).
        val_file: validation JSONL (optional).
        test_file: test JSONL.
        predict_file: JSONL to generate answers for (default: ``test_file``).
        image_root: directory of relative image paths.
        image_size: images are resized to ``image_size`` x ``image_size``.
        batch_size: training batch size.
        eval_batch_size: batch size of validation, test and predict (default ``batch_size``).
        num_workers: DataLoader worker processes.
        sampling_ratios: training sampling ratio per dataset name (unlisted: 1.0); ``None``
            samples datasets in proportion to their sizes.
        templates: template pools per dataset name; update those of ``templates.json`` found
            beside ``train_file``.
        batches_per_epoch: training batches per epoch (default: records / batch_size).
        seed: seed of the training order.
        synthetic_dir: where the synthetic default data are written.
        synthetic_images: scenes per split and world of the synthetic default.
        synthetic_styles: synthetic worlds of the default data.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        image_root: str | None = None,
        image_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        sampling_ratios: dict[str, float] | None = None,
        templates: dict[str, list[str]] | None = None,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        synthetic_dir: str = "runs/mllm/data",
        synthetic_images: dict[str, int] | None = None,
        synthetic_styles: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.synthetic = all(f is None for f in (train_file, val_file, test_file, predict_file))
        if self.synthetic:
            root = Path(synthetic_dir)
            train_file, val_file, test_file = (str(root / f"{s}.jsonl") for s in ("train", "val", "test"))
        self.files: dict[str, str | None] = {
            "train": train_file,
            "val": val_file,
            "test": test_file,
            "predict": predict_file or test_file,
        }
        self.datasets: dict[str, InstructionDataset] = {}

    def prepare_data(self) -> None:
        """Generate the synthetic default data unless the same settings already wrote them."""
        if not self.synthetic:
            return
        settings = {
            "num_images": self.hparams.synthetic_images or DEFAULT_SYNTHETIC_IMAGES,
            "styles": self.hparams.synthetic_styles or ["radiograph", "histology"],
            "image_size": self.hparams.image_size,
            "seed": self.hparams.seed,
        }
        root = Path(self.hparams.synthetic_dir)
        manifest = root / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()) == settings:
            return
        generate_instructions(root, **settings)
        manifest.write_text(json.dumps(settings, indent=1) + "\n")

    def _templates(self) -> dict[str, list[str]]:
        pools: dict[str, list[str]] = {}
        if self.files["train"] is not None:
            beside = Path(self.files["train"]).parent / "templates.json"
            if beside.is_file():
                pools.update(json.loads(beside.read_text()))
        pools.update(self.hparams.templates or {})
        return pools

    def setup(self, stage: str) -> None:
        templates = self._templates()
        for split in STAGE_SPLITS.get(stage, ()):
            path = self.files[split]
            if path is None or split in self.datasets:
                continue
            self.datasets[split] = InstructionDataset(
                read_records(path),
                image_size=self.hparams.image_size,
                image_root=self.hparams.image_root,
                templates=templates,
                resample_instructions=split == "train",
            )
        if stage == "fit" and "train" not in self.datasets:
            raise ValueError("InstructionDataModule: fit needs train_file")

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"InstructionDataModule: no {split} data (set {split}_file)")
        dataset = self.datasets[split]
        sampler = DatasetBatchSampler(
            [r["dataset"] for r in dataset.records],
            self.hparams.batch_size if train else self.hparams.eval_batch_size or self.hparams.batch_size,
            shuffle=train,
            ratios=self.hparams.sampling_ratios if train else None,
            num_batches=self.hparams.batches_per_epoch if train else None,
            seed=self.hparams.seed,
        )
        workers = self.hparams.num_workers
        # training: resumable mid-epoch, worker seeds from the loader's own stream
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=None,  # the sampler yields whole batches
            sampler=sampler,
            collate_fn=collate_instructions,
            num_workers=workers,
            persistent_workers=train and workers > 0,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def task_batches(self, count: int, max_epochs: int = 20) -> dict[str, list[dict[str, Any]]]:
        """``count`` training batches of every task with images, in the training loader's order
        (text-only tasks do not reach the connector): the batches whose connector gradients the
        diagnostics compare. Tasks that do not reach ``count`` within ``max_epochs`` are left out."""
        if count < 1:
            raise ValueError(f"task_batches: count must be >= 1, got {count}")
        out: dict[str, list[dict[str, Any]]] = {}
        for _ in range(max_epochs):
            for batch in self.train_dataloader():
                if batch["image"] is not None and len(out.setdefault(batch["task"], [])) < count:
                    out[batch["task"]].append(batch)
            if out and all(len(b) == count for b in out.values()):
                break
        return {t: b for t, b in sorted(out.items()) if len(b) == count}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
