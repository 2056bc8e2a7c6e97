"""Synthetic worlds written as IMAX manifests, and the label-budget-matched IMAX / DMAX views of
them (``python -m umedpt.data.imax --help``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from jsonargparse import ArgumentParser

from umedpt.data.imax.manifest import (
    Annotation,
    ImageRecord,
    annotation_counts,
    read_manifest,
    write_manifest,
)
from umedpt.kinds import get_kind
from umedpt.tasks import Task

#: task name -> synthetic label family of the default synthetic manifest
DEFAULT_FAMILIES: dict[str, str] = {
    "grade": "grade",
    "objects": "objects",
    "segmentation": "segmentation",
    "detection": "detection",
    "count_bin": "count_bin",
    "size_bin": "size_bin",
}


def synthetic_tasks(style: str, families: dict[str, str] | None = None, **task_kw: Any) -> list[Task]:
    """Task specs (kind, class count and names) of ``families`` (task name -> family) in world ``style``."""
    from umedpt.data.synthetic import LABEL_FAMILIES, class_names

    families = families or DEFAULT_FAMILIES
    return [
        Task(
            name=name,
            kind=LABEL_FAMILIES[family],
            num_classes=len(class_names(style, family)),
            class_names=class_names(style, family),
            **task_kw,
        )
        for name, family in families.items()
    ]


def write_synthetic_world(
    out_dir: str | Path,
    style: str = "radiograph",
    num_images: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    families: dict[str, str] | None = None,
) -> Path:
    """Render a synthetic world to files with EVERY image annotated for every family.

    Writes ``images/<split>_<i>.npy`` (float32 RGB in [0, 1], exact), ``masks/<split>_<i>.png``
    (when a segmentation family is asked for) and ``world.jsonl``; returns the manifest path.
    The scenes are those of :class:`umedpt.data.synthetic.SyntheticTaskDataset` (same split offsets).

    Args:
        out_dir: output directory.
        style: synthetic world (``umedpt.data.synthetic.STYLES``).
        num_images: images per split (default 64 / 32 / 32 for train / val / test).
        image_size: image side in pixels.
        seed: world seed.
        families: task name -> label family (default :data:`DEFAULT_FAMILIES`).
    """
    from umedpt.data.synthetic import LABEL_FAMILIES, SPLIT_OFFSETS, render_scene

    out = Path(out_dir)
    families = families or DEFAULT_FAMILIES
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for split, count in (num_images or {"train": 64, "val": 32, "test": 32}).items():
        for i in range(count):
            scene = render_scene(style, seed, SPLIT_OFFSETS[split] + i, image_size)
            stem = f"{split}_{i:05d}"
            np.save(out / "images" / f"{stem}.npy", scene.image)
            annotations = {}
            for name, family in families.items():
                kind = get_kind(LABEL_FAMILIES[family])
                targets = kind.case_targets(
                    label=scene.labels.get(family), mask=scene.mask, boxes=scene.boxes, box_labels=scene.box_labels
                )
                values = kind.annotation_from_targets(targets)
                for f in kind.file_fields:  # masks/<stem>.png: one scene mask, shared by its tasks
                    (out / f"{f}s").mkdir(exist_ok=True)
                    path = f"{f}s/{stem}.png"
                    if not cv2.imwrite(str(out / path), values[f]):
                        raise OSError(f"could not write {out / path}")
                    values[f] = path
                annotations[name] = Annotation(**values)
            records.append(ImageRecord(f"images/{stem}.npy", split, stem, annotations))
    return write_manifest(records, out / "world.jsonl")


def _train_block(
    records: Sequence[ImageRecord], tasks: Sequence[str], start: int, count: int
) -> list[ImageRecord]:
    train = [r for r in records if r.split == "train"]
    if len(train) < start + count:
        raise ValueError(f"the manifest has {len(train)} train images; this view needs {start + count}")
    block = train[start : start + count]
    for r in block:
        missing = [t for t in tasks if t not in r.annotations or r.annotations[t].pseudo]
        if missing:
            raise ValueError(
                f"train image {r.id!r} has no real annotation of {missing}; a view needs full labels"
            )
    return block


def _keep(record: ImageRecord, tasks: Sequence[str]) -> ImageRecord:
    return replace(record, annotations={t: record.annotations[t] for t in tasks})


def imax_view(records: Sequence[ImageRecord], tasks: Sequence[str], per_task: int) -> list[ImageRecord]:
    """Image-centric view: the first ``per_task`` train images, each with all ``tasks``' annotations.

    ``per_task`` labels per task, ``per_task`` images. Validation and test records are kept as they are.
    """
    train = [_keep(r, tasks) for r in _train_block(records, tasks, 0, per_task)]
    return train + [r for r in records if r.split != "train"]


def dmax_view(records: Sequence[ImageRecord], tasks: Sequence[str], per_task: int) -> list[ImageRecord]:
    """Decentralised view: task ``t`` annotates its own block of ``per_task`` train images.

    ``per_task`` labels per task (the same budget as :func:`imax_view`) on ``len(tasks) * per_task``
    disjoint images; the first block is the image set of :func:`imax_view`. Validation and test
    records are kept as they are.
    """
    block = _train_block(records, tasks, 0, len(tasks) * per_task)
    train = [_keep(r, [tasks[i // per_task]]) for i, r in enumerate(block)]
    return train + [r for r in records if r.split != "train"]


def main(args: Sequence[str] | None = None) -> int:
    """``python -m umedpt.data.imax``: write a synthetic world and its IMAX / DMAX views."""
    parser = ArgumentParser(prog="python -m umedpt.data.imax", description=main.__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--style", default="radiograph")
    parser.add_argument("--per-task", type=int, default=64, help="train labels per task in both views")
    parser.add_argument("--tasks", nargs="+", default=["grade", "objects", "segmentation", "detection"])
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    counts = {"train": ns.per_task * len(ns.tasks), "val": ns.num_val, "test": ns.num_test}
    world = write_synthetic_world(ns.out, ns.style, counts, ns.image_size, ns.seed)
    records = read_manifest(world)
    for name, view in (("imax", imax_view), ("dmax", dmax_view)):
        path = write_manifest(view(records, ns.tasks, ns.per_task), Path(ns.out) / f"{name}.jsonl")
        print(f"{name}: {path}  train labels per task: {annotation_counts(read_manifest(path))}")
    return 0

