"""Command line: ``lightning``, ``umedpt`` and ``python -m umedpt``.

``lightning fit -c configs/umedpt.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same way.
A config whose ``model`` names a ``class_path`` (for example ``configs/mllm.yaml``) runs that
LightningModule and the ``data`` class it names instead of the multi-task pretraining defaults.

Commands that are not Trainer methods are listed in :data:`COMMANDS`; each is a function
``main(args) -> int`` in its own module, imported only when used (``umedpt probe --help``).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Lightning's own use of a deprecated torch pytree API, printed once per run (nothing a user can change)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import torch  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from umedpt.curves import LearningCurves  # noqa: E402
from umedpt.data.datamodule import MultiTaskDataModule  # noqa: E402
from umedpt.device import default_precision  # noqa: E402
from umedpt.module import MultiTaskModule  # noqa: E402
from umedpt.predict import TaskPredictionWriter  # noqa: E402
from umedpt.reporting import MetricsReport, StepProgressBar  # noqa: E402
from umedpt.runs import (  # noqa: E402
    UNREADABLE,
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    architecture_differences,
    last_checkpoint,
    run_of_checkpoint,
    unreadable_checkpoint,
)


class _WithoutTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines (advertisements of cloud services, printed on every fit)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_WithoutTips())

#: command name -> "module:function"; the function takes the remaining arguments, returns an exit code.
COMMANDS: dict[str, str] = {
    "probe": "umedpt.commands.probe:main",
    "data": "umedpt.commands.data:main",
    "pseudo-label": "umedpt.commands.pseudo:main",
    "mllm-evaluate": "umedpt.commands.mllm_evaluate:main",
    "diagnose": "umedpt.commands.diagnose:main",
}


#: one line per command of :data:`COMMANDS`, for ``--help``
COMMAND_HELP: dict[str, str] = {
    "probe": "probes (linear, or the task's head) of frozen encoders on held-out tasks (umedpt probe --help)",
    "data": "check task data before training: umedpt data check -c CONFIG",
    "pseudo-label": "cross-task pseudo labels from trained heads into a new manifest (pseudo-IMAX)",
    "mllm-evaluate": "score the generated answers of an MLLM predict run per task and dataset",
    "diagnose": "tug-of-war and Fisher spectrum of the tasks of trained checkpoints (umedpt diagnose --help)",
}

DESCRIPTION = (
    "umedpt: multi-task pretraining of one shared encoder on many biomedical imaging tasks. "
    "This `lightning` command is umedpt's (it replaces Lightning's own script of that name); "
    "`umedpt` and `python -m umedpt` are the same command. Trainer subcommands: fit, validate, test, "
    "predict, each with a config, e.g. `lightning fit -c configs/umedpt.yaml -c configs/quick.yaml`. "
    "Other commands: "
    + "; ".join(f"`{name}`: {text}" for name, text in COMMAND_HELP.items())
    + "."
)


TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _did_you_mean(message: str, parser: Any) -> str:
    """`` (did you mean --model.lr?)`` for the unrecognised options named in ``message``."""
    if "unrecognized arguments:" not in message:
        return ""
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for token in message.split("unrecognized arguments:", 1)[1].split():
        if token.startswith("--"):
            close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close:
                hints.append(f"{close[0]} for {token.split('=', 1)[0]}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


class _Parser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors: the message, a close option name, where help is.

    ``UMEDPT_DEBUG=1`` restores jsonargparse's full usage text.
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get("UMEDPT_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {message.strip()}{_did_you_mean(message, parser)}\n"
            f"(`{prog} --help` lists the accepted options)\n"
        )
        sys.exit(2)


#: optimizer steps between two periodic checkpoints of a fit (``--checkpoint_every``)
DEFAULT_CHECKPOINT_EVERY = 500


class _CommandsCLI(LightningCLI):
    """LightningCLI with umedpt's command behaviour (both the pretraining and the class-path form).

    - ``validate`` / ``test`` print umedpt's compact per-task table instead of Lightning's
      tables (``--verbose true`` brings those back);
    - ``predict`` refuses to run without ``--ckpt_path`` (random weights), unless
      ``--untrained true`` says that is what is wanted.
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            parser.set_defaults(verbose=False)
        parser.add_argument(
            "--use_checkpoint_model",
            type=bool,
            default=False,
            help="with --ckpt_path: take the model configuration (encoder, tasks) from the checkpoint "
            "even where it differs from the given config (otherwise refused)",
        )
        if subcommand == "fit":
            parser.add_argument(
                "--checkpoint_every",
                type=int,
                default=DEFAULT_CHECKPOINT_EVERY,
                help="write checkpoints/last.ckpt every this many optimizer steps (0: only at the "
                "end of each validation / epoch), so that a killed run loses at most that many steps; "
                "ignored when the trainer's callbacks include a ModelCheckpoint",
            )
        if subcommand == "predict":
            parser.add_argument(
                "--untrained",
                type=bool,
                default=False,
                help="predict with the model's initial (untrained) weights when no --ckpt_path is given",
            )
        return parser

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # umedpt's progress bar unless the user switched bars off or configured one
        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks = [*callbacks, StepProgressBar()]
        # a checkpoint at each validation / epoch end (Lightning's default) and every N steps
        # (validate / test / predict add the same callbacks, so that a fit's checkpoint matches them)
        command = (self.config.get(self.subcommand) or {}) if self.subcommand else {}
        every = int(command.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY) or 0)
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in configured
        ):
            callbacks = [*callbacks, ModelCheckpoint()]
            if every > 0:
                callbacks.append(PeriodicCheckpoint(every_n_train_steps=every))
        # checkpoints written atomically beside their target, unless a checkpoint IO is configured
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the configured model by the checkpoint's hyperparameters: refuse
        # when they describe another encoder or other tasks, unless asked for
        sub = self.config.get("subcommand")
        config = self.config.get(sub) if sub else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            self._check_checkpoint_model(config, ckpt_path)
        try:
            super()._parse_ckpt_path()
        except UNREADABLE as err:
            raise unreadable_checkpoint(ckpt_path, err) from err

    @staticmethod
    def _check_checkpoint_model(config: Any, ckpt_path: str) -> None:
        """Refuse a checkpoint whose encoder or tasks differ from the config (unless asked for)."""
        if config.get("use_checkpoint_model", False):
            return
        try:
            # memory-mapped: only the hyperparameters are read, not every tensor of the file
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
            hparams = checkpoint.get("hyper_parameters", {})
        except UNREADABLE as err:
            raise unreadable_checkpoint(ckpt_path, err) from err
        differences = architecture_differences(hparams, config.get("model"))
        if differences:
            raise ValueError(
                f"checkpoint {ckpt_path} holds another model than the config: "
                + "; ".join(differences)
                + ". Pass the config the checkpoint was trained with, or --use_checkpoint_model true "
                "to take the checkpoint's model configuration"
            )

    def before_instantiate_classes(self) -> None:
        # the precision follows the device unless the configuration sets one
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("precision") is None:
            trainer["precision"] = default_precision(trainer.get("accelerator"))
        if config.get("ckpt_path") == "last" and trainer is not None:
            # the newest checkpoint of the newest run (Lightning's own "last" looks only in the
            # new run's folder, finds nothing and silently starts from scratch)
            root = trainer.get("default_root_dir") or "."
            config["ckpt_path"] = str(last_checkpoint(root))
            print(f"umedpt: --ckpt_path last is {config['ckpt_path']}")
            self._check_checkpoint_model(config, config["ckpt_path"])

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # a run that starts from a checkpoint of a run folder writes into that folder
        config = self.config_init.get(self.subcommand) or {} if self.subcommand else {}
        ckpt = config.get("ckpt_path")
        run = run_of_checkpoint(ckpt) if ckpt else None
        logger = (config.get("trainer") or {}).get("logger")
        if run is not None and logger in (None, True) and "logger" not in kwargs:
            from lightning.pytorch.loggers import TensorBoardLogger

            kwargs["logger"] = TensorBoardLogger(save_dir=str(run.save_dir), name=run.name, version=run.version)
        return super().instantiate_trainer(**kwargs)

    def before_predict(self) -> None:
        config = self.config_init["predict"]
        if config.get("ckpt_path") is None and not config.get("untrained", False):
            raise SystemExit(
                "umedpt predict: no --ckpt_path given, so the predictions would come from untrained "
                "(random) weights. Pass the checkpoint of a fit, e.g. --ckpt_path "
                "runs/quick/lightning_logs/version_0/checkpoints/last.ckpt, or --untrained true "
                "to predict with the initial weights on purpose."
            )


class UMedPTCLI(_CommandsCLI):
    """LightningCLI whose datamodule receives the model's task list and tasks per step."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.tasks", "data.tasks", apply_on="parse")
        # the data module draws each step's tasks, so that only their batches are loaded
        parser.link_arguments("model.tasks_per_step", "data.tasks_per_step", apply_on="parse")


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
    if (
        argv_list
        and argv_list[0] in TRAINER_COMMANDS
        and not _config_paths(argv_list)
        and not any(a in ("-h", "--help") or a.startswith("--model") for a in argv_list)
    ):
        raise SystemExit(
            f"umedpt {argv_list[0]}: pass a config, e.g. `lightning {argv_list[0]} -c configs/umedpt.yaml "
            "-c configs/quick.yaml` (the quick CPU recipe) or `-c configs/umedpt.yaml` (the full one)"
        )
    argv = sys.argv
    if args is not None:
        sys.argv = argv[:1]
    try:
        if _names_model_class(argv_list):
            return _CommandsCLI(
                args=argv_list if args is not None else None,
                run=run,
                subclass_mode_data=True,
                auto_configure_optimizers=False,  # the modules configure their own optimisers
                parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
                parser_class=_Parser,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
            )
        return UMedPTCLI(
            MultiTaskModule,
            MultiTaskDataModule,
            args=argv_list if args is not None else None,
            run=run,
            parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
            parser_class=_Parser,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,  # MultiTaskModule builds its own AdamW and schedule
            # always present (not configurable): predict writes one file per task, fit plots
            # per-task learning curves into the run directory, every run writes its metrics files,
            # (the progress bar, umedpt.reporting.StepProgressBar, is added by _CommandsCLI)
            trainer_defaults={
                "callbacks": [TaskPredictionWriter(), LearningCurves(), MetricsReport()]
            },
        )
    finally:
        sys.argv = argv


def run_cli() -> None:
    """Console entry point of ``lightning`` and ``umedpt`` (the exit status comes from the run).

    A configuration or data error (``ValueError``, ``TypeError``, ``KeyError``, ``ImportError``,
    ``OSError``) prints its message as one line, exit status 2; ``UMEDPT_DEBUG=1`` shows the
    traceback instead.
    """
    try:
        result = main()
    except (ValueError, TypeError, KeyError, ImportError, OSError) as err:
        if os.environ.get("UMEDPT_DEBUG"):
            raise
        text = str(err).strip() or repr(err)
        sys.stderr.write(f"umedpt: error ({type(err).__name__}): {text}\n(UMEDPT_DEBUG=1 shows the traceback)\n")
        sys.exit(2)
    if isinstance(result, int):
        sys.exit(result)
