"""``umedpt data check -c <config>``: check every task's data before training;
``umedpt data optimize -c <config> --out DIR``: write every task's data as litdata chunks for
streaming (:mod:`umedpt.data.streaming`).

Reads the tasks from the same YAML files as training (``model.tasks``, ``data.dataset_defaults``;
several ``-c`` files merge like LightningCLI's). For every task and split it reports the number of
samples, the class balance, the image sizes, channels, pixel types and value ranges, and every
problem: missing or unreadable files, labels out of range, masks whose size differs from the
image's or that hold values that are not classes, boxes outside the image or degenerate, images
duplicated across splits (equal pixels), specs that do not match the data (class count, kind,
batch size). Exit status: 0 without errors, 1 with errors, 2 for a bad command line or config.

Datasets that are not file readers (e.g. the synthetic worlds) are counted, not inspected; a
task optimized for streaming is checked on its stored items (labels, masks, boxes, class
balance, sizes).

``optimize`` converts each task's splits (any reader, after decoding, before augmentation) into
``DIR/<task>/<split>/`` litdata chunks with ``DIR/<task>/umedpt.json`` beside them, and writes
``DIR/streaming.yaml``: the config's task list with each task's ``data`` replaced by its
streaming dataset, to add as the last ``-c`` of ``umedpt fit``. Run again, it skips the splits
already written and continues an interrupted one.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from umedpt.data.check import SPLITS, TaskReport, check_task, load_task_specs
from umedpt.kinds import get_kind

__all__ = ["main", "print_reports"]


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


OPTIMIZE_DESCRIPTION = (
    "Write every task's splits (any reader, after decoding, before augmentation) as litdata chunks "
    "into OUT/<task>/<split>/ with OUT/<task>/umedpt.json beside them, and OUT/streaming.yaml: the "
    "config's task list with each task's data replaced by umedpt.data.streaming.StreamingTaskDataset, "
    "to add as the last -c of `umedpt fit` or `umedpt data check`. The tasks' data are checked as "
    "training checks them. Run again, it skips the splits already written and continues an "
    "interrupted one (local folders). See docs/scaling.md."
)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="umedpt data", description="Inspect the data of a task configuration.")
    check = ArgumentParser(prog="umedpt data check", description=__doc__)
    check.add_argument("-c", "--config", action="append", required=True,
                       help="training YAML config (repeatable; later files override earlier ones)")
    check.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    check.add_argument("--tasks", nargs="+", metavar="NAME", help="only these tasks")
    check.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="only these splits")
    check.add_argument("--quick", action="store_true",
                       help="check only what the annotations declare (no image decoding, no duplicate search)")
    check.add_argument("--max-problems", type=int, default=20, metavar="N", help="problems shown per task (table)")
    optimize = ArgumentParser(prog="umedpt data optimize", description=OPTIMIZE_DESCRIPTION)
    optimize.add_argument("-c", "--config", action="append", required=True,
                          help="training YAML config (repeatable; later files override earlier ones)")
    optimize.add_argument("--out", required=True, help="output folder: a local path or an object-store URI litdata writes (s3://, gs://, ...)")
    optimize.add_argument("--tasks", nargs="+", metavar="NAME", help="only these tasks")
    optimize.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="only these splits")
    optimize.add_argument("--pixels", choices=["auto", "uint16", "float32"], default="auto",
                          help="stored [0, 1] pixels: auto = uint8 where lossless (8-bit sources), else uint16; float32 = exact")
    optimize.add_argument("--workers", type=int, default=1, help="processes writing chunks")
    optimize.add_argument("--chunk-bytes", default="64MB", help="size of a chunk file")
    optimize.add_argument("--compression", choices=["zstd"], default=None, help="compress the chunks (needs zstd)")
    optimize.add_argument("--overwrite", action="store_true", help="redo the splits already written")
    commands = parser.add_subcommands(required=True, dest="command")
    commands.add_subcommand("check", check, help="check every task's files, labels, masks and boxes")
    commands.add_subcommand("optimize", optimize, help="write every task's data as litdata chunks for streaming")
    return parser


def _load(options: Any, command: str) -> tuple[list[dict[str, Any]], list[Any], list[Any], dict[str, Any]] | None:
    """The config's task specs, its tasks, those named by ``--tasks`` (all without it) and its
    ``dataset_defaults``; None after printing what is wrong."""
    from umedpt.tasks import as_task

    try:
        specs, defaults = load_task_specs(options.config)
        tasks = [as_task(t) for t in specs]
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"umedpt data {command}: {err}", file=sys.stderr)
        return None
    unknown = sorted(set(options.tasks or []) - {t.name for t in tasks})
    if unknown:
        print(f"umedpt data {command}: unknown tasks {unknown}; the config has {[t.name for t in tasks]}", file=sys.stderr)
        return None
    selected = [t for t in tasks if t.name in options.tasks] if options.tasks else tasks
    return specs, tasks, selected, defaults


#: options of a task's reader that its streaming dataset takes too (chosen when reading)
STREAMED_OPTIONS = ("image_size", "transform", "resize")


def optimize(options: Any) -> int:
    """``umedpt data optimize``: every selected task's splits as litdata chunks, and streaming.yaml."""
    import yaml

    try:
        from umedpt.data import streaming
    except ImportError as err:
        print(f"umedpt data optimize: {err}", file=sys.stderr)
        return 2
    from umedpt.data.datamodule import MultiTaskDataModule

    loaded = _load(options, "optimize")
    if loaded is None:
        return 2
    specs, tasks, selected, defaults = loaded
    # the same datasets as training, with its data checks (a split with errors stops here)
    data_module = MultiTaskDataModule(tasks=selected, num_workers=0, dataset_defaults=defaults)
    # streaming.yaml names each task's folder: absolute, so that fit may run from any folder
    out = str(options.out) if "://" in str(options.out) else str(Path(options.out).resolve())
    for task in selected:
        try:
            streaming.optimize_task(
                task, lambda split, task=task: data_module.build_dataset(task, split), out, options.splits,
                pixels=options.pixels, num_workers=options.workers, chunk_bytes=options.chunk_bytes,
                compression=options.compression, overwrite=options.overwrite,
            )  # fmt: skip
        except (ValueError, TypeError, OSError, RuntimeError) as err:
            print(f"umedpt data optimize: {err}", file=sys.stderr)
            return 2
    names = {t.name for t in selected}
    streamed, kept = [], []
    for spec, task in zip(specs, tasks, strict=True):
        spec = dict(spec)
        folder = streaming.task_folder(out, task.name)
        if task.name not in names and not streaming.is_task_folder(folder):
            kept.append(task.name)  # neither optimized now nor before: its data stays as configured
        else:
            # the reading options of the task's own spec travel (its augmentation, size, resize)
            own = (spec.get("data") or {}).get("init_args") or {}
            init_args = {"input_dir": folder, **{k: v for k, v in own.items() if k in STREAMED_OPTIONS}}
            spec["data"] = {"class_path": "umedpt.data.streaming.StreamingTaskDataset", "init_args": init_args}
        streamed.append(spec)
    if kept:
        print(f"umedpt data optimize: {kept} not optimized in {out}: streaming.yaml keeps their own data")
    text = ("# written by `umedpt data optimize`: the tasks of " + " + ".join(options.config) + " streamed from "
            f"{out}\n# umedpt fit " + " ".join(f"-c {c}" for c in options.config) + " -c <this file>\n")  # fmt: skip
    text += yaml.safe_dump({"model": {"tasks": streamed}}, sort_keys=False)
    config = streaming.task_folder(out, "streaming.yaml")
    streaming.write_text(config, text)
    print(f"{len(selected)} task(s) optimized into {out}; train on them with: umedpt fit "
          + " ".join(f"-c {c}" for c in options.config) + f" -c {config}")  # fmt: skip
    return 0


def main(args: list[str]) -> int:
    """Entry point of ``umedpt data ...``; returns the exit status."""
    try:
        parsed = _parser().parse_args(args)
    except SystemExit as exit_:  # the parser exits on --help and on errors
        return int(exit_.code or 0)
    if parsed.command == "optimize":
        return optimize(parsed.optimize)
    options = parsed.check
    loaded = _load(options, "check")
    if loaded is None:
        return 2
    _, _, tasks, defaults = loaded
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
