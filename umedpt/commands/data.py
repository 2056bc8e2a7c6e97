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

import json
import sys
from collections import Counter
from typing import Any

from jsonargparse import ArgumentParser

from umedpt.data.check import SPLITS, TaskReport, check_task, load_tasks
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
    commands = parser.add_subcommands(required=True, dest="command")
    commands.add_subcommand("check", check, help="check every task's files, labels, masks and boxes")
    return parser


def main(args: list[str]) -> int:
    """Entry point of ``umedpt data ...``; returns the exit status."""
    try:
        options = _parser().parse_args(args).check
    except SystemExit as exit_:  # the parser exits on --help and on errors
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
