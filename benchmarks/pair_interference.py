"""Gradient interference between two tasks trained together, over training (umedpt.diagnostics).

Fits ``radiograph_grade`` + ``histology_dominant`` jointly (both tasks in every step, the quick
recipe's settings, as ``benchmarks/learning.py --modes multi`` does) and, at the chosen steps,
collects each task's shared-encoder gradient on the same fixed training batches; then reports
``interference``: GD[i, j] (how a step along task j's gradient directions moves task i,
relative to task i's own; negative = j works against i), GM (magnitude similarity) and the
tug-of-war index per task, plus each task's mean gradient norm.

    python benchmarks/pair_interference.py                 # 3 seeds, steps 0 300 1000
    python benchmarks/pair_interference.py --seeds 0 --steps 0 100

Writes ``benchmarks/results/pair_interference_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, markdown_table, quiet_trainer, write_result  # noqa: E402
from benchmarks.learning import datamodule, encoder_args, recipe_config, task_specs  # noqa: E402

TASKS = ["radiograph_grade", "histology_dominant"]


def measure(model: Any, loaders: dict[str, list[Any]]) -> dict[str, Any]:
    from umedpt.diagnostics import interference, task_gradients

    grads = task_gradients(model.task_loss, loaders, model.encoder.parameters(), num_batches=len(next(iter(loaders.values()))))
    out = interference(grads)
    norms = {name: statistics.fmean(float(g.norm()) for g in rows) for name, rows in grads.items()}
    return {
        "gd": out["gd"].tolist(),
        "gm": out["gm"].tolist(),
        "tug_of_war": out["tug_of_war"].tolist(),
        "grad_norm": [norms[n] for n in out["tasks"]],
    }


def run(seed: int, steps: list[int], batches: int) -> dict[str, Any]:
    from lightning import Callback, seed_everything
    from torch.utils.data import DataLoader

    from umedpt import MultiTaskModule, SwinEncoder
    from umedpt.data.loading import collate_cases

    cfg = recipe_config("quick", [])
    tasks = task_specs(cfg, TASKS)
    seed_everything(seed, verbose=False)
    model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("tasks", "encoder")}
    model_cfg.update(export_encoder=False, tasks_per_step=None, seed=seed)
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**encoder_args(cfg)), **model_cfg)
    dm = datamodule(cfg, tasks, seed)
    dm.setup("fit")
    fixed = {
        t.name: list(DataLoader(dm.datasets["train"][t.name], batch_size=t.batch_size, collate_fn=collate_cases))[:batches]
        for t in tasks
    }
    found: dict[int, Any] = {}
    if 0 in steps:
        found[0] = measure(model, fixed)

    class Measure(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step in steps:
                found[trainer.global_step] = measure(pl_module, fixed)

    quiet_trainer(max(steps), callbacks=[Measure()]).fit(model, datamodule=dm)
    return {str(step): found[step] for step in steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 300, 1000])
    parser.add_argument("--batches", type=int, default=8, help="fixed training batches per task")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/pair_interference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        runs[str(seed)] = run(seed, sorted(set(args.steps)), args.batches)
        print(f"[{time.perf_counter() - start:6.0f} s] seed {seed} done", flush=True)
    rows = []
    for seed, by_step in runs.items():
        for step, m in by_step.items():
            rows.append([
                seed, step, f"{m['gd'][0][1]:+.3f}", f"{m['gd'][1][0]:+.3f}", f"{m['gm'][0][1]:.3f}",
                f"{m['grad_norm'][0]:.2f}", f"{m['grad_norm'][1]:.2f}",
                f"{m['tug_of_war'][0]:.3f}", f"{m['tug_of_war'][1]:.3f}",
            ])
    header = ["seed", "step", "GD[rad, hist]", "GD[hist, rad]", "GM", "norm rad", "norm hist", "ToW rad", "ToW hist"]
    table = markdown_table(header, rows)
    result = {"benchmark": "pair_interference", "command": command, "tasks": TASKS, "batches": args.batches, "runs": runs}
    write_result("pair_interference_cpu", result)
    (RESULTS / "pair_interference_cpu.md").write_text(
        f"Shared-encoder gradient interference of {TASKS[0]} (rad) and {TASKS[1]} (hist) trained together "
        f"(quick recipe, both tasks every step), on {args.batches} fixed training batches per task; "
        f"GD[i, j] < 0: a step along task j's gradients raises task i's loss. Command: `{command}`\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
