"""Learning curves of a multi-task fit: per-task training losses and validation metrics, as PNG and JSON.

With one random task per step, ``train/loss`` jumps between tasks; what tells whether the
encoder learns is each task's own loss over the steps that trained it, and the validation
metrics during the run. :class:`LearningCurves` records both and, when fit ends, writes
``learning_curves.png`` (one panel of smoothed training losses, one of the primary
validation metric per task) and ``learning_curves.json`` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from umedpt.kinds import BUILTIN_KINDS, get_kind

__all__ = ["PRIMARY_METRIC", "LearningCurves", "smooth"]

#: the validation metric plotted per built-in task kind (``val/<task>/<metric>``; any kind's is
#: ``umedpt.kinds.get_kind(kind).metric``)
PRIMARY_METRIC: dict[str, str] = {name: get_kind(name).metric for name in BUILTIN_KINDS}


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (the first value is not shrunk to 0)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * value
        out.append(avg / (1.0 - weight**i))
    return out


class LearningCurves(Callback):
    """Record every task's training loss per step and the validation metrics; plot them at fit end.

    The losses are the scaled task losses (about 1 at initialisation, see ``Task.loss_scale``), so
    all tasks share one axis. They are copied to the host in blocks of ``flush_every`` steps
    (one transfer per block, no stall per step on an accelerator).

    Args:
        smoothing: weight of the exponential moving average of the plotted losses, in [0, 1).
        flush_every: steps between host copies of the recorded losses.
        filename: stem of the files written into the run directory.
    """

    def __init__(
        self, smoothing: float = 0.9, flush_every: int = 50, filename: str = "learning_curves"
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"LearningCurves: smoothing must be in [0, 1), got {smoothing}")
        if flush_every < 1:
            raise ValueError(f"LearningCurves: flush_every must be >= 1, got {flush_every}")
        self.smoothing = smoothing
        self.flush_every = flush_every
        self.filename = filename
        self.train: dict[str, list[tuple[int, float]]] = {}
        self.val: list[dict[str, Any]] = []
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []

    # ------------------------------------------------------------------ recording
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        losses = getattr(pl_module, "last_losses", None)
        if not losses:
            return
        self._pending.append((trainer.global_step, list(losses), torch.stack(list(losses.values())).detach()))
        if len(self._pending) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.cat([v.float().reshape(-1) for _, _, v in self._pending]).cpu().tolist()
        i = 0
        for step, names, _ in self._pending:
            for name in names:
                self.train.setdefault(name, []).append((step, values[i]))
                i += 1
        self._pending.clear()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the module's on_validation_epoch_end has logged this validation's metrics
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and torch.is_tensor(v) and v.numel() == 1
        }
        if metrics:
            self.val.append({"step": trainer.global_step, "metrics": metrics})

    # ------------------------------------------------------------------ output
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"train": {k: [list(p) for p in v] for k, v in self.train.items()}, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = {k: [tuple(p) for p in v] for k, v in state_dict.get("train", {}).items()}
        self.val = list(state_dict.get("val", []))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush()
        if not trainer.is_global_zero or not self.train:
            return
        root = Path(trainer.log_dir or trainer.default_root_dir)
        kinds = {name: task.kind for name, task in getattr(pl_module, "tasks", {}).items()}
        paths = self.write(root, kinds)
        print(f"umedpt: learning curves written to {paths[0]}")

    def write(self, root: Path, kinds: dict[str, str]) -> tuple[Path, Path]:
        """Write ``<filename>.json`` and ``<filename>.png`` into ``root``; returns their paths."""
        root.mkdir(parents=True, exist_ok=True)
        record = {"train_loss": {k: [list(p) for p in v] for k, v in self.train.items()}, "val": self.val}
        json_path = root / f"{self.filename}.json"
        json_path.write_text(json.dumps(record) + "\n")
        png_path = root / f"{self.filename}.png"
        self.plot(png_path, kinds)
        return png_path, json_path

    def plot(self, path: Path, kinds: dict[str, str]) -> None:
        """Smoothed per-task training losses (left) and the primary validation metric per task (right)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.train)
        cmap = plt.get_cmap("tab20")
        colours = {name: cmap(i % 20) for i, name in enumerate(names)}
        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(13, 5))
        for name in names:
            steps, values = zip(*self.train[name], strict=True)
            ax_loss.plot(steps, smooth(list(values), self.smoothing), color=colours[name], lw=1.2, label=name)
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel(f"task loss (scaled, EMA {self.smoothing})")
        ax_loss.set_title("training loss per task (1 = fresh head)")
        ax_loss.grid(alpha=0.3)
        plotted = False
        for name in names:
            metric = get_kind(kinds[name]).metric if name in kinds else ""
            key = f"val/{name}/{metric}"
            points = [(v["step"], v["metrics"][key]) for v in self.val if key in v["metrics"]]
            if points:
                steps, values = zip(*points, strict=True)
                ax_val.plot(
                    steps, values, "o-", color=colours[name], lw=1.2, ms=3, label=f"{name} ({metric})"
                )
                plotted = True
        ax_val.set_xlabel("optimizer step")
        ax_val.set_ylabel("validation metric")
        ax_val.set_title("validation: AUROC / Dice / mAP50 per task")
        ax_val.set_ylim(0.0, 1.0)
        ax_val.grid(alpha=0.3)
        if not plotted:
            ax_val.text(
                0.5, 0.5, "no validation during fit", ha="center", va="center", transform=ax_val.transAxes
            )
        handles, labels = ax_loss.get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
