"""``umedpt pseudo-label``: cross-task pseudo labels, stage 2 of pseudo-IMAX.

Stage 1 trains on decentralised data (each task on its own images). This command runs every
trained head over the images of the other tasks (the images of a manifest that have no
annotation of that task), keeps the confident predictions and writes them into a new
image-centric manifest, marked ``"pseudo": true`` with their ``score``. Stage 3 trains on the
real and pseudo labels (``ImageCentricModule(pseudo_weight=...)``). See ``docs/imax.md``.

Each kind chooses its confident predictions (``umedpt.kinds.TaskKind.confident``) and turns
them into annotation fields (``TaskKind.annotation_from_targets``); the built-in kinds, with
their thresholds configurable:

``classification``  the top softmax probability >= threshold: that class.
``multilabel``      every label confident, ``max(p, 1 - p) >= threshold``: the positives are
                    the labels with ``p >= 0.5``; score = the least confident label.
``segmentation``    per pixel, top probability >= threshold: that class, otherwise
                    ``ignore_index`` (written when at least one pixel is confident); score =
                    the mean top probability of the confident pixels. Masks go to
                    ``<output stem>_masks/``.
``detection``       the boxes with score >= threshold (written when there is at least one);
                    score = the lowest kept box score. Boxes below the head's own
                    ``score_thresh`` never appear.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import Tensor

from umedpt.data.imax import Annotation, CaseBuilder, ImageRecord, read_manifest, write_manifest
from umedpt.kinds import TaskKind
from umedpt.module import MultiTaskModule

__all__ = ["Thresholds", "load_model", "main", "pseudo_label", "run"]


@dataclass
class Thresholds:
    """Confidence a prediction needs to become a pseudo label, per task kind (see the module docstring)."""

    classification: float = 0.9
    multilabel: float = 0.9
    segmentation: float = 0.9
    detection: float = 0.5

    def __post_init__(self) -> None:
        for kind, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds.{kind} must be in [0, 1], got {value}")

    def of(self, kind: str) -> float:
        """The threshold of task kind ``kind`` (its short name)."""
        if kind not in asdict(self):
            raise ValueError(f"pseudo-label: no confidence threshold for task kind {kind!r}; thresholds: {asdict(self)}")
        return getattr(self, kind)


def load_model(
    checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[MultiTaskModule, dict[str, Any]]:
    """Encoder and heads of a ``MultiTaskModule`` (or subclass) checkpoint, in eval mode.

    Returns:
        The model and the hyper-parameters of the checkpoint's data module (empty if none).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "tasks" not in hparams or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a umedpt checkpoint (no hyper_parameters.tasks or no state_dict)")
    model = MultiTaskModule(
        tasks=hparams["tasks"],
        encoder=hparams["encoder"],
        head_defaults=hparams.get("head_defaults"),
        export_encoder=False,
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), dict(ckpt.get("datamodule_hyper_parameters") or {})


def _batches(
    records: Sequence[ImageRecord], builder: CaseBuilder, batch_size: int
) -> Iterator[tuple[list[ImageRecord], Tensor, list[tuple[int, int]]]]:
    """Consecutive records as image batches; a batch ends where the loaded image size changes."""
    group: list[tuple[ImageRecord, Tensor, tuple[int, int]]] = []
    for record in records:
        image, stored = builder.image(record)
        if group and (len(group) == batch_size or image.shape != group[0][1].shape):
            yield [g[0] for g in group], torch.stack([g[1] for g in group]), [g[2] for g in group]
            group = []
        group.append((record, image, stored))
    if group:
        yield [g[0] for g in group], torch.stack([g[1] for g in group]), [g[2] for g in group]


@torch.no_grad()
def pseudo_label(
    model: MultiTaskModule,
    records: Sequence[ImageRecord],
    builder: CaseBuilder,
    mask_dir: str | Path,
    thresholds: Thresholds | None = None,
    splits: Sequence[str] = ("train",),
    batch_size: int = 32,
    tasks: Sequence[str] | None = None,
) -> tuple[list[ImageRecord], dict[str, dict[str, float]]]:
    """Add confident cross-task pseudo labels to ``records``.

    Every image of ``splits`` gets, for each of the model's tasks (or of ``tasks``) it has no
    annotation of, the head's prediction when confident enough. The encoder runs once per image batch. Masks are
    written into ``mask_dir``; the returned records' paths are relative to ``builder.root``.

    Returns:
        The new records (inputs are not modified) and, per task, ``candidates`` (images without
        its annotation), ``written`` and ``mean_score`` of the written pseudo labels.
    """
    thresholds = thresholds or Thresholds()
    unknown = sorted(set(tasks or []) - set(model.tasks))
    if unknown:
        raise ValueError(f"pseudo-label: tasks {unknown} are not tasks of the model {list(model.tasks)}")
    chosen = {name: model.tasks[name] for name in (tasks or model.tasks)}
    model.eval()
    device = next(model.parameters()).device
    out = [replace(r, annotations=dict(r.annotations)) for r in records]
    todo = [r for r in out if r.split in splits and any(t not in r.annotations for t in chosen)]
    stats = {name: {"candidates": 0, "written": 0, "score_sum": 0.0} for name in chosen}
    mask_dir = Path(mask_dir)
    for batch, images, stored in _batches(todo, builder, batch_size):
        features = model.encoder(images.to(device))
        size = tuple(images.shape[-2:])
        for name, task in chosen.items():
            rows = [i for i, r in enumerate(batch) if name not in r.annotations]
            if not rows:
                continue
            head = model.heads[name]
            index = torch.tensor(rows, device=device)
            outputs = head([f[index] for f in features], size)
            kind = task.task_kind
            predictions = kind.confident(head, outputs, thresholds.of(kind.name))
            stats[name]["candidates"] += len(rows)
            for row, prediction in zip(rows, predictions, strict=True):
                if prediction is None:
                    continue
                record = batch[row]
                annotation = _annotation(kind, *prediction, size, stored[row], record, name, builder, mask_dir)
                record.annotations[name] = annotation
                stats[name]["written"] += 1
                stats[name]["score_sum"] += annotation.score
    summary = {
        name: {
            "candidates": s["candidates"],
            "written": s["written"],
            "mean_score": s["score_sum"] / s["written"] if s["written"] else math.nan,
        }
        for name, s in stats.items()
    }
    return out, summary


def _annotation(
    kind: TaskKind,
    targets: dict[str, Any],
    score: float,
    size: tuple[int, int],
    stored: tuple[int, int],
    record: ImageRecord,
    task_name: str,
    builder: CaseBuilder,
    mask_dir: Path,
) -> Annotation:
    """A pseudo :class:`Annotation` from a confident prediction, mapped back to the stored image
    size; its file fields (masks) are written to ``mask_dir``."""
    values = kind.annotation_from_targets(kind.resize_targets(targets, size, stored), decimals=2)
    for f in kind.file_fields:
        mask_dir.mkdir(parents=True, exist_ok=True)
        path = mask_dir / f"{_safe(record.id)}__{task_name}.png"
        if not cv2.imwrite(str(path), values[f]):
            raise OSError(f"could not write {path}")
        values[f] = os.path.relpath(path.resolve(), builder.root.resolve())
    return Annotation(**values, pseudo=True, score=score)


def _safe(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def run(
    checkpoint: str,
    manifest: str,
    output: str,
    thresholds: Thresholds | None = None,
    splits: list[str] | None = None,
    tasks: list[str] | None = None,
    batch_size: int = 32,
    image_size: int | None = None,
    channels: int | None = None,
    mean: float | None = None,
    std: float | None = None,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Write a manifest with the confident cross-task pseudo labels of a trained model.

    Args:
        checkpoint: Lightning checkpoint of the stage-1 model (``MultiTaskModule`` or a subclass).
        manifest: the input manifest (JSON lines or CSV); its annotations are kept.
        output: the new manifest (``.jsonl`` or ``.csv``); masks go to ``<output stem>_masks/``.
        thresholds: confidence per task kind.
        splits: splits whose images get pseudo labels (default: ``["train"]``).
        tasks: the tasks whose heads label images (default: all of the model's tasks); leave
            out a task whose stage-1 head is not good enough.
        batch_size: images per encoder pass.
        image_size: image size the model sees; ``None``: the value the checkpoint's
            ``ImageCentricDataModule`` used, else the stored size.
        channels: image channels (``None``: from the checkpoint's data module, else 3).
        mean: intensity mean (``None``: from the checkpoint's data module, else 0.5).
        std: intensity standard deviation (``None``: from the checkpoint's data module, else 0.25).
        device: where the model runs (``cpu``, ``cuda``...).

    Returns:
        Per task: candidates, written and mean score of the pseudo labels.
    """
    model, data_hparams = load_model(checkpoint, map_location=device)
    given = {"image_size": image_size, "channels": channels, "mean": mean, "std": std}
    defaults = {"image_size": None, "channels": 3, "mean": 0.5, "std": 0.25}
    preprocessing = {k: v if v is not None else data_hparams.get(k, defaults[k]) for k, v in given.items()}
    # the mask value of unlabelled pixels: the segmentation heads' (255 without one)
    ignore_index = next((h.ignore_index for h in model.heads.values() if hasattr(h, "ignore_index")), 255)
    records = read_manifest(manifest, list(model.tasks.values()))
    root = Path(manifest).parent
    # scaled and resized as in training (no augmentation)
    scaling = {k: data_hparams[k] for k in ("normalize", "resize") if k in data_hparams}
    builder = CaseBuilder(root, model.tasks, ignore_index=ignore_index, source=manifest, **preprocessing, **scaling)
    out_path = Path(output)
    mask_dir = out_path.with_name(f"{out_path.stem}_masks")
    labelled, summary = pseudo_label(
        model, records, builder, mask_dir, thresholds, splits or ["train"], batch_size, tasks
    )
    write_manifest(labelled, out_path, source_root=root)
    return summary


def main(args: Sequence[str] | None = None) -> int:
    """``umedpt pseudo-label``: parse ``args`` (``-c/--config`` YAML allowed), run, print a summary."""
    parser = ArgumentParser(prog="umedpt pseudo-label", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file with these arguments")
    parser.add_function_arguments(run, as_group=False)
    cfg = parser.parse_args(list(args) if args is not None else sys.argv[1:])
    init = parser.instantiate(cfg)
    kwargs = {k: v for k, v in init.items() if k != "config"}
    summary = run(**kwargs)
    print(f"umedpt: pseudo labels written to {cfg.output}")
    print(f"  {'task':<24} {'candidates':>10} {'written':>8} {'mean score':>10}")
    for name, s in summary.items():
        print(f"  {name:<24} {s['candidates']:>10} {s['written']:>8} {s['mean_score']:>10.3f}")
    return 0
