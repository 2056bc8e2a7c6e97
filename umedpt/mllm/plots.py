"""Plots of the MLLM stage: routing weights of the connector experts per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def text_only_note(weights: Mapping[str, Sequence[float]], expected: Sequence[str] = ()) -> str | None:
    """A caption naming the tasks that have no row: the text-only tasks (no image passes the
    connector) and any image task of ``expected`` without routing weights."""
    from umedpt.mllm.prompts import IMAGE_TASKS, TASK_IDENTIFIERS

    parts = []
    absent = [t for t in TASK_IDENTIFIERS if t not in IMAGE_TASKS and t not in weights]
    if absent:
        parts.append(f"no row for [{'], ['.join(absent)}]: text-only, no image tokens pass the connector")
    unrouted = [t for t in expected if t in IMAGE_TASKS and t not in weights]
    if unrouted:
        parts.append(f"no row for [{'], ['.join(unrouted)}]: no routing weights were recorded for it")
    return "; ".join(parts) or None


def plot_routing(
    weights: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "routing weights",
    note: str | None = None,
) -> Path:
    """Heatmap PNG of the mean routing weight of each expert (columns) for each task (rows).

    Args:
        weights: task name -> mean weight per expert (all of the same length).
        path: PNG file to write (its directory is created).
        title: figure title.
        note: a caption under the heatmap (e.g. :func:`text_only_note`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(weights)
    if not tasks:
        raise ValueError("plot_routing: no routing weights to plot")
    values = np.array([list(weights[t]) for t in tasks], dtype=float)
    height = 1.2 + 0.55 * len(tasks) + (0.4 if note else 0.0)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 + 0.9 * values.shape[1]), height))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(values.max())), aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        colour = "black" if value > 0.6 * values.max() else "white"
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(values.shape[1]), [f"E{k + 1}" for k in range(values.shape[1])])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("connector expert")
    ax.set_ylabel("task")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("mean routing weight")
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
