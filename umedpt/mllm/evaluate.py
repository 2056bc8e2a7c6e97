"""Scores of generated answers per task and dataset, as ``umedpt mllm-evaluate``
(:mod:`umedpt.commands.mllm_evaluate`) reports them.

Reads the predictions JSONL written by ``lightning predict`` (:class:`~umedpt.mllm.GenerationWriter`),
optionally takes the reference answers from an instruction JSONL matched by ``id``, and writes
``metrics.json`` and ``metrics.md`` (plus ``routing_weights_predict.png`` when the records carry
routing weights). See :mod:`umedpt.mllm.metrics` for the metrics of the default protocol and
:mod:`umedpt.mllm.unimed` for ``protocol="unimed"``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umedpt.mllm.metrics import METRICS, evaluate_records, markdown_table
from umedpt.mllm.predictions import read_predictions
from umedpt.mllm.prompts import GRID


def _with_references(
    records: list[dict[str, Any]], predictions: str, references: str | None
) -> list[dict[str, Any]]:
    """``records`` with their reference ``answer`` (from ``references`` by id, when given)."""
    if references is not None:
        from umedpt.mllm.data import read_records

        answers = {str(r["id"]): r["answer"] for r in read_records(references)}
        missing = [r.get("id") for r in records if str(r.get("id")) not in answers]
        if missing:
            raise ValueError(
                f"mllm-evaluate: {len(missing)} predictions of {predictions} have no reference in {references} "
                f"(ids {missing[:5]})"
            )
        records = [{**r, "answer": answers[str(r["id"])]} for r in records]
    missing = [r.get("id") for r in records if "answer" not in r]
    if missing:
        raise ValueError(
            f"mllm-evaluate: {len(missing)} predictions of {predictions} have no reference answer "
            f"(ids {missing[:5]}); add 'answer' to them or give --references"
        )
    return records


def mean_routing(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean routing weight per expert for each task, over the records that carry weights."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        weights = record.get("routing")
        if weights:
            total = sums.setdefault(record["task"], [0.0] * len(weights))
            sums[record["task"]] = [a + b for a, b in zip(total, weights, strict=True)]
            counts[record["task"]] += 1
    return {task: [v / counts[task] for v in total] for task, total in sums.items()}


def evaluate(
    predictions: str,
    references: str | None = None,
    output_dir: str | None = None,
    protocol: str = "umedpt",
    image_size: float = GRID,
    meteor: bool = True,
) -> dict[str, Any]:
    """Score a predictions file; write ``metrics.json``/``metrics.md`` into ``output_dir``; return the report.

    ``protocol``, ``image_size`` and ``meteor``: see :func:`umedpt.mllm.metrics.evaluate_records`.
    """
    records = _with_references(read_predictions(predictions), predictions, references)
    out = Path(output_dir) if output_dir else Path(predictions).parent
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate_records(records, protocol=protocol, image_size=image_size, meteor=meteor, progress=True)
    routing = mean_routing(records)
    report = {"predictions": str(predictions), "protocol": protocol, "rows": rows, "routing": routing}
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    if protocol == "unimed":
        from umedpt.mllm.unimed import METRICS as columns
    else:
        columns = METRICS
    table = markdown_table(rows, columns)
    (out / "metrics.md").write_text(
        f"# MLLM evaluation of `{predictions}`\n\nProtocol: {protocol}. Scores in %.\n\n{table}"
    )
    if routing:
        from umedpt.mllm.plots import plot_routing, text_only_note

        plot_routing(
            routing,
            out / "routing_weights_predict.png",
            title="routing weights (predict)",
            note=text_only_note(routing, sorted({r["task"] for r in records})),
        )
    print(table, end="")
    print(f"umedpt: metrics written to {out / 'metrics.json'} and {out / 'metrics.md'}")
    return report


def __getattr__(name: str) -> Any:
    """``main`` (the ``umedpt mllm-evaluate`` command) lives in :mod:`umedpt.commands.mllm_evaluate`."""
    if name == "main":
        from umedpt.commands.mllm_evaluate import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
