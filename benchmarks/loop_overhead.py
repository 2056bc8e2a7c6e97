"""Time per optimizer step: MultiTaskModule under the Lightning Trainer vs a plain PyTorch loop.

Both sides run exactly the same math on the same model and the same pre-built batches: for each
task forward, backward; clip the global gradient norm; one AdamW step; one scheduler step. The
Trainer side is ``trainer.fit`` as users run it (progress bar, default logger, per-task loss
logging, the non-finite check), minus checkpointing and validation. Repetitions alternate
between the two sides in one process; each reports the median step time of its steps (the first
step of each repetition is dropped as warm-up), and the result is the median over repetitions.

    python benchmarks/loop_overhead.py                      # quick recipe, 17 tasks, CPU
    python benchmarks/loop_overhead.py --recipe full --device cuda

Writes ``benchmarks/results/loop_overhead_<recipe>_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from common import build_model, device_name, fixed_batches, markdown_table, write_result
from lightning import Callback, Trainer
from torch.utils.data import DataLoader


class StepClock(Callback):
    """Records the time at the start of every training batch and at the end of training."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def _stamp(self, trainer: Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._stamp(trainer)

    def on_train_end(self, trainer: Trainer, *args: Any) -> None:
        self._stamp(trainer)


def step_times(stamps: list[float]) -> list[float]:
    """Durations between consecutive stamps, without the first (warm-up) step."""
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]


def loader(batches: list[dict]) -> DataLoader:
    """The pre-built batches, served as they are."""
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def lightning_run(model: Any, batches: list[dict], device: str, precision: str) -> list[float]:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator=device,
            devices=1,
            precision=precision,
            max_steps=len(batches),
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[clock],
        )
        trainer.fit(model, train_dataloaders=loader(batches))
    return step_times(clock.stamps)


def plain_run(model: Any, batches: list[dict], device: str, precision: str) -> list[float]:
    """The same step in plain PyTorch."""
    torch.set_flush_denormal(True)  # MultiTaskModule sets it for fit and clears it when fit ends
    model.to(device).train()
    optimizer, scheduler = model.build_optimizer(len(batches))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    clip = model.hparams.grad_clip_norm
    stamps = []
    for batch in loader(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        for name in model.task_names:
            with autocast:
                loss = model.task_loss(name, batch[name])
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        optimizer.step()
        scheduler.step()
    if device == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    return step_times(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=8, help="steps per repetition (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_flush_denormal(True)  # as MultiTaskModule does while fitting on CPU
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    model = build_model(args.recipe)
    batches = fixed_batches(args.recipe, model.task_names, args.steps, args.device)
    runs: dict[str, list[float]] = {"lightning": [], "plain": []}
    for rep in range(args.repeats):
        for side, run in (("lightning", lightning_run), ("plain", plain_run)):
            times = run(model, batches, args.device, precision)
            runs[side].append(statistics.median(times))
            print(f"repeat {rep}: {side:<9} median step {runs[side][-1] * 1000:8.1f} ms", flush=True)
    medians = {side: statistics.median(v) for side, v in runs.items()}
    ratio = medians["lightning"] / medians["plain"]
    # each repetition pairs the two sides run back to back: robust to load that comes and goes
    paired = statistics.median(a / b for a, b in zip(runs["lightning"], runs["plain"], strict=True))
    print("\n" + markdown_table(
        ["loop", "median step ms", "per-repeat medians ms"],
        [[side, f"{medians[side] * 1000:.1f}", ", ".join(f"{t * 1000:.0f}" for t in runs[side])] for side in runs],
    ))  # fmt: skip
    print(f"\nTrainer / plain = {ratio:.3f}, median of paired repetitions {paired:.3f}  (target <= 1.05)")
    write_result(
        f"loop_overhead_{args.recipe}_{args.device}",
        {
            "benchmark": "loop_overhead",
            "recipe": args.recipe,
            "device": device_name(args.device),
            "precision": precision,
            "tasks": len(model.task_names),
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "median_step_s": {k: round(v, 4) for k, v in medians.items()},
            "per_repeat_median_s": {k: [round(t, 4) for t in v] for k, v in runs.items()},
            "ratio": round(ratio, 4),
            "paired_ratio": round(paired, 4),
        },
    )


if __name__ == "__main__":
    main()
