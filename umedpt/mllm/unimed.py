"""The Uni-Med evaluation protocol (``umedpt mllm-evaluate --protocol unimed``).

The rules below follow the protocol the Uni-Med paper reports and its evaluation behaves by;
docs/mllm.md lists every difference from umedpt's own protocol with an example.

- **Text normalisation** (:func:`normalize_word`, the VQA-style answer normalisation): the
  characters ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are deleted when the text has one of
  them next to a space or has a digit-comma-digit group, else each becomes a space; periods not
  followed by a digit are deleted (at most 32 of them); lower case; the number words ``none``,
  ``zero`` ... ``ten`` become digits (``none`` -> ``0``); the articles ``a an the`` are dropped;
  contractions written without their apostrophe are restored (``dont`` -> ``don't``); commas go.
- **Predictions** are lower-cased and stripped of ``<unk>`` first.
- **Closed questions** (``[vqa]`` with ``answer_type`` ``CLOSED`` or a yes/no answer): accuracy
  is 1 when the normalised reference is a *substring* of the normalised prediction.
  ``[cls]`` and ``[identify]`` accuracy: the normalised strings are *equal*.
- **BLEU for [vqa], [identify], [qa]**: the mean over answers of nltk's sentence BLEU-n (weights
  ``1/n`` for the first n orders, no smoothing) on the normalised tokens.
- **F1** (:func:`token_f1`): tokens of the normalised texts; true positives count the
  prediction's occurrences of words the reference has, false positives the prediction's words the
  reference lacks, false negatives the reference's words the prediction lacks; 0 when either
  text is empty.
- **[caption]**: answers with an empty prediction or reference are skipped; BLEU-1..4 is the COCO
  corpus BLEU on PTB-tokenised text, METEOR is METEOR 1.5 on the normalised text (both
  :mod:`umedpt.mllm.coco_caption`), ROUGE-1/2/L the mean F of the ``rouge`` package on the
  normalised text (pairs that normalise to nothing skipped), and F1 as above.
- **[refer]** (:func:`parse_box`, :func:`box_iou`): after removing ``<unk>`` and every space the
  answer must *start* with ``{<a><b><c><d>}`` (1-3 digits each; values above 100 are kept); the
  box is scaled from the 0-100 grid to pixels; IoU counts pixels inclusively (``x2 - x1 + 1``);
  R@0.5 counts IoU *strictly above* 0.5; an unparsable answer scores IoU 0.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from umedpt.mllm.prompts import GRID, Box
from umedpt.mllm.prompts import parse_box as parse_reference_box

#: the columns of a report under this protocol, in order
METRICS: tuple[str, ...] = (
    "bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor",
    "f1", "accuracy", "closed_accuracy", "iou", "recall@0.5",
)  # fmt: skip
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_BOX = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


def _contractions() -> dict[str, str]:
    """Apostrophe-free spelling -> contraction, for the English contractions whose
    apostrophe-free spelling is not itself a word (``its``, ``well``, ``were`` stay)."""
    forms = [f"{w}n't" for w in ("ai", "are", "ca", "could", "did", "does", "do", "had", "has", "have", "is",
                                  "might", "must", "need", "ought", "sha", "should", "was", "were", "wo", "would")]
    forms += [f"{w}n't've" for w in ("could", "had", "might", "should", "would")]
    forms += [f"{w}'ve" for w in ("could", "might", "must", "should", "would", "we", "they", "you", "who", "what",
                                   "where", "not")]  # fmt: skip
    forms += [f"{w}'ll" for w in ("it", "they", "you", "who", "what", "somebody", "someone", "something")]
    forms += [f"{w}'re" for w in ("they", "you", "what", "there", "why")]
    forms += [f"{w}'s" for w in ("he", "how", "that", "there", "what", "where", "who", "somebody", "someone",
                                  "when", "why")]  # fmt: skip
    forms += [f"{w}'d" for w in ("he", "it", "they", "you", "who", "there", "how", "where", "someone", "something")]
    forms += [f"{w}'d've" for w in ("he", "it", "she", "they", "you", "who", "there", "we", "someone", "something")]
    forms += ["ma'am", "o'clock", "y'all", "y'all'll", "y'all'd've"]
    return {form.replace("'", ""): form for form in forms}


_CONTRACTIONS = _contractions()


def normalize_word(text: str) -> str:
    """Normalise an answer as the Uni-Med protocol does (see the module docstring)."""
    comma_group = bool(_DIGIT_COMMA_DIGIT.search(text))
    out = text
    for p in _PUNCTUATION:
        spaced = p + " " in text or " " + p in text
        out = out.replace(p, "" if spaced or comma_group else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def clean_prediction(text: str) -> str:
    """A generated answer as the protocol reads it: lower case, ``<unk>`` removed, stripped."""
    return text.lower().replace("<unk>", "").strip()


def token_f1(prediction: str, reference: str) -> float:
    """The protocol's word F1 of two answers (see the module docstring)."""
    pred, ref = Counter(normalize_word(prediction).split()), Counter(normalize_word(reference).split())
    if not pred or not ref:
        return 0.0
    tp = sum(count for word, count in pred.items() if word in ref)
    if tp == 0:
        return 0.0
    fp = sum(count for word, count in pred.items() if word not in ref)
    fn = sum(count for word, count in ref.items() if word not in pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def sentence_bleus(prediction: str, reference: str) -> list[float]:
    """nltk sentence BLEU-1..4 of the normalised tokens (uniform weights over the first n orders)."""
    from nltk.translate.bleu_score import sentence_bleu

    pred, ref = normalize_word(prediction).split(), normalize_word(reference).split()
    weights = [(1.0, 0.0, 0.0, 0.0), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nltk warns for every answer without 4-gram overlap
        return [float(sentence_bleu([ref], pred, weights=w)) for w in weights]


def parse_box(text: str, width: float = GRID, height: float = GRID) -> Box | None:
    """The protocol's box of an answer in pixels, or ``None``: ``<unk>`` and spaces removed, the
    text must start with ``{<a><b><c><d>}`` (1-3 digits each, values above 100 allowed), scaled
    by ``width / 100`` and ``height / 100``."""
    compact = text.replace("<unk>", "").replace(" ", "").strip()
    if not _BOX.match(compact):
        return None
    x1, y1, x2, y2 = (int(v) for v in re.findall(r"\d+", compact)[:4])
    return (x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height)


def box_iou(a: Box, b: Box) -> float:
    """IoU with inclusive pixel counts (``x2 - x1 + 1``); areas are not clipped, as in the
    protocol; 0 when the union is not positive."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union > 0 else 0.0


def is_closed(record: dict[str, Any]) -> bool:
    """A closed question: ``answer_type`` ``CLOSED`` when the record has one, else a yes/no answer."""
    kind = record.get("answer_type")
    if kind is not None:
        return str(kind).upper() == "CLOSED"
    return normalize_word(record["answer"]) in ("yes", "no")


def _record_size(record: dict[str, Any], image_size: float) -> tuple[float, float]:
    return float(record.get("width", image_size)), float(record.get("height", image_size))


def _empty() -> dict[str, Any]:
    return dict.fromkeys(METRICS)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _short_answer_scores(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scores = _empty()
    bleus = [sentence_bleus(clean_prediction(r["prediction"]), r["answer"]) for r in records]
    for n in range(4):
        scores[f"bleu{n + 1}"] = _mean([b[n] for b in bleus])
    scores["f1"] = _mean([token_f1(clean_prediction(r["prediction"]), r["answer"]) for r in records])
    return scores


def _substring_accuracy(records: Sequence[dict[str, Any]]) -> float | None:
    return _mean([float(normalize_word(r["answer"]) in normalize_word(clean_prediction(r["prediction"]))) for r in records])


def _equal_accuracy(records: Sequence[dict[str, Any]]) -> float | None:
    return _mean([float(normalize_word(r["answer"]) == normalize_word(clean_prediction(r["prediction"]))) for r in records])


def _caption_scores(records: Sequence[dict[str, Any]], meteor: bool) -> dict[str, Any]:
    from rouge import Rouge

    from umedpt.mllm import coco_caption

    kept = [(clean_prediction(r["prediction"]), r["answer"]) for r in records]
    kept = [(p, a) for p, a in kept if p and a]
    scores = _empty()
    scores["n_scored"] = len(kept)
    if not kept:
        return scores
    preds, refs = [p for p, _ in kept], [a for _, a in kept]
    tokens = coco_caption.ptb_tokenize([*preds, *refs])
    for n, value in enumerate(coco_caption.coco_bleu(tokens[: len(preds)], tokens[len(preds) :])):
        scores[f"bleu{n + 1}"] = value
    norm_preds, norm_refs = [normalize_word(p) for p in preds], [normalize_word(a) for a in refs]
    if meteor:
        tokens = coco_caption.ptb_tokenize([*norm_preds, *norm_refs])
        scores["meteor"] = coco_caption.meteor(tokens[: len(preds)], tokens[len(preds) :])
    pairs = [(p, a) for p, a in zip(norm_preds, norm_refs, strict=True) if p and a]
    rouge = [Rouge().get_scores(p, a)[0] for p, a in pairs]
    for key, name in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
        scores[name] = _mean([r[key]["f"] for r in rouge])
    scores["f1"] = _mean([token_f1(p, a) for p, a in kept])
    return scores


def score_records(
    task: str, records: Sequence[dict[str, Any]], image_size: float = GRID, meteor: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """(subset, scores) of one task's records under the protocol: ``[vqa]`` and ``[qa]`` give the
    subsets ``all``, ``open`` and ``closed`` (those that have records), every other task ``all``.
    The scores start with ``n``, the subset's number of records."""
    return [(subset, {"n": len(group), **scores}) for subset, group, scores in _score_subsets(task, records, image_size, meteor)]


def _score_subsets(
    task: str, records: Sequence[dict[str, Any]], image_size: float, meteor: bool
) -> list[tuple[str, Sequence[dict[str, Any]], dict[str, Any]]]:
    if task in ("vqa", "qa"):
        closed = [r for r in records if is_closed(r)]
        opened = [r for r in records if not is_closed(r)]
        out = []
        for subset, group in (("all", records), ("open", opened), ("closed", closed)):
            if not group:
                continue
            scores = _short_answer_scores(group)
            scores["closed_accuracy"] = _substring_accuracy([r for r in group if is_closed(r)]) if subset != "open" else None
            out.append((subset, group, scores))
        return out
    if task == "identify":
        scores = _short_answer_scores(records)
        scores["accuracy"] = _equal_accuracy(records)
        return [("all", records, scores)]
    if task == "cls":
        scores = _empty()
        scores["accuracy"] = _equal_accuracy(records)
        return [("all", records, scores)]
    if task == "caption":
        return [("all", records, _caption_scores(records, meteor))]
    if task == "refer":
        ious = []
        for r in records:
            width, height = _record_size(r, image_size)
            ref = parse_reference_box(r["answer"], width, height)
            if ref is None:
                raise ValueError(f"reference {r['answer']!r} (id {r.get('id')!r}) holds no {{<x1><y1><x2><y2>}} box")
            pred = parse_box(r["prediction"], width, height)
            ious.append(0.0 if pred is None else box_iou(pred, ref))
        scores = _empty()
        scores["iou"] = _mean(ious)
        scores["recall@0.5"] = _mean([float(v > 0.5) for v in ious])
        return [("all", records, scores)]
    # a task the protocol has no rule for: the short-answer rules
    return [("all", records, _short_answer_scores(records))]
