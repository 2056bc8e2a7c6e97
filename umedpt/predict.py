"""Writing the predictions of ``lightning predict`` to disk, one file per task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class TaskPredictionWriter(BasePredictionWriter):
    """Save each task's predictions to ``<output_dir>/<task>.pt`` when ``predict`` ends.

    Classification and segmentation predictions are concatenated into one tensor
    (probabilities ``(N, C)`` / label masks ``(N, H, W)``); detection predictions stay a list
    of ``{boxes, scores, labels}`` dicts, one per image. The files hold only tensors, lists and
    dicts, so ``torch.load(path, weights_only=True)`` reads them. Modules without a ``tasks``
    mapping (the MLLM stage) are left to their own writers.

    Args:
        output_dir: where to write; ``None`` uses ``<log dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        if not trainer.is_global_zero or not isinstance(getattr(pl_module, "tasks", None), dict):
            return  # a module without umedpt tasks (e.g. the MLLM stage) writes its own predictions
        per_loader = predictions if predictions and isinstance(predictions[0], list) else [predictions]
        root = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        root.mkdir(parents=True, exist_ok=True)
        for outputs in per_loader:
            if not outputs:
                continue
            task = outputs[0]["task"]
            parts = [o["prediction"] for o in outputs]
            merged = torch.cat(parts) if torch.is_tensor(parts[0]) else [p for part in parts for p in part]
            torch.save(merged, root / f"{task}.pt")
        print(f"umedpt: predictions written to {root}")
