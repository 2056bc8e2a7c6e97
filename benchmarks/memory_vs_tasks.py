"""Peak memory of one training step versus the number of tasks: umedpt loop vs naive loop.

umedpt's loop runs forward + backward task by task, so only one task's activations are alive at
a time. The naive loop forwards every task, sums the losses and runs one backward, so all
activations are alive together. Each point runs in a fresh subprocess (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA); the memory of the training steps is reported
above the baseline of the built model and loaded batches (so it holds gradients, optimizer
state and the activations).

    python benchmarks/memory_vs_tasks.py                        # quick encoder, 64 px, CPU
    python benchmarks/memory_vs_tasks.py --recipe full --device cuda

Writes ``benchmarks/results/memory_vs_tasks_<recipe>_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"quick": ["configs/umedpt.yaml", "configs/quick.yaml"], "full": ["configs/umedpt.yaml"]}


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(recipe: str, num_tasks: int, mode: str, device: str, steps: int) -> dict[str, Any]:
    """Build the first ``num_tasks`` tasks of the recipe, run ``steps`` steps, return memory figures."""
    import torch

    from umedpt.cli import main
    from umedpt.data.loading import collate_cases

    args = [a for c in CONFIGS[recipe] for a in ("-c", str(ROOT / c))]
    cli = main([*args, "--data.dataset_defaults.num_samples", "64"], run=False)
    model = cli.model.to(device)
    names = model.task_names[:num_tasks]
    cli.datamodule.tasks = [t for t in cli.datamodule.tasks if t.name in names]
    cli.datamodule.setup("fit")

    def to_device(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.to(device)
        return [to_device(v) for v in value] if isinstance(value, list) else value

    batches = {}
    for name in names:
        dataset = cli.datamodule.datasets["train"][name]
        case = collate_cases([dataset[i] for i in range(model.tasks[name].batch_size)])
        batches[name] = {k: to_device(v) for k, v in case.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # baseline before the first step: freed activations stay in the CPU heap, so a later
    # baseline would hide them; gradients and optimizer state count in both modes alike
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        if mode == "umedpt":
            model.accumulate(batches)
        else:
            sum(model.task_loss(n, batches[n]) for n in names).backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tasks": num_tasks,
        "mode": mode,
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(peak, 1),
        "step_mb": round(peak - baseline, 1),
        "step_s": round((time.perf_counter() - start) / steps, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", choices=sorted(CONFIGS), default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8, 17])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("NUM_TASKS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.recipe, int(args.worker[0]), args.worker[1], args.device, args.steps)))
        return

    rows = []
    for num_tasks in args.tasks:
        for mode in ("umedpt", "naive"):
            cmd = [sys.executable, __file__, "--recipe", args.recipe, "--device", args.device,
                   "--steps", str(args.steps), "--worker", str(num_tasks), mode]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            if done.returncode:
                raise SystemExit(f"worker {num_tasks} tasks / {mode} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)

    first = {r["mode"]: r for r in rows if r["tasks"] == args.tasks[0]}
    print(f"\n{'tasks':>5} {'mode':>7} {'step MiB':>9} {'ratio':>6} {'peak MiB':>9} {'s/step':>7}")
    for r in rows:
        r["ratio_to_first"] = round(r["step_mb"] / max(first[r["mode"]]["step_mb"], 1e-6), 3)
        print(f"{r['tasks']:>5} {r['mode']:>7} {r['step_mb']:>9.1f} {r['ratio_to_first']:>6.2f} "
              f"{r['peak_mb']:>9.1f} {r['step_s']:>7.3f}")  # fmt: skip
    import torch

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = ROOT / "benchmarks" / "results" / f"memory_vs_tasks_{args.recipe}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "memory_vs_tasks",
        "recipe": args.recipe,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
