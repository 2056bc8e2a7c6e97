"""Diagnostics of a model from its own data: per-task gradients measured during training (Lightning
callbacks) or from checkpoints (``umedpt diagnose``), written as JSON and plotted.

:func:`measure` draws a few fixed batches of every task, collects their gradients of a chosen
sub-module (the shared encoder by default) with :func:`umedpt.diagnostics.task_gradients` and
summarises them with :func:`umedpt.diagnostics.diagnose`: Uni-Med's GD / GM / tug-of-war
indexes, the statistics score, and IMAX's Fisher spectral entropy and dominant ratio.
:class:`InterferenceCallback` and :class:`FisherSpectrumCallback` run it at chosen steps or
phases of a fit.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from umedpt.data.loading import collate_cases
from umedpt.device import batch_to_device
from umedpt.diagnostics import CountSketch, diagnose, task_gradients
from umedpt.randomness import restore_rng_states, rng_states

__all__ = [
    "AUTO_SKETCH_BYTES",
    "AUTO_SKETCH_DIM",
    "DEFAULT_PHASES",
    "FisherSpectrumCallback",
    "draw_batches",
    "InterferenceCallback",
    "measure",
    "plot_interference",
    "plot_phases",
    "select_parameters",
]

#: ``sketch_dim="auto"``: full gradients up to this many bytes (as float64), else count sketches
AUTO_SKETCH_BYTES = 2 * 2**30
#: ``sketch_dim="auto"``: the sketch length beyond that (cosines off by about 0.0055)
AUTO_SKETCH_DIM = 65536
#: IMAX's four phases of training, as fractions of the run's optimizer steps
DEFAULT_PHASES: dict[str, float] = {"initial": 0.0, "early": 0.1, "mid": 0.5, "late": 1.0}


def select_parameters(model: nn.Module, parameters: str = "encoder") -> list[nn.Parameter]:
    """The trainable parameters of ``model``'s sub-module named ``parameters`` (``"encoder"``,
    ``"heads.ct_seg"``, ``"connector"``...; ``""`` for the whole model)."""
    try:
        module = model.get_submodule(parameters) if parameters else model
    except AttributeError as err:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"parameters: {type(model).__name__} has no sub-module {parameters!r} (top level: {names})") from err
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"parameters: {parameters!r} has no trainable parameters")
    return params


def _batches(dataset: Dataset, batch_size: int, num_batches: int, seed: int, device: torch.device) -> list[Any]:
    """The first ``num_batches`` batches of ``dataset`` in a seeded random order, on ``device``."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_cases,
        generator=torch.Generator().manual_seed(seed), drop_last=len(dataset) >= batch_size,
    )  # fmt: skip
    out = []
    for batch in loader:
        out.append(batch_to_device(batch, device))
        if len(out) == num_batches:
            break
    return out


def draw_batches(
    model: Any, datasets: Mapping[str, Dataset], num_batches: int = 8, seed: int = 0, batch_size: int | None = None
) -> dict[str, list[Any]]:
    """The first ``num_batches`` batches of every task's dataset in a ``seed``-ed random order, on
    the model's device (``batch_size``: ``None`` for each task's own)."""
    device = next(model.parameters()).device
    return {
        name: _batches(dataset, batch_size or model.tasks[name].batch_size, num_batches, seed, device)
        for name, dataset in datasets.items()
    }


def measure(
    model: Any,
    datasets: Mapping[str, Dataset],
    num_batches: int = 8,
    parameters: str = "encoder",
    sketch_dim: int | Literal["auto"] | None = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    batches: Mapping[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Every diagnostic of ``model`` (a :class:`~umedpt.MultiTaskModule`) on ``datasets``.

    Args:
        model: the model; measured in eval mode (no dropout or stochastic depth), its mode
            restored afterwards; gradients go through ``model.task_loss``.
        datasets: task name -> dataset of case dicts (e.g. a data module's training split).
        num_batches: batches per task (drawn in a fixed random order from ``seed``).
        parameters: the sub-module whose gradients are compared (:func:`select_parameters`).
        sketch_dim: keep each gradient as a :class:`~umedpt.diagnostics.CountSketch` of this
            length; ``None``: the full gradients (``num_batches x tasks x P`` floats); ``"auto"``:
            full up to :data:`AUTO_SKETCH_BYTES` of them, else sketches of :data:`AUTO_SKETCH_DIM`
            (swin_tiny's 28M encoder parameters x 17 tasks x 8 batches would be 30 GiB).
        batch_size: images per batch (``None``: each task's own ``batch_size``).
        batches: the batches of :func:`draw_batches`, drawn once and reused for every
            measurement of a run (then ``datasets``, ``seed`` and ``batch_size`` are not read).

    Returns:
        :func:`umedpt.diagnostics.diagnose`'s result plus ``parameters``, ``num_parameters``,
        ``sketch_dim`` and ``num_batches``.
    """
    params = select_parameters(model, parameters)
    size = sum(p.numel() for p in params)
    if sketch_dim == "auto":
        # the gradients kept, in float64 as the measures compute: sketch them when they would not fit
        full = size * num_batches * len(batches if batches is not None else datasets) * 8
        sketch_dim = AUTO_SKETCH_DIM if full > AUTO_SKETCH_BYTES else None
        if sketch_dim:
            print(f"umedpt diagnostics: {len(batches if batches is not None else datasets)} tasks x {num_batches} gradients of {size:,} parameters "
                  f"would take {full / 2**30:.1f} GiB; keeping count sketches of {sketch_dim} (cosines off by "
                  f"about {math.sqrt(2 / sketch_dim):.3f})", file=sys.stderr)  # fmt: skip
    sketch = CountSketch(size, sketch_dim, seed) if sketch_dim else None
    if batches is None:
        batches = draw_batches(model, datasets, num_batches, seed, batch_size)
    training = model.training
    model.eval()
    try:
        grads = task_gradients(model.task_loss, batches, params, num_batches, device="cpu", sketch=sketch)
    finally:
        model.train(training)
    result = diagnose(grads)
    result.update(parameters=parameters or "all", num_parameters=size, sketch_dim=sketch_dim, num_batches=num_batches)
    return result


def _save(fig: Any, path: str | Path, title: str) -> Path:
    """Write ``fig`` (with ``title`` above it, if any) as a PNG at ``path``."""
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_interference(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """GD and GM heatmaps with the task names, the tug-of-war bars and the statistics-score
    histogram of one :func:`measure` result, as a PNG."""
    from matplotlib.figure import Figure

    tasks = list(result["tasks"])
    n = len(tasks)
    fig = Figure(figsize=(16, 4.2 + 0.12 * n), layout="constrained")
    axes = fig.subplots(1, 4, width_ratios=[1, 1, 0.8, 0.8])
    for ax, key, label, (low, high) in (
        (axes[0], "gd", "GD[i, j]: how task j's directions\nmove task i (colour clipped at +-1)", (-1.0, 1.0)),
        (axes[1], "gm", "GM[i, j]: gradient-magnitude\nsimilarity", (0.0, 1.0)),
    ):
        matrix = torch.tensor(result[key], dtype=torch.float64)
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r" if key == "gd" else "viridis", vmin=low, vmax=high)
        ax.set_xticks(range(n), tasks, rotation=90, fontsize=7)
        ax.set_yticks(range(n), tasks, fontsize=7)
        ax.set_title(label, fontsize=9)
        if n <= 8:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    axes[2].barh(range(n), result["tug_of_war"], color="tab:blue")
    axes[2].set_yticks(range(n), tasks, fontsize=7)
    axes[2].invert_yaxis()
    axes[2].axvline(1.0, color="grey", lw=0.8, ls="--")
    axes[2].set_title("tug-of-war index\n(sum over j of GD * GM; own task alone: 1)", fontsize=9)
    score = result["statistics_score"]
    axes[3].hist(score, bins=40, range=(0.0, 1.0), color="tab:green")
    mean = result.get("statistics_score_mean", math.nan)
    axes[3].set_title(f"statistics score per parameter\n(mean {mean:.3f}; 1: all tasks agree)", fontsize=9)
    axes[3].set_xlabel("|sum_t g_t| / sum_t |g_t|")
    return _save(fig, path, title)


def plot_phases(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Spectral entropy and dominant ratio of the Fisher information per phase (one box of the
    tasks' values per phase, each task a dot; the all-tasks value as a cross), as a PNG."""
    from matplotlib.figure import Figure

    phases = list(results)
    fig = Figure(figsize=(4 + 1.1 * len(phases), 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "se", "spectral entropy SE"), (axes[1], "rho", "dominant ratio rho")):
        values = [[v[key] for name, v in results[p]["fisher"].items() if name != "all"] for p in phases]
        ax.boxplot(values, tick_labels=phases, showfliers=False)
        for k, row in enumerate(values, start=1):
            ax.scatter([k] * len(row), row, s=10, color="tab:blue", zorder=3)
        ax.scatter(range(1, len(phases) + 1), [results[p]["fisher"]["all"][key] for p in phases],
                   marker="x", color="tab:red", zorder=4, label="all tasks")  # fmt: skip
        ax.set_title(label, fontsize=9)
    axes[1].legend(fontsize=7)
    return _save(fig, path, title)


class _GradientDiagnostics(Callback):
    """Runs :func:`measure` at chosen optimizer steps of a fit, on the data module's training
    datasets, on rank 0; results go to ``<log dir>/<dirname>/`` and to the logger. The random
    streams are restored afterwards, so a fit with the callback trains exactly as without it."""

    name = "diagnostics"

    def __init__(
        self,
        steps: Sequence[int] | None = None,
        phases: Mapping[str, float] | None = None,
        num_batches: int = 8,
        parameters: str = "encoder",
        sketch_dim: int | Literal["auto"] | None = "auto",
        seed: int = 0,
        split: str = "train",
        dirname: str = "diagnostics",
    ) -> None:
        if steps is not None and phases is not None:
            raise ValueError(f"{type(self).__name__}: give steps or phases, not both")
        if num_batches < 1:
            raise ValueError(f"{type(self).__name__}: num_batches must be >= 1, got {num_batches}")
        for label, fraction in (phases or {}).items():
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{type(self).__name__}: phase {label!r} at {fraction}; phases are fractions in [0, 1]")
        self.steps = sorted({int(s) for s in steps}) if steps is not None else None
        self.phases = dict(phases) if phases is not None else (None if steps is not None else dict(DEFAULT_PHASES))
        self.num_batches, self.parameters, self.sketch_dim = num_batches, parameters, sketch_dim
        self.seed, self.split, self.dirname = seed, split, dirname
        #: label -> :func:`measure` result, in the order measured
        self.results: dict[str, dict[str, Any]] = {}
        self._due: dict[int, str] = {}
        self._batches: dict[str, list[Any]] | None = None

    def _schedule(self, trainer: Trainer) -> dict[int, str]:
        if self.steps is not None:
            return {s: f"step_{s}" for s in self.steps}
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        return {round(fraction * total): label for label, fraction in self.phases.items()}

    def directory(self, trainer: Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / self.dirname

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._due = self._schedule(trainer)
        if trainer.global_step in self._due:
            self._run(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step in self._due and self._due[step] not in self.results:
            self._run(trainer, pl_module, step)

    def _run(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if not trainer.is_global_zero:
            return
        label = self._due[step]
        datasets = trainer.datamodule.datasets[self.split]
        # the measurement's batches (augmentation) must not move the fit's random streams; they
        # are drawn once, so every step is measured on the same images
        states = rng_states()
        try:
            if self._batches is None:
                self._batches = draw_batches(pl_module, datasets, self.num_batches, self.seed)
            result = measure(pl_module, datasets, self.num_batches, self.parameters, self.sketch_dim,
                             batches=self._batches)  # fmt: skip
        finally:
            restore_rng_states(states)
        result.update(step=step, label=label)
        self.results[label] = result
        out = self.directory(trainer)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.name}.json").write_text(json.dumps({"results": self.results}, indent=1))
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.scalars(result), step=step)
        self.plot(out, label)

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def plot(self, out: Path, label: str) -> None:
        raise NotImplementedError


class InterferenceCallback(_GradientDiagnostics):
    """Uni-Med's tug-of-war between tasks at chosen steps (``steps=[0, 1000, 5000]``) or phases
    (default: initial / early / mid / late): logs ``diag/<task>/tug_of_war``,
    ``diag/<task>/grad_norm`` and ``diag/statistics_score``; writes ``interference.json`` and
    ``interference_<label>.png`` (:func:`plot_interference`) into ``<log dir>/diagnostics/``.

    Args:
        steps: optimizer steps to measure at (0: before the first step).
        phases: label -> fraction of the run's steps (used when ``steps`` is not given).
        num_batches: batches per task (Uni-Med samples 100; 8 already orders tasks clearly).
        parameters: sub-module whose gradients are compared (``encoder``).
        sketch_dim: :class:`~umedpt.diagnostics.CountSketch` length (``"auto"``: sketch only
            when the full gradients would exceed :data:`AUTO_SKETCH_BYTES`; ``None``: never).
        seed: seed of the batch draw (the same batches at every step).
        split: the data module's split the batches come from (``train``; ``val`` measures
            models trained on different data on the same images).
    """

    name = "interference"

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        out = {"diag/statistics_score": float(result["statistics_score_mean"])}
        for task, tow, norm in zip(result["tasks"], result["tug_of_war"], result["grad_norm"], strict=True):
            out[f"diag/{task}/tug_of_war"] = float(tow)
            out[f"diag/{task}/grad_norm"] = float(norm)
        return out

    def plot(self, out: Path, label: str) -> None:
        result = self.results[label]
        plot_interference(result, out / f"interference_{label}.png", f"{label} (step {result['step']})")


class FisherSpectrumCallback(_GradientDiagnostics):
    """IMAX's Fisher information summaries at phases of training (default: initial / early /
    mid / late, as fractions of the run): logs ``diag/fisher/<task>/se`` and ``.../rho`` (and
    ``all`` for every task's gradients together); writes ``fisher.json`` and ``fisher_phases.png``
    (:func:`plot_phases`) into ``<log dir>/diagnostics/``. Arguments as
    :class:`InterferenceCallback`'s.
    """

    name = "fisher"

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        return {
            f"diag/fisher/{task}/{key}": float(values[key])
            for task, values in result["fisher"].items()
            for key in ("se", "rho")
        }

    def plot(self, out: Path, label: str) -> None:
        plot_phases(self.results, out / "fisher_phases.png", "Fisher information of the task gradients")
