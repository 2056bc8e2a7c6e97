"""What a run tells the person (and the script) who started it: step progress and metrics files.

:class:`StepProgressBar` counts optimizer steps (``step 1240/5000``) when a fit is bounded by
``max_steps``, instead of Lightning's epochs, which mean little with one random task per step.
:class:`MetricsReport` prints the compact per-task table after ``validate`` and ``test`` (fit
prints its own at the end) and writes the metrics of every fit, validate and test into the run
directory as ``metrics_<split>.json`` and ``metrics_<split>.csv``, so scripts never parse the
terminal.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["MetricsReport", "StepProgressBar", "metrics_by_task", "run_dir"]


def run_dir(trainer: Trainer) -> Path:
    """The directory of this run: the logger's version folder, else ``default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def metrics_by_task(logged: dict[str, Any], split: str, task_names: list[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from logged keys ``<split>/<task>/<metric>`` (scalars only)."""
    out: dict[str, dict[str, float]] = {}
    for name in task_names:
        prefix = f"{split}/{name}/"
        values = {k[len(prefix) :]: float(v) for k, v in logged.items() if k.startswith(prefix)}
        if values:
            out[name] = dict(sorted(values.items()))
    return out


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting optimizer steps of the whole fit when ``max_steps`` bounds it.

    The bar reads ``step 1240/5000`` with tqdm's rate and ETA, across epochs (a new epoch does not
    restart it). Without ``max_steps`` (epoch-bounded fits) the training bar is Lightning's.
    Validation, test and predict bars name the task (``Validation ct_seg``) instead of the
    dataloader index.
    """

    @staticmethod
    def _task(pl_module: LightningModule, dataloader_idx: int) -> str:
        names = getattr(pl_module, "task_names", None)
        if isinstance(names, list) and dataloader_idx < len(names):
            return str(names[dataloader_idx])
        return f"DataLoader {dataloader_idx}"

    def _start_eval_bar(self, bar: Any, desc: str, total: Any, pl_module: LightningModule, idx: int) -> None:
        """Lightning's per-dataloader reset of an evaluation bar, described by the task's name."""
        bar.reset()
        bar.total = convert_inf(total)
        bar.initial = 0
        bar.set_description(f"{desc} {self._task(pl_module, idx)}")

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            desc = self.sanity_check_description if trainer.sanity_checking else self.validation_description
            total = self.total_val_batches_current_dataloader
            self._start_eval_bar(self.val_progress_bar, desc, total, pl_module, dataloader_idx)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            total = self.total_test_batches_current_dataloader
            self._start_eval_bar(self.test_progress_bar, self.test_description, total, pl_module, dataloader_idx)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            total = self.total_predict_batches_current_dataloader
            self._start_eval_bar(
                self.predict_progress_bar, self.predict_description, total, pl_module, dataloader_idx
            )

    def _counts_steps(self, trainer: Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_start(trainer, pl_module)
            return
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step  # resumed runs start where they were
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("step")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if step - bar.n >= self.refresh_rate or step >= trainer.max_steps:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class MetricsReport(Callback):
    """Compact per-task tables in the terminal and ``metrics_<split>.json`` / ``.csv`` in the run directory.

    After ``validate`` and ``test`` the module's per-task table is printed (Lightning's own tables
    are switched off by the CLI). After every validation of a fit, and after validate and test,
    the metrics are written: JSON ``{"split", "stage", "step", "epoch", "tasks": {task: {"kind",
    "metrics": {name: value}}}}`` and a CSV with one row per task and metric
    (``task,kind,metric,value``). Later validations of a fit overwrite the files: they hold the
    last one.
    """

    def _write(self, trainer: Trainer, pl_module: LightningModule, split: str) -> Path | None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return None
        tasks = getattr(pl_module, "tasks", None)
        if not isinstance(tasks, dict):
            return None
        found = metrics_by_task(trainer.callback_metrics, split, list(tasks))
        if not found:
            return None
        root = run_dir(trainer)
        root.mkdir(parents=True, exist_ok=True)
        record = {
            "split": split,
            "stage": trainer.state.fn.value if trainer.state.fn else None,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "tasks": {name: {"kind": tasks[name].kind, "metrics": values} for name, values in found.items()},
        }
        path = root / f"metrics_{split}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        with (root / f"metrics_{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "kind", "metric", "value"])
            for name, values in found.items():
                for metric, value in values.items():
                    writer.writerow([name, tasks[name].kind, metric, f"{value:.6g}"])
        return path

    def _report(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        path = self._write(trainer, pl_module, split)
        if path is None or trainer.state.fn == TrainerFn.FITTING:
            return
        table = pl_module.metrics_table(split) if hasattr(pl_module, "metrics_table") else ""
        if table:
            print(table)
        print(f"umedpt: metrics written to {path} and {path.with_suffix('.csv')}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")
