"""DDP on CPU (gloo): gradient all-reduces per optimizer step and time per step, 2 processes vs 1.

Runs the real ``Trainer.fit`` of the recipe's :class:`MultiTaskModule` (all tasks) once with one
process and once with two processes (``ddp``, gloo, launched here with ``RANK``/``WORLD_SIZE``
set, each rank with its own batches). A DDP comm hook counts the all-reduce calls during each
step: the task-by-task loop skips the synchronisation for all tasks but the last, so a step must
cost ONE all-reduce pass (one call per gradient bucket), not one per task.

    python benchmarks/ddp_step.py                 # quick recipe, 2 cores: 1 thread per process

Writes ``benchmarks/results/ddp_step_<recipe>_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, build_model, device_name, fixed_batches, markdown_table, write_result

HOOK_CALLS: list[int] = []


def counting_allreduce(state, bucket):  # unannotated: DDP rejects string annotations here
    """DDP comm hook: count the call, then run DDP's default all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    HOOK_CALLS.append(int(bucket.buffer().numel()))
    return default_hooks.allreduce_hook(state, bucket)


def worker(recipe: str, steps: int, out: Path) -> None:
    import torch
    from lightning import Callback, Trainer
    from loop_overhead import StepClock, loader

    from umedpt.testing import quiet_trainer

    class HookCounter(Callback):
        """Registers the counting hook; records the hook calls of each step."""

        def __init__(self) -> None:
            self.per_step: list[int] = []

        def on_train_start(self, trainer: Trainer, *args: Any) -> None:
            if trainer.world_size > 1:
                trainer.strategy.model.register_comm_hook(None, counting_allreduce)

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = len(HOOK_CALLS)

        def on_train_batch_end(self, *args: Any) -> None:
            self.per_step.append(HOOK_CALLS[self._start :])

    torch.set_flush_denormal(True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model = build_model(recipe)
    batches = fixed_batches(recipe, model.task_names, steps, "cpu", seed=rank)
    clock, counter = StepClock(), HookCounter()
    strategy = "auto" if world == 1 else "ddp_find_unused_parameters_true"
    trainer = quiet_trainer(devices=world, strategy=strategy, max_steps=steps, callbacks=[clock, counter])
    trainer.fit(model, train_dataloaders=loader(batches))
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][1:]
    record = {"rank": rank, "world_size": world, "median_step_s": statistics.median(times),
              "hook_calls_per_step": [len(c) for c in counter.per_step],
              # gradient elements all-reduced per step / elements of one gradient: sync passes
              "sync_passes_per_step": [round(sum(c) / numel, 3) for c in counter.per_step], "threads": torch.get_num_threads(),
              "samples_per_step": sum(t.batch_size for t in model.tasks.values())}  # fmt: skip
    (out / f"rank{rank}_of{world}.json").write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, world: int, out: Path) -> list[dict[str, Any]]:
    threads = max(1, (os.cpu_count() or 1) // world)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": str(threads)}  # fmt: skip
        if world == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        cmd = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps), "--worker", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        log = proc.communicate()[0]
        if proc.returncode:
            raise SystemExit(f"{world}-process run failed:\n{log[-3000:]}")
    return [json.loads((out / f"rank{r}_of{world}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["quick"], default="quick")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (the first is warm-up)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.recipe, args.steps, args.worker)
        return

    with tempfile.TemporaryDirectory() as tmp:
        runs = {world: launch(args, world, Path(tmp)) for world in (1, 2)}
    rows = []
    for world, ranks in runs.items():
        step_s = max(r["median_step_s"] for r in ranks)
        calls = sorted({c for r in ranks for c in r["hook_calls_per_step"]})
        passes = sorted({c for r in ranks for c in r["sync_passes_per_step"]})
        rows.append({"processes": world, "threads_per_process": ranks[0]["threads"], "median_step_s": round(step_s, 4),
                     "samples_per_s": round(world * ranks[0]["samples_per_step"] / step_s, 1),
                     "allreduce_calls_per_step": calls, "sync_passes_per_step": passes})  # fmt: skip
    rows[1]["step_time_ratio_vs_1"] = round(rows[1]["median_step_s"] / rows[0]["median_step_s"], 3)
    print("\n" + markdown_table(
        ["processes", "threads each", "median step s", "samples/s", "all-reduce calls (buckets) per step",
         "gradient sync passes per step"],
        [[r["processes"], r["threads_per_process"], r["median_step_s"], r["samples_per_s"],
          ", ".join(map(str, r["allreduce_calls_per_step"])) or "-",
          ", ".join(map(str, r["sync_passes_per_step"])) or "-"] for r in rows],
    ))  # fmt: skip
    write_result(
        f"ddp_step_{args.recipe}_cpu",
        {"benchmark": "ddp_step", "recipe": args.recipe, "device": device_name("cpu"), "backend": "gloo",
         "steps": args.steps, "rows": rows},  # fmt: skip
    )


if __name__ == "__main__":
    main()
