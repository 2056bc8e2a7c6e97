"""Scores of generated answers per task and dataset.

- BLEU-1..4: corpus BLEU of torchmetrics (cumulative n-gram, brevity penalty) on lower-cased
  text with punctuation split off; ROUGE-1/2/L: torchmetrics F-measures averaged over answers.
- METEOR (``[caption]`` only): corpus METEOR 1.5 (:mod:`umedpt.mllm.coco_caption`) on the same
  lower-cased text; ``None`` where Java or pycocoevalcap is missing (a warning says why).
- token F1 and exact match: SQuAD normalisation (lower case, no punctuation or articles).
- closed-question accuracy: exact match over the closed questions only (``cls`` answers and
  ``yes``/``no`` answers); ``None`` when a group has none.
- REC (``refer``): IoU of the first ``{<x1><y1><x2><y2>}`` box of the answer with the reference box
  (an unparsable answer counts IoU 0) and R@0.5, the fraction with IoU >= 0.5.

``protocol="unimed"`` scores by the Uni-Med protocol instead (:mod:`umedpt.mllm.unimed`).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from umedpt.mllm.prompts import GRID, Box, parse_box

BOX_TASKS: tuple[str, ...] = ("refer",)
CLOSED_ANSWERS: frozenset[str] = frozenset({"yes", "no"})
#: the columns of a report, in order
METRICS: tuple[str, ...] = (
    "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor",
    "token_f1", "exact_match", "closed_accuracy", "iou", "recall@0.5",
)  # fmt: skip
#: the scoring rules ``evaluate_records`` offers
PROTOCOLS: tuple[str, ...] = ("umedpt", "unimed")
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


def caption_meteor(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus METEOR 1.5 on lower-cased text with punctuation split off; ``None`` (and a warning)
    where it cannot run."""
    from umedpt.mllm import coco_caption

    reason = coco_caption.unavailable()
    if reason is not None:
        warnings.warn(f"METEOR not computed: {reason}", stacklevel=2)
        return None
    return coco_caption.meteor([_bleu_text(p) for p in predictions], [_bleu_text(r) for r in references])


def score_records(records: Sequence[dict[str, Any]], meteor: bool = True) -> dict[str, Any]:
    """All metrics of a group of records with ``task``, ``answer`` and ``prediction``
    (METEOR when ``meteor`` and every record is a ``[caption]``)."""
    preds, refs = [r["prediction"] for r in records], [r["answer"] for r in records]
    scores: dict[str, Any] = {"n": len(records), **text_scores(preds, refs)}
    captions = all(r["task"] == "caption" for r in records)
    scores["meteor"] = caption_meteor(preds, refs) if meteor and captions else None
    scores["token_f1"] = sum(map(token_f1, preds, refs)) / len(records)
    scores["exact_match"] = sum(map(exact_match, preds, refs)) / len(records)
    closed = [exact_match(r["prediction"], r["answer"]) for r in records if is_closed(r["task"], r["answer"])]
    scores["closed_accuracy"] = sum(closed) / len(closed) if closed else None
    boxes = [answer_iou(r["prediction"], r["answer"]) for r in records if r["task"] in BOX_TASKS]
    scores["iou"] = sum(boxes) / len(boxes) if boxes else None
    scores["recall@0.5"] = sum(v >= 0.5 for v in boxes) / len(boxes) if boxes else None
    return scores


def evaluate_records(
    records: Sequence[dict[str, Any]],
    protocol: str = "umedpt",
    image_size: float = GRID,
    meteor: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rows of scores per (task, dataset) and per task over all its datasets (``dataset = "all"``).

    Args:
        records: dicts with ``task``, ``dataset``, ``answer`` and ``prediction``.
        protocol: ``umedpt`` (this module's metrics) or ``unimed`` (:mod:`umedpt.mllm.unimed`;
            rows also carry ``subset``: ``all``, or ``open`` / ``closed`` for ``[vqa]`` and ``[qa]``).
        image_size: ``unimed`` only: the pixel size the 0-100 box grid is scaled to for the IoU
            (its inclusive pixel count depends on it); a record's ``width`` / ``height`` win.
        meteor: compute METEOR for ``[caption]`` rows (a Java process per row).
        progress: show a progress bar over the groups.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate_records: protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    if not records:
        raise ValueError("evaluate_records: no records")
    if protocol == "unimed":
        import importlib.util

        missing = [name for name in ("nltk", "rouge") if importlib.util.find_spec(name) is None]
        if missing:
            raise ModuleNotFoundError(f"the unimed protocol needs {' and '.join(missing)}: pip install -e '.[llm]'")
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_task[record["task"]][record["dataset"]].append(record)
    groups = []
    for task in sorted(by_task):
        datasets = by_task[task]
        groups += [(task, dataset, datasets[dataset]) for dataset in sorted(datasets)]
        if len(datasets) > 1:
            groups.append((task, "all", [r for group in datasets.values() for r in group]))
    from tqdm.auto import tqdm

    rows = []
    for task, dataset, group in tqdm(groups, desc=f"scoring ({protocol})", unit="group", disable=not progress):
        if protocol == "umedpt":
            rows.append({"task": task, "dataset": dataset, **score_records(group, meteor=meteor)})
            continue
        from umedpt.mllm import unimed

        for subset, scores in unimed.score_records(task, group, image_size=image_size, meteor=meteor):
            rows.append({"task": task, "dataset": dataset, "subset": subset, **scores})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """The rows as a Markdown table, scores in percent (``-``: not applicable); a ``subset``
    column when the rows have one."""
    subset = any("subset" in row for row in rows)
    header = ["task", "dataset", *(["subset"] if subset else []), "n", *metrics]
    keys = len(header) - len(metrics) - 1
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * keys + ["---:"] * (len(header) - keys)) + "|",
    ]
    for row in rows:
        cells = [row["task"], row["dataset"], *([row.get("subset", "all")] if subset else []), str(row["n"])]
        cells += ["-" if row.get(m) is None else f"{100 * row[m]:.1f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
