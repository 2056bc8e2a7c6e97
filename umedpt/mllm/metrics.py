"""Scores of generated answers per task and dataset.

- BLEU-1..4: corpus BLEU of torchmetrics (cumulative n-gram, brevity penalty) on lower-cased
  text with punctuation split off; ROUGE-1/2/L: torchmetrics F-measures averaged over answers.
- token F1 and exact match: SQuAD normalisation (lower case, no punctuation or articles).
- closed-question accuracy: exact match over the closed questions only (``cls`` answers and
  ``yes``/``no`` answers); ``None`` when a group has none.
- REC (``refer``): IoU of the first ``{<x1><y1><x2><y2>}`` box of the answer with the reference box
  (an unparsable answer counts IoU 0) and R@0.5, the fraction with IoU >= 0.5.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from umedpt.mllm.prompts import Box, parse_box

BOX_TASKS: tuple[str, ...] = ("refer",)
CLOSED_ANSWERS: frozenset[str] = frozenset({"yes", "no"})
#: the columns of a report, in order
METRICS: tuple[str, ...] = (
    "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL",
    "token_f1", "exact_match", "closed_accuracy", "iou", "recall@0.5",
)  # fmt: skip
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall of the normalised strings (1.0 if both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_closed(task: str, reference: str) -> bool:
    """Whether a question is closed: a classification, or a yes/no answer."""
    return task == "cls" or normalize_answer(reference) in CLOSED_ANSWERS


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``xyxy`` boxes (0 for an empty union or degenerate boxes)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (
        max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    )
    return inter / union if union > 0 else 0.0


def answer_iou(prediction: str, reference: str) -> float:
    """IoU of the boxes of two answers on the 0-100 grid; 0 when the prediction has no box."""
    ref = parse_box(reference)
    if ref is None:
        raise ValueError(f"reference {reference!r} holds no {{<x1><y1><x2><y2>}} box")
    pred = parse_box(prediction)
    return 0.0 if pred is None else box_iou(pred, ref)


def _bleu_text(text: str) -> str:
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and mean ROUGE-1/2/L F-measures."""
    from torchmetrics.functional.text import bleu_score, rouge_score

    preds = [_bleu_text(p) for p in predictions]
    refs = [[_bleu_text(r)] for r in references]
    scores = {f"bleu{n}": float(bleu_score(preds, refs, n_gram=n)) for n in range(1, 5)}
    rouge = rouge_score(list(predictions), list(references), rouge_keys=("rouge1", "rouge2", "rougeL"))
    scores.update({key: float(rouge[f"{key}_fmeasure"]) for key in ("rouge1", "rouge2", "rougeL")})
    return scores


def score_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """All metrics of a group of records with ``task``, ``answer`` and ``prediction``."""
    preds, refs = [r["prediction"] for r in records], [r["answer"] for r in records]
    scores: dict[str, Any] = {"n": len(records), **text_scores(preds, refs)}
    scores["token_f1"] = sum(map(token_f1, preds, refs)) / len(records)
    scores["exact_match"] = sum(map(exact_match, preds, refs)) / len(records)
    closed = [exact_match(r["prediction"], r["answer"]) for r in records if is_closed(r["task"], r["answer"])]
    scores["closed_accuracy"] = sum(closed) / len(closed) if closed else None
    boxes = [answer_iou(r["prediction"], r["answer"]) for r in records if r["task"] in BOX_TASKS]
    scores["iou"] = sum(boxes) / len(boxes) if boxes else None
    scores["recall@0.5"] = sum(v >= 0.5 for v in boxes) / len(boxes) if boxes else None
    return scores


def evaluate_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of scores per (task, dataset) and per task over all its datasets (``dataset = "all"``)."""
    if not records:
        raise ValueError("evaluate_records: no records")
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_task[record["task"]][record["dataset"]].append(record)
    rows = []
    for task in sorted(by_task):
        datasets = by_task[task]
        for dataset in sorted(datasets):
            rows.append({"task": task, "dataset": dataset, **score_records(datasets[dataset])})
        if len(datasets) > 1:
            everything = [r for group in datasets.values() for r in group]
            rows.append({"task": task, "dataset": "all", **score_records(everything)})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table, scores in percent (``-``: not applicable)."""
    header = ["task", "dataset", "n", *METRICS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in rows:
        cells = [row["task"], row["dataset"], str(row["n"])]
        cells += ["-" if row[m] is None else f"{100 * row[m]:.1f}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
