"""``umedpt mllm-evaluate``: score the generated answers of an MLLM predict run per task and dataset
(:func:`umedpt.mllm.evaluate.evaluate`)."""

from __future__ import annotations

from umedpt.mllm.evaluate import evaluate

__all__ = ["main"]


def main(args: list[str]) -> int:
    """Command line of ``umedpt mllm-evaluate``; returns the exit status."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="umedpt mllm-evaluate",
        description="Score generated answers (BLEU-1..4, ROUGE-1/2/L, token F1, exact match, "
        "closed-question accuracy, REC IoU and R@0.5) per task and dataset.",
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
    config = parser.parse_args(args)
    evaluate(config.predictions, config.references, config.output_dir)
    return 0
