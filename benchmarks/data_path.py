"""Data path: samples/s the datasets deliver versus samples/s the training step consumes.

For each task of the recipe the train dataset is read item by item in this process (decode,
render or read, transform, normalise: exactly what a DataLoader worker does), giving the
samples/s of ONE loading process. The recipe's step consumes ``sum(batch sizes)`` samples; its
compute time comes from the same plain step as ``loop_overhead.py`` on pre-built batches.

Loading capacity with the recipe's workers: with ``W >= 1`` workers per task the tasks load in
parallel to the step (``W`` processes per task, capped by the CPU cores left to them), with
``W = 0`` loading runs in the training process, between the steps. ``headroom`` = time the step
may spend waiting for data divided by the time loading takes; >= 2 means loading never limits.

    python benchmarks/data_path.py                     # quick recipe (64 px, 0 workers), CPU
    python benchmarks/data_path.py --recipe full --device cuda

Writes ``benchmarks/results/data_path_<recipe>_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from common import build_datamodule, build_model, device_name, fixed_batches, markdown_table, write_result
from loop_overhead import plain_run


def samples_per_second(dataset: Any, count: int) -> float:
    """Items per second of ``dataset[i]`` for ``count`` items (after one warm-up item)."""
    dataset[0]
    start = time.perf_counter()
    for i in range(1, count + 1):
        dataset[i % len(dataset)]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--items", type=int, default=64, help="items read per task")
    parser.add_argument("--steps", type=int, default=4, help="training steps timed (the first is warm-up)")
    args = parser.parse_args()

    torch.set_flush_denormal(True)
    datamodule = build_datamodule(args.recipe)
    rows = []
    for task in datamodule.tasks:
        dataset = datamodule.build_dataset(task, "train")
        workers = datamodule.num_workers if task.num_workers is None else task.num_workers
        rate = samples_per_second(dataset, args.items)
        rows.append({"task": task.name, "kind": task.kind, "batch_size": task.batch_size,
                     "workers": workers, "samples_per_s": round(rate, 1),
                     "load_s_per_step": task.batch_size / rate})  # fmt: skip
        print(rows[-1], flush=True)

    model = build_model(args.recipe)
    batches = fixed_batches(args.recipe, model.task_names, args.steps, args.device)
    step_s = statistics.median(plain_run(model, batches, args.device, "bf16-mixed" if args.device == "cuda" else "32-true"))
    consumed = sum(r["batch_size"] for r in rows) / step_s
    cores = os.cpu_count() or 1
    if all(r["workers"] == 0 for r in rows):
        # in-process loading: the step waits for all of it, serially
        load_s = sum(r["load_s_per_step"] for r in rows)
        headroom = step_s / load_s
        mode = "in-process (0 workers): loading adds to every step"
    else:
        # each task's workers prepare its next batches while the step computes; at most ``cores``
        # processes run at once, so the tasks' loading time is shared out over them
        processes = min(cores, sum(max(1, r["workers"]) for r in rows))
        load_s = sum(r["load_s_per_step"] for r in rows) / processes
        headroom = step_s / load_s
        mode = f"{processes} worker processes in parallel with the step"
    table = markdown_table(
        ["task", "kind", "samples/s (1 process)", "batch", "load s/step"],
        [[r["task"], r["kind"], r["samples_per_s"], r["batch_size"], f"{r['load_s_per_step']:.3f}"] for r in rows],
    )
    print("\n" + table)
    print(f"\nstep compute {step_s:.3f} s ({consumed:.0f} samples/s consumed); loading {load_s:.3f} s/step, "
          f"{mode}; headroom {headroom:.1f}x (target >= 2)")  # fmt: skip
    write_result(
        f"data_path_{args.recipe}_{args.device}",
        {
            "benchmark": "data_path",
            "recipe": args.recipe,
            "device": device_name(args.device),
            "cores": cores,
            "step_s": round(step_s, 4),
            "consumed_samples_per_s": round(consumed, 1),
            "load_s_per_step": round(load_s, 4),
            "loading": mode,
            "headroom": round(headroom, 2),
            "tasks": [{**r, "load_s_per_step": round(r["load_s_per_step"], 4)} for r in rows],
        },
    )


if __name__ == "__main__":
    main()
