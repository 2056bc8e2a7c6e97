"""Time and peak memory of a training step: image-centric vs per-task mode, T tasks on the same images.

Every task annotates the same image batch (an IMAX batch). ``per_task`` mode (the umedpt loop)
encodes the batch once per task, each followed by its own backward; ``image_centric`` mode
(:class:`umedpt.image_centric.ImageCentricModule`) encodes it once, adds the T heads' losses and
runs one backward. Tasks cycle through the four kinds (grade, objects, segmentation, detection
of the synthetic radiograph world). Each point runs in a fresh subprocess: ``--steps`` timed
AdamW steps after one warm-up step; peak memory is the peak resident set size above the
process's size once the libraries are imported (CPU) or ``torch.cuda.max_memory_allocated``.

    python benchmarks/image_centric_step.py                         # quick recipe, CPU
    python benchmarks/image_centric_step.py --recipe full --device cuda

Writes ``benchmarks/results/imax_step_<recipe>_<device>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from common import ROOT, device_name, load_recipe, markdown_table, peak_rss_mb, rss_mb, write_result

FAMILIES = ("grade", "objects", "segmentation", "detection")


def worker(
    recipe: str, num_tasks: int, mode: str, device: str, steps: int, batch_size: int
) -> dict[str, Any]:
    """Run ``steps`` timed steps of ``num_tasks`` tasks in ``mode``; return time and memory figures."""
    import torch

    from umedpt import SwinEncoder
    from umedpt.data.imax import (
        ImageCentricDataModule,
        ImageCentricDataset,
        collate_image_centric,
        synthetic_tasks,
        write_synthetic_world,
    )
    from umedpt.image_centric import ImageCentricModule

    if device == "cuda":
        torch.cuda.init()
    torch.set_flush_denormal(True)  # as MultiTaskModule does while fitting on CPU
    base = rss_mb()
    cfg = load_recipe(recipe)["model"]
    size = int(cfg["encoder"]["init_args"].get("img_size", 224))
    families = {f"{FAMILIES[i % 4]}_{i}": FAMILIES[i % 4] for i in range(num_tasks)}
    tasks = synthetic_tasks("radiograph", families)
    with tempfile.TemporaryDirectory() as tmp:
        world = write_synthetic_world(
            tmp, num_images={"train": batch_size}, image_size=size, families=families
        )
        data = ImageCentricDataModule(str(world), tasks)
        dataset = ImageCentricDataset(data.load_records(), data.builder)
        batch = data.transfer_batch_to_device(
            collate_image_centric([dataset[i] for i in range(batch_size)]), torch.device(device), 0
        )
    model = ImageCentricModule(
        tasks=tasks,
        encoder=SwinEncoder(**cfg["encoder"]["init_args"]),
        head_defaults=cfg.get("head_defaults"),
        export_encoder=False,
        step_mode=mode,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            model.accumulate(batch)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb() - base
    return {
        "tasks": num_tasks,
        "mode": mode,
        "step_s": round(statistics.median(times[1:]), 4),
        "peak_mb": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipe", default="quick", help="quick (tiny Swin, 64 px) or full (swin_tiny, 224 px)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (shared by every task)")
    parser.add_argument("--worker", nargs=2, metavar=("NUM_TASKS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = worker(
            args.recipe, int(args.worker[0]), args.worker[1], args.device, args.steps, args.batch_size
        )
        print(json.dumps(row))
        return

    rows = []
    for num_tasks in args.tasks:
        for mode in ("per_task", "image_centric"):
            cmd = [sys.executable, __file__, "--recipe", args.recipe, "--device", args.device,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--worker", str(num_tasks), mode]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            if done.returncode:
                raise SystemExit(f"worker {num_tasks} tasks / {mode} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)

    table = []
    for num_tasks in args.tasks:
        per, ic = (
            next(r for r in rows if r["tasks"] == num_tasks and r["mode"] == m)
            for m in ("per_task", "image_centric")
        )
        ic["time_ratio"] = round(ic["step_s"] / per["step_s"], 3)
        ic["memory_ratio"] = round(ic["peak_mb"] / per["peak_mb"], 3)
        table.append(
            [
                num_tasks,
                per["step_s"],
                ic["step_s"],
                ic["time_ratio"],
                per["peak_mb"],
                ic["peak_mb"],
                ic["memory_ratio"],
            ]
        )
    header = ["tasks", "per-task s/step", "image-centric s/step", "time ratio",
              "per-task peak MiB", "image-centric peak MiB", "memory ratio"]  # fmt: skip
    print("\n" + markdown_table(header, table))
    import torch

    write_result(
        f"imax_step_{args.recipe}_{args.device}",
        {
            "benchmark": "image_centric_step",
            "recipe": args.recipe,
            "device": device_name(args.device),
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
