"""Command line: ``lightning``, ``umedpt`` and ``python -m umedpt``.

``lightning fit -c configs/umedpt.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same way.
A config whose ``model`` names a ``class_path`` (for example ``configs/mllm.yaml``) runs that
LightningModule and the ``data`` class it names instead of the multi-task pretraining defaults.

Commands that are not Trainer methods are listed in :data:`COMMANDS`; each is a function
``main(args) -> int`` in its own module, imported only when used (``umedpt probe --help``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from umedpt.curves import LearningCurves  # noqa: E402
from umedpt.data.datamodule import MultiTaskDataModule  # noqa: E402
from umedpt.module import MultiTaskModule  # noqa: E402
from umedpt.predict import TaskPredictionWriter  # noqa: E402

#: command name -> "module:function"; the function takes the remaining arguments, returns an exit code.
COMMANDS: dict[str, str] = {
    "probe": "umedpt.probe:main",
    "data": "umedpt.data.check:main",
    "pseudo-label": "umedpt.data.pseudo:main",
    "mllm-evaluate": "umedpt.mllm.evaluate:main",
}


class UMedPTCLI(LightningCLI):
    """LightningCLI whose datamodule receives the model's task list."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.tasks", "data.tasks", apply_on="parse")


def _config_paths(args: Sequence[str]) -> list[Path]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            paths.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            paths.append(Path(arg.split("=", 1)[1]))
    return paths


def _names_model_class(args: Sequence[str]) -> bool:
    """True when a config file (or ``--model``) names the LightningModule's ``class_path``."""
    import yaml

    for arg in args:
        if arg.startswith("--model=") or arg.startswith("--model.class_path"):
            return True
    for path in _config_paths(args):
        if not path.is_file():
            continue  # LightningCLI reports the missing file
        config = yaml.safe_load(path.read_text()) or {}
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and "class_path" in model:
            return True
    return False


def main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Run the CLI (``args=None`` reads ``sys.argv``).

    Trainer subcommands return the LightningCLI object. With ``run=False`` nothing is executed:
    ``cli.model``, ``cli.datamodule`` and ``cli.trainer`` are built from the configuration (no
    subcommand in ``args`` then). Given ``args``, the process's own arguments (pytest's,
    Jupyter's) are ignored. Commands of :data:`COMMANDS` return their exit code.
    """
    argv_list = list(args) if args is not None else sys.argv[1:]
    if argv_list and argv_list[0] in COMMANDS:
        module_name, func = COMMANDS[argv_list[0]].split(":")
        return getattr(importlib.import_module(module_name), func)(argv_list[1:])
    argv = sys.argv
    if args is not None:
        sys.argv = argv[:1]
    try:
        if _names_model_class(argv_list):
            return LightningCLI(
                args=argv_list if args is not None else None,
                run=run,
                subclass_mode_data=True,
                parser_kwargs={"parser_mode": "omegaconf"},
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
            )
        return UMedPTCLI(
            MultiTaskModule,
            MultiTaskDataModule,
            args=argv_list if args is not None else None,
            run=run,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            # always present (not configurable): predict writes one file per task, fit plots
            # per-task learning curves into the run directory
            trainer_defaults={"callbacks": [TaskPredictionWriter(), LearningCurves()]},
        )
    finally:
        sys.argv = argv


def run_cli() -> None:
    """Console entry point of ``lightning`` and ``umedpt`` (the exit status comes from the run)."""
    result = main()
    if isinstance(result, int):
        sys.exit(result)
