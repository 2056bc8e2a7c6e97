"""Does the encoder learn? Every task of a recipe against chance, a plain PyTorch loop and umedpt.

For each task of the recipe (default: the quick recipe, ``configs/umedpt.yaml`` +
``configs/quick.yaml``), on its validation split:

``chance``   the metric of a predictor that knows only the training labels' frequencies
             (AUROC 0.5, accuracy of the majority class, Dice of all-background, mAP 0).
``plain``    a plain PyTorch loop, one task: classification is ``timm.create_model`` of the
             recipe's Swin with ``num_classes`` (its own pooled classifier), the other kinds are
             the recipe's encoder + the task's head; AdamW (lr 1e-3, wd 0.05), OneCycle, batch
             of the task, no Lightning and no umedpt training code.
``single``   umedpt (``MultiTaskModule`` + ``MultiTaskDataModule`` + Lightning), that task alone.
``multi``    umedpt, all tasks of the run together, every task in every step
             (``tasks_per_step: null``): each task sees the same images as in ``single``.
``recipe``   umedpt with the recipe's own sampling (e.g. one random task per step), run for
             ``steps * T / tasks_per_step`` steps, so each task gets the same budget on average.

``--steps`` is the per-task budget in optimizer steps of that task. Results over ``--seeds``
(model init, data order and sampling) are reported as mean ± sd.

    python benchmarks/learning.py                                   # every task, all modes
    python benchmarks/learning.py --tasks radiograph_grade histology_dominant --steps 1000
    python benchmarks/learning.py --modes single multi --set model.head_lr_factor=1

Writes ``benchmarks/results/<name>.json``, ``.md`` and ``.png`` (``--name``, default
``learning_<recipe>_cpu``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, load_recipe, markdown_table, quiet_trainer, write_result  # noqa: E402
from umedpt.curves import PRIMARY_METRIC, LearningCurves  # noqa: E402

MODES: tuple[str, ...] = ("chance", "plain", "single", "multi", "recipe")
#: the metric reported per task kind (validation split): the one the learning curves plot
PRIMARY = PRIMARY_METRIC


# ---------------------------------------------------------------------------------- recipe
def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars and lists (``null``, ``1e-3``, ``[1, 2]``)."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def recipe_config(recipe: str, sets: list[str]) -> dict[str, Any]:
    """The recipe's merged config with ``--set key.path=value`` overrides applied."""
    cfg = copy.deepcopy(load_recipe(recipe))
    for item in sets:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--set expects key.path=value, got {item!r}")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    return cfg


def task_specs(cfg: dict[str, Any], names: list[str] | None, task_sets: list[str] = ()) -> list[Any]:
    """The tasks ``names`` (default: the recipe's), with ``task.field=value`` overrides applied."""
    from dataclasses import replace

    from umedpt.tasks import as_task

    tasks = [as_task(t) for t in cfg["model"]["tasks"]]
    if names:
        known = {t.name: t for t in tasks}
        tasks = [known[name] if name in known else synthetic_task(name, list(known)) for name in names]
    for item in task_sets:
        key, eq, value = item.partition("=")
        name, _, fld = key.partition(".")
        match = [i for i, t in enumerate(tasks) if t.name == name]
        if not eq or not fld or not match:
            raise SystemExit(f"--task-set expects <task>.<field>=value for a task of {[t.name for t in tasks]}, got {item!r}")
        tasks[match[0]] = replace(tasks[match[0]], **{fld: parse_value(value)})
    return tasks


def synthetic_task(name: str, recipe_names: list[str]) -> Any:
    """A task ``<style>_<family>`` over the embedded synthetic data that the recipe does not train."""
    from umedpt.data import synthetic
    from umedpt.tasks import Task

    style, _, family = name.partition("_")
    family = {"count": "count_bin", "size": "size_bin"}.get(family, family)
    if style not in synthetic.STYLES or family not in synthetic.LABEL_FAMILIES:
        raise SystemExit(
            f"unknown task {name!r}: neither a task of the recipe ({recipe_names}) nor <style>_<family> "
            f"with a style of {list(synthetic.STYLES)} and a family of {list(synthetic.LABEL_FAMILIES)}"
        )
    return Task(
        name=name,
        kind=synthetic.LABEL_FAMILIES[family],
        num_classes=synthetic.num_classes(style, family),
        data={
            "class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
            "init_args": {"style": style, "family": family},
        },
    )


def datamodule(cfg: dict[str, Any], tasks: list[Any], seed: int, tasks_per_step: int | None = None) -> Any:
    from umedpt.data import MultiTaskDataModule

    data = {k: v for k, v in cfg.get("data", {}).items() if k != "tasks"}
    data.update(num_workers=0, pin_memory=False, seed=seed, tasks_per_step=tasks_per_step)
    return MultiTaskDataModule(tasks=tasks, **data)


def encoder_args(cfg: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(cfg["model"].get("encoder", {}).get("init_args", {}))


# ---------------------------------------------------------------------------------- metrics
def degenerate_fraction(predictions: list[dict[str, torch.Tensor]]) -> float:
    """Fraction of predicted boxes with zero width or height (1.0 means collapsed)."""
    boxes = [p["boxes"] for p in predictions if len(p["boxes"])]
    if not boxes:
        return 0.0
    b = torch.cat(boxes)
    return float(((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).float().mean())


@torch.no_grad()
def evaluate(forward: Any, head: Any, loader: Any) -> dict[str, float]:
    """Validation metrics of a model (``forward(image) -> head outputs``) with the head's metrics.

    Detection also reports ``degenerate``, the fraction of predicted boxes without area.
    """
    metrics = head.build_metrics()
    detections: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        outputs = forward(batch["image"])
        if "boxes" in head.target_keys:  # post-process once: for the metric and the box check
            predictions = head.predict(outputs)
            metrics.update(predictions, head.targets(batch))
            detections.extend(predictions)
        else:
            head.update_metrics(metrics, outputs, batch)
    values = {k: float(v) for k, v in metrics.compute().items() if v.numel() == 1}
    if "boxes" in head.target_keys:
        values["degenerate"] = degenerate_fraction(detections)
    return values


def chance(task: Any, train: Any, val: Any) -> dict[str, float]:
    """Metrics of the label-frequency predictor (it never looks at the image)."""
    from torchmetrics import MetricCollection

    from heads.classification import ClassificationHead, MultiLabelHead
    from heads.segmentation import SegmentationHead

    def targets(ds: Any, key: str) -> list[Any]:
        return [ds[i][key] for i in range(len(ds))]

    if task.kind == "detection":
        return {"map_50": 0.0, "map": 0.0, "degenerate": 0.0}
    ch = [8, 16, 32, 64]  # the heads below only provide their metrics
    if task.kind == "classification":
        head = ClassificationHead(ch, [4, 8, 16, 32], task.num_classes)
        labels = torch.tensor(targets(train, "label"))
        prior = torch.bincount(labels, minlength=task.num_classes).float() / len(labels)
        val_labels = torch.tensor(targets(val, "label"))
        probs = prior.expand(len(val_labels), -1).clone()
        metrics: MetricCollection = head.build_metrics()
        metrics.update(probs, val_labels)
    elif task.kind == "multilabel":
        head = MultiLabelHead(ch, [4, 8, 16, 32], task.num_classes)
        prior = torch.stack(targets(train, "label")).mean(0)
        val_labels = torch.stack(targets(val, "label"))
        metrics = head.build_metrics()
        metrics.update(prior.expand(len(val_labels), -1).clone(), val_labels.long())
    else:
        head = SegmentationHead(ch, [4, 8, 16, 32], task.num_classes, decoder_channels=32)
        counts = torch.zeros(task.num_classes)
        for mask in targets(train, "mask"):
            counts += torch.bincount(mask.flatten(), minlength=task.num_classes)[: task.num_classes].float()
        metrics = head.build_metrics()
        majority = int(counts.argmax())
        for mask in targets(val, "mask"):
            metrics.update(torch.full_like(mask, majority)[None], mask[None])
    return {k: float(v) for k, v in metrics.compute().items()}


# ---------------------------------------------------------------------------------- runs
def train_plain(cfg: dict[str, Any], task: Any, steps: int, seed: int) -> dict[str, Any]:
    """A plain PyTorch loop on one task (see the module docstring)."""
    import timm
    from torch.utils.data import DataLoader

    from heads.classification import ClassificationHead
    from umedpt.data.loading import collate_cases
    from umedpt.encoder import SwinEncoder

    torch.manual_seed(seed)
    dm = datamodule(cfg, [task], seed)
    dm.setup("fit")
    train, val = dm.datasets["train"][task.name], dm.datasets["val"][task.name]
    enc = encoder_args(cfg)
    if task.kind == "classification":
        model = timm.create_model(
            enc.get("name", "swin_tiny_patch4_window7_224"),
            num_classes=task.num_classes,
            img_size=enc.get("img_size", 224),
            **enc.get("model_kwargs", {}),
        )
        # timm's own pooled classifier predicts; the head only provides the task's metrics
        head = ClassificationHead([8, 16, 32, model.num_features], [4, 8, 16, 32], task.num_classes)

        def forward(image: torch.Tensor) -> torch.Tensor:
            return model(image)

        def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])

    else:
        encoder = SwinEncoder(**enc)
        head_args = {**cfg["model"].get("head_defaults", {}).get(task.kind, {}), **task.head_args}
        head = task.build_head(encoder.out_channels, encoder.reductions, head_args)
        model = torch.nn.ModuleDict({"encoder": encoder, "head": head})

        def forward(image: torch.Tensor) -> Any:
            return head(encoder(image), tuple(image.shape[-2:]))

        def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
            return head.loss(forward(batch["image"]), batch)

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train,
        batch_size=task.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_cases,
        generator=generator,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    losses: list[float] = []
    model.train()
    step = 0
    start = time.perf_counter()
    while step < steps:
        for batch in loader:
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
            step += 1
            if step >= steps:
                break
    seconds = time.perf_counter() - start
    model.eval()
    val_loader = DataLoader(val, batch_size=64, collate_fn=collate_cases)
    metrics = evaluate(forward, head, val_loader)
    return {"metrics": {task.name: metrics}, "seconds": seconds, "loss_curves": {task.name: losses}}


def train_umedpt(
    cfg: dict[str, Any], tasks: list[Any], steps: int, seed: int, tasks_per_step: int | None
) -> dict[str, Any]:
    """Fit a ``MultiTaskModule`` on ``tasks`` with Lightning for ``steps`` optimizer steps, then validate."""
    from lightning import seed_everything

    from umedpt import MultiTaskModule, SwinEncoder

    seed_everything(seed, verbose=False)
    model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("tasks", "encoder")}
    model_cfg.update(export_encoder=False, tasks_per_step=tasks_per_step, seed=seed)
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**encoder_args(cfg)), **model_cfg)
    dm = datamodule(cfg, tasks, seed, tasks_per_step)
    curves = _Curves()
    trainer = quiet_trainer(steps, callbacks=[curves])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    for task, loader in zip(tasks, dm.val_dataloader(), strict=True):
        metrics[task.name] = evaluate(
            lambda image, n=task.name: model.forward_task(n, image), model.heads[task.name], loader
        )
    loss_curves = {  # unscaled, as the plain loop's
        name: [value / model.loss_scales[name] for _, value in points]
        for name, points in curves.train.items()
    }
    return {"metrics": metrics, "seconds": seconds, "loss_curves": loss_curves}


class _Curves(LearningCurves):
    """The per-task training losses of a fit, kept in memory (no files)."""

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.state_dict()  # copies the last recorded losses to the host


# ---------------------------------------------------------------------------------- report
def summarise(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(values)}


def fmt(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}" if stats["n"] > 1 else f"{stats['mean']:.3f}"


def build_table(result: dict[str, Any]) -> str:
    modes = result["modes"]
    header = ["task", "kind", "metric", *modes]
    rows = []
    for task in result["tasks"]:
        name, kind = task["name"], task["kind"]
        metric = PRIMARY[kind]
        cells = [fmt(result["summary"].get(mode, {}).get(name, {}).get(metric)) for mode in modes]
        rows.append([name, kind, metric, *cells])
        if kind == "classification":
            cells = [fmt(result["summary"].get(mode, {}).get(name, {}).get("accuracy")) for mode in modes]
            rows.append(["", "", "accuracy", *cells])
    return markdown_table(header, rows)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    modes = result["modes"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(tasks) + 2), 4))
    width = 0.8 / len(modes)
    for m, mode in enumerate(modes):
        means, sds = [], []
        for task in tasks:
            stats = result["summary"].get(mode, {}).get(task["name"], {}).get(PRIMARY[task["kind"]])
            means.append(stats["mean"] if stats else math.nan)
            sds.append(stats["sd"] if stats else 0.0)
        xs = [i + (m - (len(modes) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, means, width, yerr=sds, label=mode, capsize=2)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(
        [f"{t['name']}\n({PRIMARY[t['kind']]})" for t in tasks], rotation=60, ha="right", fontsize=7
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("validation metric")
    ax.set_title(f"learning benchmark: {result['recipe']} recipe, {result['steps']} steps per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise_runs(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Per mode, task and metric: mean, sd and count over the runs (seeds)."""
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for mode in modes:
        per_task: dict[str, dict[str, list[float]]] = {}
        for run in runs:
            if run["mode"] != mode:
                continue
            for name, metrics in run["metrics"].items():
                for key, value in metrics.items():
                    per_task.setdefault(name, {}).setdefault(key, []).append(value)
        summary[mode] = {n: {k: summarise(v) for k, v in m.items()} for n, m in per_task.items()}
    return summary


def comparisons(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task, the differences of means the learning goals are stated in (primary metric and accuracy)."""
    out: dict[str, dict[str, float]] = {}
    summary = result["summary"]
    for task in result["tasks"]:
        name = task["name"]
        for metric in (PRIMARY[task["kind"]], "accuracy"):
            means = {m: summary.get(m, {}).get(name, {}).get(metric, {}).get("mean") for m in result["modes"]}
            pairs = {
                "single-plain": ("single", "plain"),
                "multi-single": ("multi", "single"),
                "recipe-single": ("recipe", "single"),
                "single-chance": ("single", "chance"),
            }
            for label, (a, b) in pairs.items():
                if means.get(a) is not None and means.get(b) is not None:
                    out.setdefault(name, {})[f"{metric}:{label}"] = means[a] - means[b]
    return out


def report(result: dict[str, Any], out_dir: Path, name: str, command: str) -> None:
    """Write ``<name>.json`` / ``.md`` / ``.png`` and print the table."""
    result["summary"] = summarise_runs(result["runs"], result["modes"])
    result["differences"] = comparisons(result)
    if out_dir.resolve() == RESULTS.resolve():
        write_result(name, result)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = build_table(result)
    seeds = sorted({r["seed"] for r in result["runs"]})
    (out_dir / f"{name}.md").write_text(
        f"Validation metrics, {result['recipe']} recipe, {result['steps']} optimizer steps per task, "
        f"seeds {seeds} (mean ± sd); command: `{command}`\n\n" + table + "\n"
    )
    plot(result, out_dir / f"{name}.png")
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="quick")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: all of the recipe)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--steps", type=int, default=None, help="per-task optimizer steps (default: the recipe's)"
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="config override key.path=value"
    )
    parser.add_argument(
        "--task-set", dest="task_sets", action="append", default=[],
        help="task override <task>.<field>=value, e.g. histology_dominant.weight=0.5",
    )
    parser.add_argument("--name", default=None, help="results file name (default learning_<recipe>_cpu)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="combine the runs of earlier result files (e.g. one per seed, run in parallel) into one report",
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = args.name or f"learning_{args.recipe}_cpu"
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        result = {k: v for k, v in parts[0].items() if k not in ("summary", "differences", "date")}
        result["runs"] = [run for part in parts for run in part["runs"]]
        result["seeds"] = sorted({run["seed"] for run in result["runs"]})
        result["modes"] = [m for m in MODES if any(m in part["modes"] for part in parts)]
        result["merged_from"] = [str(path) for path in args.merge]
        # the commands that produced the parts, then this merge
        parts_commands = [part["command"] for part in parts if part.get("command")]
        result["command"] = " && ".join([*parts_commands, command])
        report(result, args.out_dir, name, result["command"])
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    for logger_name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    cfg = recipe_config(args.recipe, args.sets)
    tasks = task_specs(cfg, args.tasks, args.task_sets)
    per_step = cfg["model"].get("tasks_per_step")
    steps = args.steps or math.ceil(cfg["trainer"]["max_steps"] * (per_step or len(tasks)) / len(tasks))
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()

    def record(mode: str, seed: int, run: dict[str, Any], task: str | None = None) -> None:
        entry = {"mode": mode, "seed": seed, **({"task": task} if task else {})}
        entry.update({k: v for k, v in run.items() if k != "loss_curves"}, loss_start_end=ends(run))
        runs.append(entry)
        for name_, metrics in run["metrics"].items():
            print(
                f"[{time.perf_counter() - started:7.1f} s] seed {seed} {mode:<6} {name_}: {short(metrics)}",
                flush=True,
            )

    for seed in args.seeds:
        for mode in args.modes:
            if mode == "chance":
                if seed != args.seeds[0]:
                    continue
                metrics = {}
                for task in tasks:
                    dm = datamodule(cfg, [task], seed)
                    dm.setup("fit")
                    metrics[task.name] = chance(
                        task, dm.datasets["train"][task.name], dm.datasets["val"][task.name]
                    )
                record(mode, seed, {"metrics": metrics, "seconds": 0.0})
            elif mode == "plain":
                for task in tasks:
                    record(mode, seed, train_plain(cfg, task, steps, seed), task.name)
            elif mode == "single":
                for task in tasks:
                    record(mode, seed, train_umedpt(cfg, [task], steps, seed, None), task.name)
            elif mode == "multi":
                record(mode, seed, train_umedpt(cfg, tasks, steps, seed, None))
            elif mode == "recipe":
                k = per_step or len(tasks)
                record(
                    mode, seed, train_umedpt(cfg, tasks, math.ceil(steps * len(tasks) / k), seed, per_step)
                )

    result = {
        "benchmark": "learning",
        "command": command,
        "recipe": args.recipe,
        "overrides": args.sets,
        "task_overrides": args.task_sets,
        "steps": steps,
        "seeds": args.seeds,
        "modes": args.modes,
        "threads": torch.get_num_threads(),
        "tasks": [{"name": t.name, "kind": t.kind, "num_classes": t.num_classes} for t in tasks],
        "runs": runs,
    }
    report(result, args.out_dir, name, command)
    return 0


def short(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()))


def ends(run: dict[str, Any], window: int = 50) -> dict[str, list[float]]:
    """Mean unscaled training loss over the first and the last ``window`` steps of each task."""
    out = {}
    for name, curve in run.get("loss_curves", {}).items():
        if curve:
            w = min(window, len(curve))
            out[name] = [statistics.fmean(curve[:w]), statistics.fmean(curve[-w:])]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
