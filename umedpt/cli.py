"""Command line: ``lightning``, ``umedpt`` and ``python -m umedpt``.

``lightning fit -c configs/umedpt.yaml`` trains; ``validate``, ``test`` and ``predict`` work the same way.
One LightningCLI parses every config: ``model`` and ``data`` name a ``class_path`` or, without
one, are the arguments of the multi-task pretraining classes (:class:`~umedpt.MultiTaskModule`,
:class:`~umedpt.data.MultiTaskDataModule`), so ``model: {tasks: [...], lr: ...}`` and
``model: {class_path: umedpt.mllm.MLLMModule, init_args: {...}}`` (``configs/mllm.yaml``) are
the same dialect; ``--model.lr`` works for both. The model's ``tasks`` and ``tasks_per_step``
reach a data module that takes them.

Commands that are not Trainer methods are listed in :data:`COMMANDS`; each is a function
``main(args) -> int`` in its own module, imported only when used (``umedpt probe --help``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Lightning's own use of a deprecated torch pytree API, printed once per run (nothing a user can change)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import torch  # noqa: E402
from lightning import LightningDataModule, LightningModule  # noqa: E402
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
from umedpt.tasks import import_class  # noqa: E402


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
    "data": "check task data (umedpt data check -c CONFIG) or write it as litdata chunks for streaming (umedpt data optimize)",
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


def _class_problem(message: str) -> str | None:
    """One line for jsonargparse's report on a ``model`` / ``data`` section that its class refuses:
    ``model (umedpt.MultiTaskModule): option 'lrr' is not accepted (did you mean --model.lr?)``."""
    found = re.search(r'Parser key "(model|data)":.*?Problem with given class_path \'([^\']+)\':\s*\n(.*?)(?:\n\s*- |\Z)',
                      message, re.S)
    if found is None:
        return None
    key, class_path, reason = found.groups()
    reason = re.sub(r"\s+", " ", reason).strip()
    reason = re.sub(r'Parser key "([^"]+)": ', r"\1: ", reason)
    hint = ""
    option = re.search(r"Option '([^']+)' is not accepted", reason)
    if option:
        reason = reason.replace("Option", "option", 1)
        try:
            accepted = list(inspect.signature(import_class(class_path, key)).parameters)
        except (ImportError, AttributeError, TypeError, ValueError):
            accepted = []
        close = difflib.get_close_matches(option.group(1), accepted, n=1, cutoff=0.75)
        hint = f" (did you mean --{key}.{close[0]}?)" if close else ""
    return f"{key} ({class_path}): {reason}{hint}"


class _Parser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors: the message, a close option name, where help is.

    ``UMEDPT_DEBUG=1`` restores jsonargparse's full usage text.
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get("UMEDPT_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        condensed = _class_problem(message)
        text = condensed if condensed is not None else f"{message.strip()}{_did_you_mean(message, parser)}"
        sys.stderr.write(
            f"{prog}: error: {text}\n"
            f"(`{prog} --help` lists the accepted options)\n"
        )
        sys.exit(2)


#: optimizer steps between two periodic checkpoints of a fit (``--checkpoint_every``)
DEFAULT_CHECKPOINT_EVERY = 500


#: how jsonargparse's messages that wrap a class's own error start
_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path")


class UMedPTCLI(LightningCLI):
    """The LightningCLI of every umedpt config (pretraining, IMAX, MLLM), with umedpt's behaviour.

    - ``model`` and ``data`` default to :class:`~umedpt.MultiTaskModule` and
      :class:`~umedpt.data.MultiTaskDataModule`; a ``class_path`` picks another LightningModule
      or data module. The model's ``tasks`` and ``tasks_per_step`` are linked into the data
      module's arguments of those names, where it has them;
    - ``validate`` / ``test`` print umedpt's compact per-task table instead of Lightning's
      tables (``--verbose true`` brings those back);
    - ``predict`` refuses to run without ``--ckpt_path`` (random weights), unless
      ``--untrained true`` says that is what is wanted.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": f"{MultiTaskModule.__module__}.{MultiTaskModule.__qualname__}"},
                             "data": {"class_path": f"{MultiTaskDataModule.__module__}.{MultiTaskDataModule.__qualname__}"}})
        for key in ("tasks", "tasks_per_step"):
            # the data module loads the model's tasks and draws each step's tasks (only their batches load)
            parser.link_arguments(f"model.init_args.{key}", f"data.init_args.{key}", apply_on="parse")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps a class's own error (a TypeError of a misspelt encoder argument,
            # an ImportError of a missing head class) in reports on the class path and on every
            # type the section could have been: the class's error is the one to see
            cause: BaseException = err
            while isinstance(cause, ValueError) and cause.__cause__ is not None and str(cause).startswith(_WRAPPERS):
                cause = cause.__cause__
            if cause is err:
                raise
            raise cause from None

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
        model = config.get("model")
        if model is not None and model.get("class_path") is not None:
            if not issubclass(import_class(model["class_path"], "model"), MultiTaskModule):
                return  # the encoder-and-tasks comparison is MultiTaskModule's
            model = model.get("init_args")
        differences = architecture_differences(hparams, model)
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
        if not isinstance(getattr(self.model, "tasks", None), dict):
            # a module without umedpt tasks (the MLLM stage) writes its predictions its own way
            defaults = [c for c in self.trainer_defaults.get("callbacks", []) if not isinstance(c, TaskPredictionWriter)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
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


def _config_paths(args: Sequence[str]) -> list[Path]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            paths.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            paths.append(Path(arg.split("=", 1)[1]))
    return paths


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
        return UMedPTCLI(
            LightningModule,
            LightningDataModule,
            args=argv_list if args is not None else None,
            run=run,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
            parser_class=_Parser,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,  # the modules build their own optimizers and schedules
            # always present (not configurable; each does nothing for a module without tasks, e.g. the
            # MLLM stage): predict writes one file per task, fit plots per-task learning curves into the
            # run directory, every run writes its metrics files (the progress bar,
            # umedpt.reporting.StepProgressBar, is added in _instantiate_trainer)
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
