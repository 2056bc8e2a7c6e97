"""Precision and layout options of the training step: fp32, bf16 autocast, channels_last, torch.compile.

Each option runs the recipe's full step (all tasks, forward + backward per task, one AdamW step)
on the same pre-built batches, starting from the same weights, and reports the median step time
(after ``--warmup`` steps, which include compilation), the first-step loss relative to fp32
(correctness), and for ``compile`` the number of graphs Dynamo compiled and the recompiles
(they must stay bounded: one graph per distinct input shape, not one per task or step).

    python benchmarks/precision_layout.py                         # quick recipe, CPU
    python benchmarks/precision_layout.py --recipe full --device cuda

Writes ``benchmarks/results/precision_layout_<recipe>_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
from common import build_model, device_name, fixed_batches, markdown_table, write_result

OPTIONS = ("fp32", "bf16", "channels_last", "compile", "channels_last+compile", "bf16+channels_last")


def prepare(model: Any, option: str, device: str) -> tuple[Any, Any]:
    """The model set up for ``option`` and the autocast context factory of its steps."""
    model = copy.deepcopy(model).to(device)
    model.hparams.channels_last = "channels_last" in option
    if model.hparams.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if "compile" in option:
        model.encoder.compile()
    if "bf16" in option:
        return model, lambda: torch.autocast(device, dtype=torch.bfloat16)
    return model, nullcontext


def run_option(base: Any, option: str, batches: list[dict], device: str, warmup: int) -> dict[str, Any]:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, autocast = prepare(base, option, device)
    optimizer, _ = model.build_optimizer(len(batches))
    times, first_loss = [], None
    for step, batch in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for name in model.task_names:
            with autocast():
                loss = model.task_loss(name, batch[name])
            loss.backward()
            total += float(loss.detach()) if step == 0 else 0.0
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        first_loss = total if step == 0 else first_loss
    counters = torch._dynamo.utils.counters
    return {
        "option": option,
        "median_step_s": round(statistics.median(times[warmup:]), 4),
        "first_step_s": round(times[0], 2),
        "first_loss": round(first_loss, 4),
        "graphs_compiled": int(counters["stats"].get("unique_graphs", 0)),
        "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    torch.set_flush_denormal(True)
    base = build_model(args.recipe, channels_last=False)
    batches = fixed_batches(args.recipe, base.task_names, args.steps, args.device)
    rows = []
    for option in args.options:
        rows.append(run_option(base, option, batches, args.device, args.warmup))
        print(rows[-1], flush=True)
    reference = next((r for r in rows if r["option"] == "fp32"), rows[0])
    for r in rows:
        r["speedup"] = round(reference["median_step_s"] / r["median_step_s"], 3)
        r["loss_rel_diff"] = round(abs(r["first_loss"] - reference["first_loss"]) / abs(reference["first_loss"]), 4)
    correct = [r for r in rows if r["loss_rel_diff"] < 0.02]
    fastest = min(correct, key=lambda r: r["median_step_s"])["option"]
    print("\n" + markdown_table(
        ["option", "median step s", "speedup vs fp32", "first step s", "loss rel. diff", "graphs", "recompiles"],
        [[r["option"], r["median_step_s"], r["speedup"], r["first_step_s"], r["loss_rel_diff"],
          r["graphs_compiled"], r["recompiles"]] for r in rows],
    ))  # fmt: skip
    print(f"\nfastest correct option on {args.device}: {fastest}")
    write_result(
        f"precision_layout_{args.recipe}_{args.device}",
        {
            "benchmark": "precision_layout",
            "recipe": args.recipe,
            "device": device_name(args.device),
            "steps": args.steps,
            "warmup": args.warmup,
            "rows": rows,
            "fastest_correct": fastest,
        },
    )


if __name__ == "__main__":
    main()
