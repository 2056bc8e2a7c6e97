"""Peak memory of training versus the number of tasks: umedpt loop vs naive loop.

umedpt's loop runs forward + backward task by task, so only one task's activations are alive at
a time. The naive loop forwards every task, sums the losses and runs one backward, so all
activations are alive together. Each point builds the model with exactly ``T`` tasks (heads,
gradients and optimizer state grow with ``T`` in both loops) in a fresh subprocess and runs
``--steps`` optimizer steps. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and,
on CPU, the peak resident set size above the process's size once the libraries are imported
(so it holds the model, gradients, AdamW state, the batches and the activations), with glibc's
mmap threshold fixed so that freed buffers leave the RSS.

The task order interleaves the kinds (segmentation, detection, classification, multi-label,
...), led by the single task with the largest peak (measured first), so ``peak(T) / peak(1)`` is
the memory price of adding tasks to the most demanding one. Two self-supervised tasks
(``--ssl``, from ``configs/ssl_quick.yaml``: a masked-pixel and a masked-feature task with its
EMA teacher) are then added to all the recipe's tasks: with the task-by-task loop they should
cost their heads, the teacher and optimizer state, not a second task's activations.

    python benchmarks/memory_vs_tasks.py                          # quick recipe, CPU
    python benchmarks/memory_vs_tasks.py --recipe full            # swin_tiny, 224 px, CPU
    python benchmarks/memory_vs_tasks.py --recipe full --device cuda

Writes ``benchmarks/results/memory_vs_tasks_<recipe>_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

from common import (
    ROOT,
    build_model,
    device_name,
    fixed_batches,
    markdown_table,
    peak_rss_mb,
    recipe_tasks,
    rss_mb,
    write_result,
)

KIND_ORDER = ("segmentation", "detection", "classification", "multilabel")


def worker(recipe: str, names: list[str], mode: str, device: str, steps: int) -> dict[str, Any]:
    """Build a model with the tasks ``names``, run ``steps`` steps in ``mode``, return memory figures."""
    import torch

    from umedpt.kinds import SSL_KINDS
    from umedpt.module import MultiTaskModule  # noqa: F401  (import the stack before the baseline)

    if device == "cuda":
        torch.cuda.init()
    torch.set_flush_denormal(True)  # as MultiTaskModule does while fitting on CPU
    base = rss_mb()
    batches = fixed_batches(recipe, names, 1, device)[0]
    batch_mb = sum(b["image"].numel() * 4 for b in batches.values()) / 2**20
    model = build_model(recipe, names).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer, _ = model.build_optimizer(steps)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if mode == "umedpt":
                model.accumulate(batches)
            else:
                sum(model.task_loss(n, batches[n]) for n in names).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb() - base
    # fp32 parameters, gradients and the two AdamW moments
    state_mb = 4 * 4 * params / 2**20
    return {
        "tasks": len(names),
        "ssl_tasks": sum(model.tasks[n].kind in SSL_KINDS for n in names),
        "mode": mode,
        "params_m": round(params / 1e6, 3),
        "peak_mb": round(peak, 1),
        "state_mb": round(state_mb, 1),
        "batch_mb": round(batch_mb, 1),
        "activations_mb": round(peak - state_mb - batch_mb, 1),
        "last_step_s": round(step_s, 3),
    }


def run_point(args: argparse.Namespace, names: list[str], mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--recipe", args.recipe, "--device", args.device,
           "--steps", str(args.steps), "--worker", mode, *names]  # fmt: skip
    # a fixed mmap threshold makes glibc return every freed tensor buffer to the OS, so the
    # peak RSS counts live memory (as CUDA's max_memory_allocated does), not the heap's caching
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"worker {len(names)} tasks / {mode} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    return row


def task_order(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """Interleave the kinds, led by the kind whose first task has the largest single-task peak."""
    tasks = recipe_tasks(args.recipe)
    by_kind = {k: [t.name for t in tasks if t.kind == k] for k in KIND_ORDER}
    single = {k: run_point(args, names[:1], "umedpt")["peak_mb"] for k, names in by_kind.items() if names}
    kinds = sorted(single, key=single.get, reverse=True)
    order = [n for group in itertools.zip_longest(*(by_kind[k] for k in kinds)) for n in group if n]
    return order, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8, 17])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ssl", nargs="*", default=["radiograph_mim", "histology_feature"],
                        help="self-supervised tasks (configs/ssl_quick.yaml) added to all the recipe's tasks "
                        "in a last point; none to skip it")  # fmt: skip
    parser.add_argument("--max-naive-tasks", type=int, default=None,
                        help="skip naive points above this many tasks (their activations exceed memory)")  # fmt: skip
    parser.add_argument("--worker", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, *names = args.worker
        print(json.dumps(worker(args.recipe, names, mode, args.device, args.steps)))
        return

    order, single = task_order(args)
    print(f"single-task peak MiB by kind: {single}; task order: {order}")
    rows, skipped = [], []
    for num_tasks in args.tasks:
        for mode in ("umedpt", "naive"):
            if mode == "naive" and args.max_naive_tasks is not None and num_tasks > args.max_naive_tasks:
                skipped.append({"tasks": num_tasks, "mode": mode, "reason": "exceeds memory (--max-naive-tasks)"})
                continue
            rows.append(run_point(args, order[:num_tasks], mode))
    if args.ssl:
        for mode in ("umedpt", "naive"):
            if mode == "naive" and args.max_naive_tasks is not None and len(order) + len(args.ssl) > args.max_naive_tasks:
                skipped.append({"tasks": len(order) + len(args.ssl), "mode": mode, "reason": "exceeds memory"})
                continue
            rows.append(run_point(args, order + list(args.ssl), mode))
    first = {r["mode"]: r["peak_mb"] for r in rows if r["tasks"] == args.tasks[0]}
    for r in rows:
        r["ratio_to_first"] = round(r["peak_mb"] / first[r["mode"]], 3)
    table = markdown_table(
        ["tasks", "loop", "peak MiB", f"peak / peak(T={args.tasks[0]})", "state MiB", "activations MiB", "last step s"],
        [[f"{r['tasks'] - r['ssl_tasks']} + {r['ssl_tasks']} SSL" if r["ssl_tasks"] else r["tasks"], r["mode"], r["peak_mb"], f"{r['ratio_to_first']:.2f}", r["state_mb"],
          r["activations_mb"], r["last_step_s"]] for r in rows],  # fmt: skip
    )
    print("\n" + table)
    write_result(
        f"memory_vs_tasks_{args.recipe}_{args.device}",
        {
            "benchmark": "memory_vs_tasks",
            "recipe": args.recipe,
            "device": device_name(args.device),
            "steps": args.steps,
            "single_task_peak_mb": single,
            "task_order": order,
            "ssl_tasks": list(args.ssl),
            "rows": rows,
            "skipped": skipped,
        },
    )


if __name__ == "__main__":
    main()
