"""Plots of the MLLM stage: routing weights of the connector experts per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_routing(
    weights: Mapping[str, Sequence[float]], path: str | Path, title: str = "routing weights"
) -> Path:
    """Heatmap PNG of the mean routing weight of each expert (columns) for each task (rows).

    Args:
        weights: task name -> mean weight per expert (all of the same length).
        path: PNG file to write (its directory is created).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(weights)
    if not tasks:
        raise ValueError("plot_routing: no routing weights to plot")
    values = np.array([list(weights[t]) for t in tasks], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * values.shape[1], 1.0 + 0.55 * len(tasks)))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(values.max())), aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        colour = "black" if value > 0.6 * values.max() else "white"
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(values.shape[1]), [f"E{k + 1}" for k in range(values.shape[1])])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
