"""Shared pieces of the benchmark scripts: recipes, models, batches, memory readings, results.

A *recipe* is the model and data of a config stack (``quick``: ``configs/umedpt.yaml`` +
``configs/quick.yaml``; ``full``: ``configs/umedpt.yaml``), read with OmegaConf so a benchmark
can build the model for any subset of the recipe's tasks.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPES: dict[str, list[str]] = {
    "quick": ["configs/umedpt.yaml", "configs/quick.yaml"],
    "full": ["configs/umedpt.yaml"],
}


def load_recipe(recipe: str) -> dict[str, Any]:
    """The merged YAML of a recipe as a plain dict (keys ``trainer``, ``model``, ``data``)."""
    from omegaconf import OmegaConf

    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    merged = OmegaConf.merge(*[OmegaConf.load(ROOT / c) for c in RECIPES[recipe]])
    return OmegaConf.to_container(merged, resolve=True)


#: the self-supervised tasks a benchmark may add to a recipe's by name (``configs/ssl_quick.yaml``)
SSL_CONFIG = "configs/ssl_quick.yaml"


def recipe_tasks(recipe: str) -> list[Any]:
    """The recipe's task specs (:class:`umedpt.Task`)."""
    from umedpt.tasks import as_task

    return [as_task(t) for t in load_recipe(recipe)["model"]["tasks"]]


def ssl_tasks() -> list[Any]:
    """The self-supervised task specs of :data:`SSL_CONFIG` (``mim`` and ``feature_mim`` per world)."""
    from omegaconf import OmegaConf

    from umedpt.tasks import as_task

    config = OmegaConf.to_container(OmegaConf.load(ROOT / SSL_CONFIG), resolve=True)
    return [as_task(t) for t in config["model"]["tasks"]]


def select_tasks(recipe: str, names: list[str] | None = None) -> list[Any]:
    """The tasks ``names`` (default: all the recipe's), in that order: the recipe's tasks and, by
    name, the self-supervised tasks of :func:`ssl_tasks`."""
    tasks = recipe_tasks(recipe)
    if names is None:
        return tasks
    pool = {t.name: t for t in [*tasks, *ssl_tasks()]}
    unknown = [n for n in names if n not in pool]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown} in recipe {recipe!r} and {SSL_CONFIG}")
    return [pool[n] for n in names]


def build_model(recipe: str, names: list[str] | None = None, **overrides: Any) -> Any:
    """The recipe's :class:`umedpt.MultiTaskModule` with only the tasks ``names`` (default all)."""
    from umedpt import MultiTaskModule, SwinEncoder

    cfg = load_recipe(recipe)["model"]
    tasks = select_tasks(recipe, names)
    encoder = SwinEncoder(**cfg.get("encoder", {}).get("init_args", {}))
    kwargs = {k: v for k, v in cfg.items() if k not in ("tasks", "encoder")}
    # benchmarks train every task in every step, whatever subset the recipe samples, with one AdamW
    # (the plain loops they compare against use AdamW; per-task moments are measured by learning.py)
    kwargs.update(export_encoder=False, tasks_per_step=None, moments="shared")
    kwargs.update(overrides)
    return MultiTaskModule(tasks=tasks, encoder=encoder, **kwargs)


def build_datamodule(recipe: str, names: list[str] | None = None, **overrides: Any) -> Any:
    """The recipe's :class:`MultiTaskDataModule` for the tasks ``names`` (default all)."""
    from umedpt.data import MultiTaskDataModule

    cfg = dict(load_recipe(recipe).get("data", {}))
    cfg.update(overrides)
    tasks = select_tasks(recipe, names)
    return MultiTaskDataModule(tasks=tasks, **cfg)


def to_device(value: Any, device: str | torch.device) -> Any:
    """Move tensors (also inside lists and dicts) to ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def fixed_batches(recipe: str, names: list[str], steps: int, device: str = "cpu", seed: int = 0) -> list[dict]:
    """``steps`` training batches ``{task: task_batch}`` of the recipe, built once, on ``device``."""
    from umedpt.data.loading import collate_cases

    datamodule = build_datamodule(recipe, names, seed=seed)
    batches = []
    for step in range(steps):
        batch = {}
        for task in datamodule.tasks:
            dataset = datamodule.build_dataset(task, "train")
            start = step * task.batch_size
            idx = [(start + i) % len(dataset) for i in range(task.batch_size)]
            batch[task.name] = collate_cases([dataset[i] for i in idx])
        batches.append(to_device(batch, device))
    return batches


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: str) -> str:
    """Human-readable device name for the results."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the date and software versions added."""
    import lightning
    import timm

    result = {
        "benchmark": result.get("benchmark", name),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {path.relative_to(ROOT)}")
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def quiet_trainer(max_steps: int, **kwargs: Any) -> Any:
    """A CPU Trainer for ``max_steps`` optimizer steps with no logger, checkpoints, progress bar,
    summary or validation (benchmarks evaluate on their own); ``kwargs`` add to or override it."""
    from umedpt.testing import quiet_trainer as trainer

    return trainer(max_steps=max_steps, default_root_dir=str(ROOT / "runs" / "benchmarks"), **kwargs)



def probe_bars(
    names: list[str],
    fractions: list[float],
    series: list[tuple[str, Any]],
    path: Path,
    title: str = "linear probe at {fraction:.0%} of the training data",
) -> None:
    """One bar chart per probe fraction: a bar (mean, sd error bar) per task and series.

    ``series`` holds ``(label, stats)`` pairs, ``stats(task, fraction)`` giving ``{"mean", "sd"}``
    or ``None`` (a series missing for some task is left out of that chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 3.6), squeeze=False)
    width = 0.8 / len(series)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for j, (label, stats) in enumerate(series):
            values = [stats(name, fraction) for name in names]
            if not all(values):
                continue
            ax.bar([i + j * width for i in range(len(names))], [v["mean"] for v in values], width,
                   yerr=[v["sd"] for v in values], label=label, capsize=3)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names, fontsize=8)
        ax.set_title(title.format(fraction=fraction))
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
