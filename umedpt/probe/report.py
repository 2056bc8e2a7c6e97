"""Probe reports: ``report.json`` (every number), ``report.md`` (tables) and ``report.png`` (curves)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of ``values``."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def summarise(runs: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """Per fraction (as a string key), mean and std of ``metric`` over the runs' seeds."""
    by_fraction: dict[float, list[float]] = {}
    for run in runs:
        by_fraction.setdefault(run["fraction"], []).append(run["metrics"][metric])
    return {repr(f): {**mean_std(v), "fraction": f} for f, v in sorted(by_fraction.items())}


def _cell(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def task_markdown(name: str, task: Mapping[str, Any]) -> str:
    """The Markdown section of one task: a fraction x encoder table, the scratch baseline, the gaps."""
    encoders = list(task["summary"])
    fractions = sorted({s["fraction"] for e in encoders for s in task["summary"][e].values()})
    lines = [
        f"### {name}",
        "",
        f"{task['kind']}, metric **{task['metric']}** (test split, {task['n_test']} images), "
        f"{task['method']} ({task['method_detail']}); training split {task['n_train']} images, mean ± std over seeds {task['seeds']}.",
        "",
        "| fraction | train images | " + " | ".join(encoders) + " |",
        "|---:|---:|" + "---:|" * len(encoders),
    ]
    for f in fractions:
        cells = [_cell(task["summary"][e].get(repr(f))) for e in encoders]
        lines.append(f"| {_percent(f)} | {task['n_per_fraction'][repr(f)]} | " + " | ".join(cells) + " |")
    scratch = task.get("scratch")
    low = repr(fractions[0])
    if scratch:
        budget = scratch["budget"]
        lines += [
            "",
            f"**scratch@100%** (same architecture, random init, trained end to end on all "
            f"{task['n_train']} training images for {budget['steps']} steps of {budget['batch_size']}, "
            f"lr {budget['encoder_lr']:g} encoder / {budget['lr']:g} head): {_cell(scratch)}",
        ]
    lines.append("")
    for e in encoders:
        at_low = task["summary"][e][low]["mean"]
        gaps = [
            f"{other} {at_low - task['summary'][other][low]['mean']:+.3f}" for other in encoders if other != e
        ]
        if scratch:
            gaps.append(f"scratch@100% {at_low - scratch['mean']:+.3f}")
        lines.append(f"- {e}@{_percent(fractions[0])} = {at_low:.3f}; difference to " + ", ".join(gaps))
    return "\n".join(lines) + "\n"


def markdown(report: Mapping[str, Any]) -> str:
    """The whole Markdown report."""
    head = [
        "# umedpt probe report",
        "",
        "Encoders: " + ", ".join(f"`{n}` ({e['source']})" for n, e in report["encoders"].items()) + ".",
        f"Features: {report['feature_cache']['misses']} extracted, {report['feature_cache']['hits']} from the "
        f"cache; total time {report['timing']['total_s']:.1f} s.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(task_markdown(n, t) for n, t in report["tasks"].items())


def plot(report: Mapping[str, Any], path: str | Path) -> Path:
    """Metric vs training fraction (log x), one line per encoder with std error bars, per task."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    tasks = report["tasks"]
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (name, task) in zip(axes, tasks.items(), strict=False):
        for i, (encoder, summary) in enumerate(task["summary"].items()):
            stats = sorted(summary.values(), key=lambda s: s["fraction"])
            ax.errorbar(
                [s["fraction"] for s in stats],
                [s["mean"] for s in stats],
                yerr=[s["std"] for s in stats],
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=encoder,
            )
        scratch = task.get("scratch")
        if scratch:
            ax.axhline(scratch["mean"], color="0.3", ls="--", label="scratch@100%")
            ax.axhspan(
                scratch["mean"] - scratch["std"], scratch["mean"] + scratch["std"], color="0.3", alpha=0.1
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
        ax.set_xlabel("fraction of the training split")
        ax.set_ylabel(f"test {task['metric']}")
        ax.set_title(f"{name}: {task['method']}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_report(report: Mapping[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "markdown": directory / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(report))
    paths["plot"] = plot(report, directory / "report.png")
    return paths
