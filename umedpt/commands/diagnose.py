"""``umedpt diagnose``: how the tasks of trained checkpoints pull on the shared encoder.

For each checkpoint (e.g. the periodic ones of a run: initial, early, mid and late training), the
gradients of every task on a few fixed batches of its training data are compared
(:func:`umedpt.diagnostic_callbacks.measure`): Uni-Med's gradient-direction interference GD,
magnitude similarity GM and tug-of-war index, the statistics score per parameter, and IMAX's
Fisher spectral entropy SE and dominant ratio rho. Writes ``diagnostics.json``, a table
``diagnostics.md``, ``interference.png`` (the last checkpoint) and ``fisher_phases.png`` (every
checkpoint)::

    umedpt diagnose --ckpt_path 'runs/quick/lightning_logs/version_0/checkpoints/*.ckpt'
    umedpt diagnose -c configs/umedpt.yaml -c configs/quick.yaml --ckpt_path last.ckpt --num_batches 16

Without ``-c`` the tasks and their data come from the run's saved ``config.yaml``. A checkpoint
of the MLLM stage (:class:`~umedpt.mllm.MLLMModule`) is measured at its connector by default, on
training batches of each image task from the data module the checkpoint was trained with::

    umedpt diagnose --ckpt_path 'runs/mllm/lightning_logs/version_0/checkpoints/*.ckpt'
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser

from umedpt.commands.pseudo import load_model
from umedpt.data.check import load_tasks
from umedpt.data.datamodule import MultiTaskDataModule
from umedpt.diagnostic_callbacks import draw_batches, measure, plot_interference, plot_phases
from umedpt.tasks import as_task

__all__ = ["main", "run"]


def _checkpoints(patterns: Sequence[str]) -> list[tuple[Path, int, bool]]:
    """The checkpoint files of ``patterns`` (paths or globs), by step: ``(path, optimizer step,
    whether it is of the MLLM stage)`` (its hyper-parameters name a connector and an LLM), from
    one memory-mapped read of each file."""
    found: dict[Path, tuple[int, bool]] = {}
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not paths:
            raise FileNotFoundError(f"--ckpt_path {pattern!r}: no file matches")
        for path in map(Path, paths):
            if not path.is_file():
                raise FileNotFoundError(f"--ckpt_path: checkpoint {path} does not exist")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            state = state if isinstance(state, dict) else {}
            hparams = state.get("hyper_parameters") or {}
            found[path] = (int(state.get("global_step", 0)), "connector" in hparams and "llm" in hparams)
    return sorted(((p, step, mllm) for p, (step, mllm) in found.items()), key=lambda item: (item[1], str(item[0])))


def _run_config(checkpoint: Path) -> list[str]:
    """``[<run dir>/config.yaml]`` (the config LightningCLI saved) for a checkpoint in
    ``<run dir>/checkpoints/``, else ``[]``."""
    saved = checkpoint.resolve().parent.parent / "config.yaml"
    return [str(saved)] if checkpoint.resolve().parent.name == "checkpoints" and saved.is_file() else []


def _mllm(
    path: Path, device: str, num_batches: int, batches: dict[str, list[Any]] | None, tasks: list[str] | None
) -> tuple[Any, dict[str, list[Any]]]:
    """The MLLM of checkpoint ``path`` (eval mode) and ``num_batches`` training batches of each of its
    image tasks (drawn once, from the data module the checkpoint was trained with, and reused)."""
    from umedpt.mllm import InstructionDataModule, MLLMModule

    model = MLLMModule.load_from_checkpoint(path, map_location=device).eval()
    if batches is None:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        # the data module's own arguments (LightningCLI adds "_class_path" and "_instantiator")
        saved = dict(state.get("datamodule_hyper_parameters") or {})
        data = InstructionDataModule(**{k: v for k, v in saved.items() if not k.startswith("_")})
        data.prepare_data()
        data.setup("fit")
        batches = data.task_batches(num_batches)
        if tasks:
            unknown = sorted(set(tasks) - set(batches))
            if unknown:
                raise ValueError(f"--tasks {unknown}: no image task of the MLLM's data of that name ({sorted(batches)})")
            batches = {t: batches[t] for t in tasks}
        if len(batches) < 2:
            raise ValueError(f"{path}: {len(batches)} image task(s) with {num_batches} training batches; "
                             "the diagnostics compare two or more")  # fmt: skip
        print(f"umedpt diagnose: MLLM connector, {len(batches)} image tasks, {num_batches} train batches each",
              file=sys.stderr)  # fmt: skip
    return model, batches


def run(
    ckpt_path: list[str],
    config: list[str] | None = None,
    num_batches: int = 8,
    parameters: str = "auto",
    sketch_dim: int | Literal["auto"] | None = "auto",
    split: str = "train",
    tasks: list[str] | None = None,
    output: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Diagnose every checkpoint of ``ckpt_path``; write and return the report.

    Args:
        ckpt_path: checkpoint files or globs (each is one phase, labelled by its step).
        config: training YAML configs whose tasks give the data (default: the ``config.yaml``
            that the CLI saved in the checkpoint's run directory, else the checkpoint's tasks).
        num_batches: batches per task.
        parameters: sub-module whose gradients are compared (``encoder``, ``heads.<task>``,
            ``connector``...); ``auto``: the encoder of a pretraining checkpoint, the connector
            of an MLLM one.
        sketch_dim: keep gradients as count sketches of this length; ``auto``: only when the
            full gradients would exceed 2 GiB (then 65536); ``null``: never.
        split: the data split the batches come from.
        tasks: only these tasks (default: all of the model's).
        output: folder of the report (default: ``diagnostics/`` beside the first checkpoint).
        seed: seed of the batch draw (the same batches for every checkpoint).
        device: where the model runs.
    """
    checkpoints = _checkpoints(ckpt_path)
    out = Path(output) if output else checkpoints[0][0].parent.parent / "diagnostics"
    report: dict[str, Any] = {"checkpoints": []}
    datasets = batches = None
    for path, step, mllm in checkpoints:
        if mllm:
            model, batches = _mllm(path, device, num_batches, batches, tasks)
            result = measure(model, {}, num_batches, "connector" if parameters == "auto" else parameters, sketch_dim,
                             batches=batches)  # fmt: skip
            result.update(checkpoint=str(path), step=step, label=f"step {step}")
            report["checkpoints"].append(result)
            print(f"umedpt diagnose: {path.name} (step {step}) done", file=sys.stderr)
            continue
        parameters = "encoder" if parameters == "auto" else parameters
        model, data_hparams = load_model(path, map_location=device)
        if datasets is None:
            config = config or _run_config(path)
            if config:
                specs, defaults = load_tasks(config)
            else:
                print(f"umedpt diagnose: no -c and no config.yaml beside {path.parent}: the checkpoint's task "
                      "specs without data.dataset_defaults", file=sys.stderr)  # fmt: skip
                specs, defaults = list(model.tasks.values()), dict(data_hparams.get("dataset_defaults") or {})
            chosen = tasks or list(model.tasks)
            unknown = sorted(set(chosen) - set(model.tasks))
            if unknown:
                raise ValueError(f"--tasks {unknown} are not tasks of the model {list(model.tasks)}")
            by_name = {t.name: as_task(t) for t in specs}
            missing = sorted(set(chosen) - set(by_name))
            if missing:
                raise ValueError(f"tasks {missing} of the model have no data in the configs {config}")
            module = MultiTaskDataModule(tasks=[by_name[n] for n in chosen], dataset_defaults=defaults)
            datasets = {n: module.build_dataset(by_name[n], split) for n in chosen}
            print(f"umedpt diagnose: {len(chosen)} tasks, {num_batches} {split} batches each", file=sys.stderr)
        if batches is None:  # the same batches for every checkpoint
            batches = draw_batches(model, datasets, num_batches, seed)
        result = measure(model, datasets, num_batches, parameters, sketch_dim, batches=batches)
        result.update(checkpoint=str(path), step=step, label=f"step {step}")
        report["checkpoints"].append(result)
        print(f"umedpt diagnose: {path.name} (step {step}) done", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(report, indent=1))
    last = report["checkpoints"][-1]
    plot_interference(last, out / "interference.png", f"{Path(last['checkpoint']).name} (step {last['step']})")
    plot_phases({r["label"]: r for r in report["checkpoints"]}, out / "fisher_phases.png")
    (out / "diagnostics.md").write_text(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    """Markdown: per checkpoint and task, the tug-of-war index, gradient norm, SE and rho."""
    lines = ["| step | task | tug-of-war | grad norm | SE | rho |", "|---|---|---|---|---|---|"]
    for r in report["checkpoints"]:
        for i, task in enumerate(r["tasks"]):
            f = r["fisher"][task]
            lines.append(
                f"| {r['step']} | {task} | {r['tug_of_war'][i]:.3f} | {r['grad_norm'][i]:.3g} | {f['se']:.3f} | {f['rho']:.3f} |"
            )
        f = r["fisher"]["all"]
        lines.append(f"| {r['step']} | all tasks | | | {f['se']:.3f} | {f['rho']:.3f} |")
    lines.append("")
    lines.append("statistics score (mean over parameters): " + ", ".join(
        f"step {r['step']} {r['statistics_score_mean']:.3f}" for r in report["checkpoints"]))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(args: Sequence[str] | None = None) -> int:
    """``umedpt diagnose``: parse ``args``, run, print the table; exit status 2 for bad input."""
    parser = ArgumentParser(prog="umedpt diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", help="training YAML config (repeatable)")
    parser.add_argument("--ckpt_path", nargs="+", required=True, help="checkpoint files or quoted globs, one per phase")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all of the model's)")
    parser.add_function_arguments(run, as_group=False, skip={"config", "ckpt_path", "tasks"})
    cfg = parser.parse_args(list(args) if args is not None else sys.argv[1:])
    values = {k: v for k, v in cfg.as_dict().items() if k != "__path__"}
    if values.get("tasks") and len(values["tasks"]) == 1 and values["tasks"][0].startswith("["):
        import yaml

        values["tasks"] = [str(t) for t in yaml.safe_load(values["tasks"][0])]  # the list form '[a, b]'

    try:
        report = run(**values)
    except (FileNotFoundError, ValueError) as err:
        print(f"umedpt diagnose: error: {err}", file=sys.stderr)
        return 2
    print(table(report), end="")
    return 0
