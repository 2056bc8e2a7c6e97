"""Writing and reading generated answers (``lightning predict`` with :class:`GenerationWriter`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from umedpt.mllm.jsonl import read_jsonl


class GenerationWriter(Callback):
    """Write the records returned by ``MLLMModule.predict_step`` to a JSONL file when predict ends.

    Each line holds ``id``, ``dataset``, ``task``, ``instruction``, ``answer`` (the reference),
    ``prediction`` and ``routing`` (the image's mean routing weight per expert, or ``null``).
    ``umedpt mllm-evaluate <file>`` scores it.

    Args:
        output_path: the JSONL file; ``None`` writes ``<log dir>/predictions.jsonl``. With several
            processes each rank writes ``<stem>.rank<r>.jsonl``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        self.output_path = output_path
        self.records: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.records = []

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.records.extend(outputs)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(
            self.output_path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        )
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        print(f"umedpt: {len(self.records)} generated answers written to {path}")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Records of a predictions JSONL file, checked.

    Each needs ``task``, ``dataset`` and ``prediction`` strings (and ``answer``, when present, a
    string). Raises ``ValueError`` naming the file, the line and the record's ``id``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    records = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}" + (f" (id {record['id']!r})" if "id" in record else "")
        missing = [k for k in ("task", "dataset", "prediction") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        for key in ("task", "dataset", "prediction", "answer"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f"{where}: {key} must be a string, got {json.dumps(record[key])}")
        records.append(record)
    return records
