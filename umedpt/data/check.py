"""The data checker: every task's data inspected before training (``umedpt data check``, the
command in :mod:`umedpt.commands.data`).

Reads the tasks from the same YAML files as training (``model.tasks``, ``data.dataset_defaults``;
several config files merge like LightningCLI's). For every task and split it reports the number of
samples, the class balance, the image sizes, channels, pixel types and value ranges, and every
problem: missing or unreadable files, labels out of range, masks whose size differs from the
image's or that hold values that are not classes, boxes outside the image or degenerate, images
duplicated across splits (equal pixels), specs that do not match the data (class count, kind,
batch size).

Datasets that are not file readers (e.g. the synthetic worlds) are counted, not inspected.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umedpt.data.problems import Problem
from umedpt.data.readers.base import SPLITS, FileDataset
from umedpt.tasks import Task, as_task

__all__ = ["SplitSummary", "TaskReport", "check_task", "load_task_specs", "load_tasks"]


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


def load_task_specs(configs: Sequence[str | Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The task specs (``model.tasks``, as written) and ``data.dataset_defaults`` of merged
    config files (``${...}`` resolved)."""
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
    return list(tasks), dict(data.get("dataset_defaults") or {})


def load_tasks(configs: Sequence[str | Path]) -> tuple[list[Task], dict[str, Any]]:
    """The tasks and ``data.dataset_defaults`` of merged config files (``${...}`` resolved)."""
    specs, defaults = load_task_specs(configs)
    return [as_task(t) for t in specs], defaults


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


def _inspect_stored(dataset: Any, split: str, report: TaskReport, deep: bool, progress: Any) -> SplitSummary:
    """A streaming split (:class:`~umedpt.data.streaming.StreamingTaskDataset`): every stored
    item's targets (``deep``; else the first 32), class balance, sizes and pixel types."""
    summary = SplitSummary(count=len(dataset), inspected=True)
    counts = np.zeros(dataset.num_classes, dtype=np.int64)
    counted = not (dataset.task_kind.dense or dataset.task_kind.image_only)
    low, high = np.inf, -np.inf
    total = len(dataset) if deep else min(len(dataset), 32)
    bar = progress.add_task(f"{report.name} {split}", total=total)
    for i in range(total):
        item = dataset.stored_item(i)
        for problem in dataset.item_problems(item):
            report.add(split, problem)
        image = np.asarray(item["image"])
        summary.sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
        summary.channels[image.shape[2] if image.ndim == 3 else 1] += 1
        summary.dtypes[str(image.dtype)] += 1
        if "box_labels" in item and len(item["box_labels"]) == 0:
            summary.no_boxes += 1
        low, high = min(low, float(image.min())), max(high, float(image.max()))
        if counted:
            found = dataset.task_kind.class_counts(dataset.stored_targets(item), dataset.num_classes)
            if found is not None:
                counts += found
        progress.advance(bar)
    progress.remove_task(bar)
    summary.class_counts = counts.tolist() if counted else None
    summary.value_range = (low, high) if np.isfinite(low) else None
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
            elif callable(getattr(dataset, "stored_item", None)):  # a task optimized for streaming
                report.splits[split] = _inspect_stored(dataset, split, report, deep, progress)
                report.info[split] = {"stored": dataset.meta.get("splits", {}).get(split), "input_dir": dataset.input_dir_spec}
            else:
                report.splits[split] = SplitSummary(count=len(dataset))  # type: ignore[arg-type]
    if len({json.dumps(m, sort_keys=True) for m in mappings.values()}) > 1:
        report.add(None, Problem(reader, "categories", f"category ids map to different labels per split: {mappings}"))
    train = report.splits.get("train")
    if train is not None and train.class_counts is not None and not task.task_kind.dense and not task.task_kind.image_only:
        absent = [report.class_names[c] if c < len(report.class_names) else str(c)
                  for c, n in enumerate(train.class_counts) if n == 0]
        if absent:
            report.add("train", Problem(reader, "classes", f"classes {absent} have no training sample", "warning"))
    return report


def __getattr__(name: str) -> Any:
    """``main`` and ``print_reports`` (the ``umedpt data`` command) live in
    :mod:`umedpt.commands.data`; importing them from here keeps working."""
    if name in ("main", "print_reports"):
        from umedpt.commands import data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
