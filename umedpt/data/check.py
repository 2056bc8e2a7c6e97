"""``umedpt data check -c <config>``: check every task's data before training.

Reads the tasks from the same YAML files as training (``model.tasks``, ``data.dataset_defaults``;
several ``-c`` files merge like LightningCLI's). For every task and split it reports the number of
samples, the class balance, the image sizes, channels, pixel types and value ranges, and every
problem: missing or unreadable files, labels out of range, masks whose size differs from the
image's or that hold values that are not classes, boxes outside the image or degenerate, images
duplicated across splits (equal pixels), specs that do not match the data (class count, kind,
batch size). Exit status: 0 without errors, 1 with errors, 2 for a bad command line or config.

Datasets that are not file readers (e.g. the synthetic worlds) are counted, not inspected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umedpt.data.problems import Problem
from umedpt.data.readers.base import SPLITS, FileDataset
from umedpt.kinds import get_kind
from umedpt.tasks import Task, as_task

__all__ = ["SplitSummary", "TaskReport", "check_task", "load_tasks", "main"]


@dataclass
class SplitSummary:
    """What one split of a task holds.

    Attributes:
        count: number of samples.
        inspected: whether the samples were read (file readers only).
        class_counts: per class: samples (classification), positives (multilabel), pixels
            (segmentation) or boxes (detection).
        sizes: ``"HxW"`` -> number of images.
        channels: channels of the stored images -> number of images.
        dtypes: pixel type -> number of images.
        value_range: smallest and largest stored value over the split.
        no_boxes: detection: images without any box.
    """

    count: int = 0
    inspected: bool = False
    class_counts: list[int] | None = None
    sizes: Counter[str] = field(default_factory=Counter)
    channels: Counter[int] = field(default_factory=Counter)
    dtypes: Counter[str] = field(default_factory=Counter)
    value_range: tuple[float, float] | None = None
    no_boxes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "count": self.count,
            "inspected": self.inspected,
            "class_counts": self.class_counts,
            "sizes": dict(self.sizes),
            "channels": {str(k): v for k, v in self.channels.items()},
            "dtypes": dict(self.dtypes),
            "value_range": list(self.value_range) if self.value_range else None,
            "images_without_boxes": self.no_boxes,
        }


@dataclass
class TaskReport:
    """Everything found about one task: per-split summaries, reader facts and problems."""

    name: str
    kind: str
    num_classes: int
    class_names: list[str]
    reader: str
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)

    def add(self, split: str | None, problem: Problem) -> None:
        """Record ``problem`` found in ``split`` (None: the task as a whole)."""
        self.problems.append({"split": split, **problem.to_dict()})

    def count(self, severity: str) -> int:
        """Number of problems of ``severity``."""
        return sum(p["severity"] == severity for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "reader": self.reader,
            "splits": {s: summary.to_dict() for s, summary in self.splits.items()},
            "info": self.info,
            "errors": self.count("error"),
            "warnings": self.count("warning"),
            "problems": self.problems,
        }


def _merge(base: Any, override: Any) -> Any:
    """LightningCLI-style merge of config files: mappings merge, everything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def load_tasks(configs: Sequence[str | Path]) -> tuple[list[Task], dict[str, Any]]:
    """The tasks and ``data.dataset_defaults`` of merged config files (``${...}`` resolved)."""
    from omegaconf import OmegaConf

    merged: dict[str, Any] = {}
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} not found")
        merged = _merge(merged, OmegaConf.to_container(OmegaConf.load(path)) or {})
    resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    model = resolved.get("model") or {}
    data = resolved.get("data") or {}
    model = model.get("init_args", model) if "class_path" in model else model
    data = data.get("init_args", data) if "class_path" in data else data
    tasks = model.get("tasks")
    if not tasks:
        raise ValueError(f"no tasks in {[str(c) for c in configs]}: expected a list under model.tasks")
    return [as_task(t) for t in tasks], dict(data.get("dataset_defaults") or {})


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


def _inspect_split(dataset: FileDataset, split: str, report: TaskReport, deep: bool, progress: Any,
                   digests: dict[str, tuple[str, int, str]]) -> SplitSummary:
    summary = SplitSummary(count=len(dataset), inspected=True)
    counts = np.zeros(dataset.num_classes, dtype=np.int64)
    low, high = np.inf, -np.inf
    bar = progress.add_task(f"{report.name} {split}", total=len(dataset))
    for problem in dataset.notes:
        report.add(split, problem)
    has_boxes = "boxes" in dataset.task_kind.target_keys
    for i in range(len(dataset)):
        item = dataset.inspect(i) if deep else None
        problems = item.problems if item is not None else dataset.entry_problems(i)
        for problem in problems:
            report.add(split, problem)
        class_counts = item.class_counts if item is not None else dataset.declared_counts(i)
        if class_counts is not None:
            counts += class_counts
        if has_boxes and len(dataset.items[i].box_labels) == 0:
            summary.no_boxes += 1
        if item is not None and item.shape is not None:
            summary.sizes[f"{item.shape[0]}x{item.shape[1]}"] += 1
            summary.channels[item.shape[2] if len(item.shape) == 3 else 1] += 1
            summary.dtypes[item.dtype] += 1
            if item.value_range is not None:  # None: no finite value
                low, high = min(low, item.value_range[0]), max(high, item.value_range[1])
            first_split, first_index, first_source = digests.setdefault(item.digest, (split, i, item.source))
            if (first_split, first_index) != (split, i):
                severity = "error" if first_split != split else "warning"
                report.add(split, Problem(item.source, "image", f"same pixels as {first_source} ({first_split} split)",
                                          severity=severity, index=i))
        progress.advance(bar)
    progress.remove_task(bar)
    summary.class_counts = counts.tolist()
    summary.value_range = (float(low), float(high)) if np.isfinite(low) else None
    return summary


def check_task(task: Task, dataset_defaults: dict[str, Any], splits: Sequence[str] = SPLITS, deep: bool = True,
               show_progress: bool = False) -> TaskReport:
    """Check every split of ``task`` (``deep``: decode every sample) and return the report."""
    from umedpt.data.datamodule import MultiTaskDataModule

    data_module = MultiTaskDataModule(tasks=[task], num_workers=0, dataset_defaults=dataset_defaults, check="off")
    reader = (task.data or {}).get("class_path", "?")
    report = TaskReport(task.name, task.kind, task.num_classes, list(task.class_names or []), reader)
    digests: dict[str, tuple[str, int, str]] = {}
    mappings: dict[str, Any] = {}
    with _progress(show_progress) as progress:
        for split in splits:
            try:
                dataset = data_module.instantiate_dataset(task, split)
            except Exception as err:  # any failure to build the dataset is a finding, not a crash
                report.add(split, Problem(reader, "data", f"cannot build the dataset: {type(err).__name__}: {err}"))
                continue
            for message in data_module.spec_errors(task, split, dataset):
                report.add(split, Problem(reader, "spec", message))
            names = [str(c) for c in getattr(dataset, "class_names", None) or []]
            if not report.class_names:
                report.class_names = names
            elif names and names != report.class_names:
                report.add(split, Problem(reader, "class_names", f"the task names the classes {report.class_names} "
                                          f"but the dataset's are {names}", "warning"))
            if isinstance(dataset, FileDataset):
                report.splits[split] = _inspect_split(dataset, split, report, deep, progress, digests)
                info = dataset.describe()
                report.info[split] = info
                mappings[split] = info.get("category_mapping")
            else:
                report.splits[split] = SplitSummary(count=len(dataset))  # type: ignore[arg-type]
    if len({json.dumps(m, sort_keys=True) for m in mappings.values()}) > 1:
        report.add(None, Problem(reader, "categories", f"category ids map to different labels per split: {mappings}"))
    train = report.splits.get("train")
    if train is not None and train.class_counts is not None and not task.task_kind.dense:
        absent = [report.class_names[c] if c < len(report.class_names) else str(c)
                  for c, n in enumerate(train.class_counts) if n == 0]
        if absent:
            report.add("train", Problem(reader, "classes", f"classes {absent} have no training sample", "warning"))
    return report


def _top(counter: Counter, n: int = 3) -> str:
    items = counter.most_common()
    text = ", ".join(f"{k} ({v})" for k, v in items[:n])
    return text + (f", +{len(items) - n} more" if len(items) > n else "")


def print_reports(reports: list[TaskReport], max_problems: int) -> None:
    """Readable tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="umedpt data check", show_lines=True)
    for column in ("task", "kind", "split", "samples", "image sizes", "channels", "dtype", "values", "errors",
                   "warnings"):
        table.add_column(column, justify="right" if column in ("samples", "errors", "warnings") else "left")
    for report in reports:
        errors, warnings = report.count("error"), report.count("warning")
        for j, (split, s) in enumerate(report.splits.items()):
            values = "" if s.value_range is None else f"{s.value_range[0]:g} .. {s.value_range[1]:g}"
            table.add_row(
                f"{report.name}" if j == 0 else "", report.kind if j == 0 else "", split, str(s.count),
                _top(s.sizes) if s.inspected else "not inspected", _top(s.channels), _top(s.dtypes), values,
                f"[red]{errors}[/red]" if j == 0 and errors else ("0" if j == 0 else ""),
                f"[yellow]{warnings}[/yellow]" if j == 0 and warnings else ("0" if j == 0 else ""),
            )
        if not report.splits:
            table.add_row(report.name, report.kind, "-", "-", "", "", "", "", f"[red]{errors}[/red]", str(warnings))
    console.print(table)
    for report in reports:
        _print_task_details(console, report, max_problems)


def _print_task_details(console: Any, report: TaskReport, max_problems: int) -> None:
    from rich.table import Table

    summaries = {s: v for s, v in report.splits.items() if v.class_counts is not None}
    if summaries:
        kind = get_kind(report.kind)
        balance = Table(title=f"{report.name}: class balance ({kind.count_unit})")
        balance.add_column("class")
        for split in summaries:
            balance.add_column(split, justify="right")
        for c in range(report.num_classes):
            name = report.class_names[c] if c < len(report.class_names) else str(c)
            counts = [v.class_counts[c] if c < len(v.class_counts) else 0 for v in summaries.values()]
            balance.add_row(f"{c}: {name}", *(str(n) for n in counts))
        if "boxes" in kind.target_keys:
            balance.add_row("images without boxes", *(str(v.no_boxes) for v in summaries.values()))
        console.print(balance)
    mapping = next((i.get("category_mapping") for i in report.info.values() if i.get("category_mapping")), None)
    if mapping:
        console.print(f"{report.name}: COCO category id -> label: "
                      + ", ".join(f"{cid} -> {label} ({name})" for cid, (label, name) in mapping.items()))
    if report.problems:
        problems = Table(title=f"{report.name}: problems")
        for column in ("severity", "split", "file", "field", "message"):
            problems.add_column(column, overflow="fold")
        for p in report.problems[:max_problems]:
            colour = "red" if p["severity"] == "error" else "yellow"
            problems.add_row(f"[{colour}]{p['severity']}[/{colour}]", p["split"] or "", p["source"], p["field"],
                             p["message"])
        console.print(problems)
        if len(report.problems) > max_problems:
            console.print(f"... and {len(report.problems) - max_problems} more problems (--json lists all)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umedpt data", description="Inspect the data of a task configuration.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check every task's files, labels, masks and boxes",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("-c", "--config", action="append", required=True,
                       help="YAML config (repeatable; later files override earlier ones)")
    check.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    check.add_argument("--tasks", nargs="+", metavar="NAME", help="only these tasks")
    check.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="only these splits")
    check.add_argument("--quick", action="store_true",
                       help="check only what the annotations declare (no image decoding, no duplicate search)")
    check.add_argument("--max-problems", type=int, default=20, metavar="N", help="problems shown per task (table)")
    return parser


def main(args: list[str]) -> int:
    """Entry point of ``umedpt data ...``; returns the exit status."""
    try:
        options = _parser().parse_args(args)
    except SystemExit as exit_:  # argparse exits on --help and on errors
        return int(exit_.code or 0)
    try:
        tasks, defaults = load_tasks(options.config)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"umedpt data check: {err}", file=sys.stderr)
        return 2
    if options.tasks:
        unknown = sorted(set(options.tasks) - {t.name for t in tasks})
        if unknown:
            print(f"umedpt data check: unknown tasks {unknown}; the config has {[t.name for t in tasks]}",
                  file=sys.stderr)
            return 2
        tasks = [t for t in tasks if t.name in options.tasks]
    reports = [
        check_task(t, defaults, options.splits, deep=not options.quick, show_progress=not options.json)
        for t in tasks
    ]
    errors = sum(r.count("error") for r in reports)
    if options.json:
        warnings = sum(r.count("warning") for r in reports)
        document = {"ok": errors == 0, "errors": errors, "warnings": warnings, "tasks": [r.to_dict() for r in reports]}
        print(json.dumps(document, indent=2, default=str))
    else:
        print_reports(reports, options.max_problems)
    return 1 if errors else 0
