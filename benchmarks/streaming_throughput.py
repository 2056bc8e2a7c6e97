"""Samples/s of a task's training data from local files vs litdata chunks, against what a step eats.

For each file reader of ``benchmarks/data_readers.py`` (the same realistic input files: 16-bit
x-ray PNGs, CT DICOM, 8-bit JPEGs, PNG + mask tiles, COCO boxes, NIfTI volumes), the train split
is read three ways in ONE process (what one DataLoader worker does), in the order of a training
epoch, batch 16, with the reader's augmentation preset:

- ``local``: the reader itself (``dataset[i]``: read, decode, check, normalise, resize, augment);
- ``streamed``: the same split after ``umedpt data optimize`` (chunks on local disk), through
  :class:`~umedpt.data.streaming.StreamingTaskDataset` and its ``StreamingDataLoader``
  (shuffled chunks, then the same resize, augmentation and standardisation);
- ``stored read``: the streamed items alone (chunk read and deserialisation, no case pipeline).

``consumed``: the samples/s one training step of the quick recipe takes in for a task of the
same kind (forward, backward and AdamW step of the 64 px quick model, one thread: the rate the
loaders must keep up with; ``--workers`` processes each give about the per-process rate).

    OMP_NUM_THREADS=1 python benchmarks/streaming_throughput.py                # 64 and 224 px
    OMP_NUM_THREADS=1 python benchmarks/streaming_throughput.py --sizes 224 --files 96

Writes ``benchmarks/results/streaming_throughput_cpu.{json,md,png}`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, build_model, device_name, fixed_batches, markdown_table, write_result  # noqa: E402
from benchmarks.data_readers import write_inputs  # noqa: E402
from umedpt.data.loading import EpochShuffleSampler, collate_cases  # noqa: E402

#: readers timed (substrings of the data_readers case names): the file readers
READERS = ("ManifestDataset", "ImageFolderDataset (JPEG)", "SegmentationDataset", "CocoDetectionDataset", "NiftiSliceDataset")
#: a quick-recipe task of each kind: the step whose intake is compared
STEP_TASKS = {"classification": "radiograph_grade", "multilabel": "radiograph_objects",
              "segmentation": "radiograph_seg", "detection": "radiograph_det"}  # fmt: skip
BATCH = 16


def local_rate(dataset: Any, batches: int) -> float:
    """Samples/s of training batches from the reader in epoch order (one warm-up batch)."""
    order = list(EpochShuffleSampler(len(dataset), seed=0))
    need = (batches + 1) * BATCH
    picks = [order[k % len(order)] for k in range(need)]
    collate_cases([dataset[i] for i in picks[:BATCH]])
    start = time.perf_counter()
    for b in range(1, batches + 1):
        collate_cases([dataset[i] for i in picks[b * BATCH : (b + 1) * BATCH]])
    return batches * BATCH / (time.perf_counter() - start)


def streamed_rate(dataset: Any, batches: int) -> tuple[float, float]:
    """Samples/s of training batches from the streaming loader, and of the stored items alone."""
    loader = dataset.dataloader(batch_size=BATCH, num_workers=0, collate_fn=collate_cases, train=True, seed=0)
    served, start = 0, None
    while served < batches:
        for _ in loader:
            if start is None:  # the first batch opens the chunk files: warm-up
                start = time.perf_counter()
                continue
            served += 1
            if served == batches:
                break
    rate = batches * BATCH / (time.perf_counter() - start)
    count = min(len(dataset), batches * BATCH)
    dataset.stored_item(0)
    begin = time.perf_counter()
    for i in range(count):
        dataset.stored_item(i % len(dataset))
    return rate, count / (time.perf_counter() - begin)


def step_intake(kind: str, steps: int) -> float:
    """Samples/s one quick-recipe training step takes in for a task of ``kind`` (median of steps)."""
    name = STEP_TASKS[kind]
    model = build_model("quick", [name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = fixed_batches("quick", [name], steps + 1)
    times = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.accumulate(batch)
        optimizer.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def optimized(case: Any, dataset: Any, root: Path, size: int) -> Any:
    """``dataset`` written as chunks under ``root`` and opened for streaming at ``size``."""
    from umedpt.data.streaming import StreamingTaskDataset, optimize_task
    from umedpt.tasks import Task

    name = "".join(c if c.isalnum() else "_" for c in case.reader).strip("_")
    task = Task(name=name, kind=dataset.kind, num_classes=dataset.num_classes, data={"class_path": case.reader})
    folder = root / name
    if not (folder / "umedpt.json").is_file():
        optimize_task(task, lambda split: dataset, root, ("train",), log=lambda _: None)
    return StreamingTaskDataset(str(folder), split="train", image_size=size, transform=case.preset)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["image_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        part = [r for r in rows if r["image_size"] == size]
        x = range(len(part))
        ax.bar([i - 0.2 for i in x], [r["local_samples_per_s"] for r in part], width=0.4, label="local files")
        ax.bar([i + 0.2 for i in x], [r["streamed_samples_per_s"] for r in part], width=0.4, label="litdata chunks")
        for i, r in enumerate(part):
            if r.get("consumed_samples_per_s"):
                ax.hlines(r["consumed_samples_per_s"], i - 0.45, i + 0.45, colors="k", linestyles="--",
                          label="step intake (quick, 64 px)" if i == 0 else None)  # fmt: skip
        ax.set_xticks(list(x), [r["reader"].replace("Dataset", "") for r in part], rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("samples/s, one process")
        ax.set_title(f"{size} px")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--files", type=int, default=64, help="input files per format (NIfTI: files // 16 volumes)")
    parser.add_argument("--batches", type=int, default=6, help="timed batches of 16 per reader and size")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per kind")
    parser.add_argument("--name", default="streaming_throughput_cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    intake = {kind: step_intake(kind, args.steps) for kind in STEP_TASKS}
    print("step intake (samples/s):", {k: round(v, 1) for k, v in intake.items()}, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="umedpt_stream_") as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        cases = [c for c in write_inputs(files, args.files) if c.reader.startswith(READERS)]
        for size in args.sizes:
            for case in cases:
                dataset = case.build(size)
                streamed = optimized(case, dataset, Path(tmp) / "chunks", size)
                local = local_rate(dataset, args.batches)
                stream, stored = streamed_rate(streamed, args.batches)
                chunk_mib = sum(p.stat().st_size for p in Path(streamed.input_dir.path).glob("*.bin")) / 2**20
                row = {
                    "reader": case.reader, "input": case.input, "preset": case.preset, "kind": dataset.kind,
                    "image_size": size, "samples": len(dataset), "chunk_mib": round(chunk_mib, 1),
                    "local_samples_per_s": round(local, 1), "streamed_samples_per_s": round(stream, 1),
                    "stored_read_samples_per_s": round(stored, 1), "streamed_vs_local": round(stream / local, 2),
                    "consumed_samples_per_s": round(intake[dataset.kind], 1) if size == 64 else None,
                }  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    table = markdown_table(
        ["reader", "size", "local samples/s", "streamed samples/s", "streamed / local", "stored read samples/s",
         "chunks MiB", "step intake samples/s (64 px)"],
        [[r["reader"], r["image_size"], f"{r['local_samples_per_s']:.0f}", f"{r['streamed_samples_per_s']:.0f}",
          f"{r['streamed_vs_local']:.2f}x", f"{r['stored_read_samples_per_s']:.0f}", f"{r['chunk_mib']:.1f}",
          f"{r['consumed_samples_per_s']:.0f}" if r["consumed_samples_per_s"] else "-"] for r in rows],
    )  # fmt: skip
    print("\n" + table)
    write_result(args.name, {
        "benchmark": "streaming_throughput",
        "device": device_name("cpu"),
        "cores": os.cpu_count(),
        "load_average_at_start": round(load, 2),
        "batch_size": BATCH,
        "batches": args.batches,
        "files_per_format": args.files,
        "step_intake_samples_per_s": {k: round(v, 1) for k, v in intake.items()},
        "rows": rows,
    })  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    plot(rows, RESULTS / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
