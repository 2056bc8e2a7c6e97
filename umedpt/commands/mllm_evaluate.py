"""``umedpt mllm-evaluate``: score the generated answers of an MLLM predict run per task and dataset
(:func:`umedpt.mllm.evaluate.evaluate`)."""

from __future__ import annotations

from typing import Literal

from umedpt.mllm.evaluate import evaluate
from umedpt.mllm.prompts import GRID

__all__ = ["main"]


def main(args: list[str]) -> int:
    """Command line of ``umedpt mllm-evaluate``; returns the exit status."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="umedpt mllm-evaluate",
        description="Score generated answers (BLEU-1..4, ROUGE-1/2/L, METEOR, token F1, exact match, "
        "closed-question accuracy, REC IoU and R@0.5) per task and dataset, by umedpt's rules or "
        "Uni-Med's (--protocol unimed; docs/mllm.md lists the differences).",
    )
    parser.add_argument("predictions", type=str, help="predictions JSONL written by `lightning predict`")
    parser.add_argument(
        "--references",
        type=str | None,
        default=None,
        help="instruction JSONL with the reference answers (by id)",
    )
    parser.add_argument(
        "--output_dir", type=str | None, default=None, help="where to write (default: beside the predictions)"
    )
    parser.add_argument(
        "--protocol",
        type=Literal["umedpt", "unimed"],
        default="umedpt",
        help="scoring rules: umedpt (default) or Uni-Med's published protocol",
    )
    parser.add_argument(
        "--image_size",
        type=float,
        default=GRID,
        help="unimed: pixel size the 0-100 box grid is scaled to for its inclusive-pixel IoU "
        "(records with width/height use theirs)",
    )
    parser.add_argument(
        "--meteor", type=bool, default=True, help="compute METEOR 1.5 for [caption] (needs Java)"
    )
    config = parser.parse_args(args)
    evaluate(
        config.predictions,
        config.references,
        config.output_dir,
        protocol=config.protocol,
        image_size=config.image_size,
        meteor=config.meteor,
    )
    return 0
