"""Command line: ``lightning``, ``umedpt`` and ``python -m umedpt`` run one LightningCLI.

``lightning fit -c configs/umedpt.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from umedpt.data.datamodule import MultiTaskDataModule  # noqa: E402
from umedpt.module import MultiTaskModule  # noqa: E402
from umedpt.predict import TaskPredictionWriter  # noqa: E402


class UMedPTCLI(LightningCLI):
    """LightningCLI whose datamodule receives the model's task list."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.tasks", "data.tasks", apply_on="parse")


def main(args: Sequence[str] | None = None, run: bool = True) -> UMedPTCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); return the LightningCLI object.

    With ``run=False`` nothing is executed: ``cli.model``, ``cli.datamodule`` and
    ``cli.trainer`` are built from the configuration (no subcommand in ``args`` then).
    Given ``args``, the process's own arguments (pytest's, Jupyter's) are ignored.
    """
    argv = sys.argv
    if args is not None:
        sys.argv = argv[:1]
    try:
        return UMedPTCLI(
            MultiTaskModule,
            MultiTaskDataModule,
            args=list(args) if args is not None else None,
            run=run,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            # always present (not configurable): predict writes one file per task
            trainer_defaults={"callbacks": [TaskPredictionWriter()]},
        )
    finally:
        sys.argv = argv


def run_cli() -> None:
    """Console entry point of ``lightning`` and ``umedpt`` (the exit status comes from the run)."""
    main()
