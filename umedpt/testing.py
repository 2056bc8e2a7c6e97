"""Helpers for short runs in tests, benchmarks and notebooks."""

from __future__ import annotations

from typing import Any

__all__ = ["QUIET_TRAINER", "quiet_trainer"]

#: Trainer settings of a short CPU run that writes and prints nothing and does not validate
QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "max_epochs": -1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


def quiet_trainer(**overrides: Any) -> Any:
    """A ``lightning.Trainer`` with :data:`QUIET_TRAINER`'s settings; ``overrides`` add to or
    replace them (``max_steps=20``, ``default_root_dir=tmp_path``, ``devices=2``, ...)."""
    from lightning import Trainer

    return Trainer(**{**QUIET_TRAINER, **overrides})
