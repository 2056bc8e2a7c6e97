"""Image-centric multi-annotation (IMAX) manifests: one image, the annotations of many tasks.

A manifest lists images; each image carries the annotations of any number of tasks (class,
multi-label findings, mask file, boxes) and optional free text. From one manifest
:class:`ImageCentricDataModule` builds every task: image-centric batches (each image with all of
its annotations, for :class:`umedpt.image_centric.ImageCentricModule`) or, with
``sampling="task"``, one loader per task over the images annotated for it (the decentralised,
DMAX-style mix). The format is described in ``docs/imax.md``; in short, a JSON-lines record is::

    {"image": "images/0001.png", "split": "train", "id": "0001", "text": "free text",
     "annotations": {
        "grade":   {"label": 2},                       # classification: index or class name
        "objects": {"labels": [0, 3]},                 # multi-label: the positive classes
        "seg":     {"mask": "masks/0001.png"},         # segmentation: class-index mask file
        "det":     {"boxes": [[4, 5, 20, 30]], "box_labels": [1]},   # xyxy pixels
        "grade2":  {"label": 1, "pseudo": true, "score": 0.97}}}     # a pseudo label

Paths are relative to the manifest's directory (or absolute). A CSV manifest has the columns
``image``, ``split``, ``id``, ``text`` and one column per task whose cell holds the annotation
as JSON (an empty cell: no annotation). A classification, multi-label or segmentation
annotation may also be written in short form: ``2``, ``[0, 3]``, ``"masks/0001.png"``.
A task without an annotation on an image does not count in that image's loss.

:func:`write_synthetic_world` renders a fully annotated synthetic world to files, and
:func:`imax_view` / :func:`dmax_view` cut label-budget-matched image-centric and decentralised
manifests out of it (``python -m umedpt.data.imax --help``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from umedpt.data.datamodule import MultiTaskDataModule
from umedpt.data.loading import EpochShuffleSampler, ResumableDataLoader, collate_cases
from umedpt.data.problems import DataError, did_you_mean
from umedpt.data.readers import read_image
from umedpt.device import batch_to_device
from umedpt.kinds import BUILTIN_KINDS, get_kind, same_kind
from umedpt.tasks import Task, as_task

__all__ = [
    "FLAG_KEYS",
    "KIND_FIELDS",
    "Annotation",
    "ImageCentricDataModule",
    "ImageCentricDataset",
    "ImageRecord",
    "ManifestError",
    "ManifestTaskDataset",
    "annotation_counts",
    "collate_image_centric",
    "dmax_view",
    "imax_view",
    "read_manifest",
    "synthetic_tasks",
    "write_manifest",
    "write_synthetic_world",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: annotation fields of each built-in task kind (``umedpt.kinds.TaskKind.annotation_fields``)
KIND_FIELDS: dict[str, tuple[str, ...]] = {name: get_kind(name).annotation_fields for name in BUILTIN_KINDS}
#: per-sample flags of image-centric task batches: the image has this task's annotation / it is pseudo
FLAG_KEYS: tuple[str, ...] = ("present", "pseudo")
_RECORD_FIELDS = ("image", "split", "id", "text", "annotations")
_CSV_COLUMNS = ("image", "split", "id", "text")


class ManifestError(DataError):
    """A manifest entry is malformed; the message names the file, the line and the field."""


@dataclass
class Annotation:
    """One task's annotation of one image; exactly one kind's fields are set (see :data:`KIND_FIELDS`).

    Attributes:
        label: classification: class index (or a class name, resolved against the task's
            ``class_names`` when the manifest is read with its tasks).
        labels: multi-label: the positive classes (indices or names); all others are negative.
        mask: segmentation: path of a class-index mask (PNG, TIFF or NPY; ``ignore_index`` allowed).
        boxes: detection: ``[[x1, y1, x2, y2], ...]`` in pixels (``x2 > x1``, ``y2 > y1``).
        box_labels: detection: one class index (or name) per box.
        pseudo: a model's prediction rather than a human label (weighted by ``pseudo_weight``).
        score: confidence of a pseudo label.
    """

    label: int | str | None = None
    labels: list[int | str] | None = None
    mask: str | None = None
    boxes: list[list[float]] | None = None
    box_labels: list[int | str] | None = None
    pseudo: bool = False
    score: float | None = None

    @property
    def kind_fields(self) -> tuple[str, ...]:
        """The task-kind fields that are set."""
        return tuple(f for fs in KIND_FIELDS.values() for f in fs if getattr(self, f) is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the set fields; ``pseudo`` only when true."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not self.pseudo:
            out.pop("pseudo")
        return out


@dataclass
class ImageRecord:
    """One image of a manifest and its annotations, keyed by task name.

    Attributes:
        image: image path, relative to the manifest's directory or absolute.
        split: ``"train"``, ``"val"`` or ``"test"``.
        id: unique identifier (defaults to ``image``).
        annotations: task name -> :class:`Annotation`.
        text: optional free text (report, caption).
        line: line of the manifest the record came from (0 for records made in code).
    """

    image: str
    split: str = "train"
    id: str = ""
    annotations: dict[str, Annotation] = field(default_factory=dict)
    text: str | None = None
    line: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        self.id = self.id or self.image

    def to_dict(self) -> dict[str, Any]:
        """JSON form of the record (the line number is not written)."""
        out: dict[str, Any] = {"image": self.image, "split": self.split, "id": self.id}
        if self.text is not None:
            out["text"] = self.text
        out["annotations"] = {name: a.to_dict() for name, a in self.annotations.items()}
        return out


# ----------------------------------------------------------------------------------------------
# reading and writing


def read_manifest(
    path: str | Path, tasks: Sequence[Task | dict[str, Any]] | None = None, check_files: bool = True
) -> list[ImageRecord]:
    """Read and validate a JSON-lines (``.jsonl``) or CSV (``.csv``) manifest.

    Args:
        path: the manifest file.
        tasks: when given, annotations of these tasks are checked against their kind and class
            count, and class names are resolved to indices. Annotations of other tasks are kept
            after a structural check.
        check_files: check that every image and mask file exists.

    Raises:
        ManifestError: naming the file, line and field of the first bad entry.
        FileNotFoundError: the manifest does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    known = {t.name: t for t in map(as_task, tasks or [])}
    records: list[ImageRecord] = []
    ids: dict[str, int] = {}
    for line, raw in _raw_entries(path):
        where = f"{path} line {line}"
        record = _parse_record(raw, where, known)
        record.line = line
        if record.id in ids:
            raise ManifestError(
                f"{where}, field 'id': {record.id!r} is already used on line {ids[record.id]}"
            )
        ids[record.id] = line
        if check_files:
            _check_files(record, path.parent, where)
        records.append(record)
    return records


def write_manifest(
    records: Sequence[ImageRecord], path: str | Path, source_root: str | Path | None = None
) -> Path:
    """Write ``records`` as JSON lines (``.jsonl``) or CSV (``.csv``), chosen by the suffix.

    Args:
        records: the records.
        path: output file; its directory is created.
        source_root: the directory the records' relative paths are relative to (the directory of
            the manifest they were read from); they are rewritten relative to ``path``'s directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if source_root is not None:
        records = [_rebase(r, Path(source_root), path.parent) for r in records]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    elif path.suffix == ".csv":
        tasks = sorted({name for r in records for name in r.annotations})
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*_CSV_COLUMNS, *tasks])
            for r in records:
                cells = [r.image, r.split, r.id, "" if r.text is None else r.text]
                cells += [json.dumps(r.annotations[t].to_dict()) if t in r.annotations else "" for t in tasks]
                writer.writerow(cells)
    else:
        raise ValueError(f"write_manifest: {path} must end in .jsonl or .csv")
    return path


def annotation_counts(records: Sequence[ImageRecord], split: str = "train") -> dict[str, dict[str, int]]:
    """Per task, the number of ``real`` and ``pseudo`` annotations in ``split``."""
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        if r.split != split:
            continue
        for name, a in r.annotations.items():
            entry = counts.setdefault(name, {"real": 0, "pseudo": 0})
            entry["pseudo" if a.pseudo else "real"] += 1
    return counts


def _raw_entries(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, raw record) pairs of a manifest; blank JSON lines are skipped."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path} line {line}: not valid JSON: {err}") from err
                if not isinstance(raw, dict):
                    raise ManifestError(
                        f"{path} line {line}: expected a JSON object, got {type(raw).__name__}"
                    )
                yield line, raw
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "image" not in columns:
                raise ManifestError(
                    f"{path} line 1: the CSV header has no 'image' column (columns: {columns})"
                )
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row:
                    raise ManifestError(f"{where}: more cells than header columns")
                raw: dict[str, Any] = {k: row[k] for k in _CSV_COLUMNS if row.get(k)}
                raw["annotations"] = {
                    k: _csv_cell(v) for k, v in row.items() if k not in _CSV_COLUMNS and v not in ("", None)
                }
                yield reader.line_num, raw
    else:
        raise ManifestError(f"{path}: a manifest must end in .jsonl or .csv")


def _csv_cell(text: str) -> Any:
    """A CSV annotation cell: JSON, or the bare text (a mask path in short form)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_record(raw: dict[str, Any], where: str, tasks: dict[str, Task]) -> ImageRecord:
    unknown = sorted(set(raw) - set(_RECORD_FIELDS))
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}; a record has {list(_RECORD_FIELDS)}")
    image = raw.get("image")
    if not isinstance(image, str) or not image:
        raise ManifestError(f"{where}, field 'image': expected a non-empty path, got {image!r}")
    split = raw.get("split", "train")
    if split not in SPLITS:
        hint = did_you_mean(split, SPLITS) if isinstance(split, str) else ""
        raise ManifestError(f"{where}, field 'split': {split!r} is not one of {list(SPLITS)}{hint}")
    for key in ("id", "text"):
        if key in raw and not isinstance(raw[key], str):
            raise ManifestError(f"{where}, field {key!r}: expected a string, got {raw[key]!r}")
    annotations = raw.get("annotations", {})
    if not isinstance(annotations, dict):
        raise ManifestError(f"{where}, field 'annotations': expected an object task -> annotation")
    parsed = {
        name: _parse_annotation(value, f"{where}, field 'annotations.{name}", tasks.get(name))
        for name, value in annotations.items()
    }
    return ImageRecord(image, split, raw.get("id", ""), parsed, raw.get("text"))


def _parse_annotation(value: Any, where: str, task: Task | None) -> Annotation:
    """Validate one annotation; ``where`` ends in an open quote that the field name closes."""
    if not isinstance(value, dict):
        single = task.task_kind.annotation_fields if task is not None else ()
        if len(single) != 1:
            raise ManifestError(f'{where}\': expected an object such as {{"label": 1}}, got {value!r}')
        value = {single[0]: value}
    names = {f.name for f in fields(Annotation)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ManifestError(f"{where}': unknown field(s) {unknown}; an annotation has {sorted(names)}")
    a = Annotation(**value)
    given = a.kind_fields
    kinds = [k for k, fs in KIND_FIELDS.items() if set(fs) & set(given)]
    if len(kinds) != 1:
        raise ManifestError(f"{where}': set the fields of exactly one kind {KIND_FIELDS}, got {list(given)}")
    kind = get_kind(kinds[0])
    if task is not None and not same_kind(kind, task.task_kind):
        raise ManifestError(
            f"{where}': task {task.name!r} is {task.kind} ({'/'.join(task.task_kind.annotation_fields)}), "
            f"got {'/'.join(given)}"
        )
    if not isinstance(a.pseudo, bool):
        raise ManifestError(f"{where}.pseudo': expected true or false, got {a.pseudo!r}")
    if a.score is not None and (not isinstance(a.score, (int, float)) or not math.isfinite(a.score)):
        raise ManifestError(f"{where}.score': expected a finite number, got {a.score!r}")
    values = {f: getattr(a, f) for f in kind.annotation_fields}
    parsed, problems = kind.parse_annotation(
        values, task.num_classes if task is not None else None, (task.class_names or []) if task is not None else ()
    )
    if problems:
        field_name, message = problems[0]
        raise ManifestError(f"{where}{'.' + field_name if field_name else ''}': {message}")
    return replace(a, **parsed)


def _check_files(record: ImageRecord, root: Path, where: str) -> None:
    if not (root / record.image).is_file():
        raise ManifestError(f"{where}, field 'image': file {root / record.image} does not exist")
    for name, a in record.annotations.items():
        if a.mask is not None and not (root / a.mask).is_file():
            raise ManifestError(
                f"{where}, field 'annotations.{name}.mask': file {root / a.mask} does not exist"
            )


def _rebase(record: ImageRecord, old: Path, new: Path) -> ImageRecord:
    def move(p: str) -> str:
        return p if os.path.isabs(p) else os.path.relpath(old / p, new)

    annotations = {
        name: replace(a, mask=move(a.mask)) if a.mask is not None else a
        for name, a in record.annotations.items()
    }
    return replace(record, image=move(record.image), annotations=annotations)


# ----------------------------------------------------------------------------------------------
# loading images and targets


@dataclass
class CaseBuilder:
    """Turns manifest records into tensors: image, and each task's target at the image's size.

    Args:
        root: directory that relative paths start from.
        tasks: task name -> task.
        image_size: resize images (bilinear/area), masks (nearest) and boxes to this square
            size; ``None`` keeps the stored size.
        channels: 3 (grayscale repeated) or 1 (colour converted to luminance).
        mean, std: the image, scaled to [0, 1] by its integer range (floats as stored), becomes
            ``(x - mean) / std``.
        ignore_index: mask value of pixels without a label (also fills missing masks).
        source: the manifest, for error messages.
    """

    root: Path
    tasks: dict[str, Task]
    image_size: int | None = None
    channels: int = 3
    mean: float = 0.5
    std: float = 0.25
    ignore_index: int = 255
    source: str = "manifest"

    def image(self, record: ImageRecord) -> tuple[Tensor, tuple[int, int]]:
        """The normalised (C, H, W) image and the stored (H, W) size."""
        array = read_image(self.root / record.image)  # (H, W) or (H, W, 3 | 4), values as stored
        if array.ndim == 2:
            array = array[..., None]
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
        array = array[..., :3].astype(np.float32, copy=False)
        stored = (array.shape[0], array.shape[1])
        if self.image_size is not None and stored != (self.image_size, self.image_size):
            shrink = min(stored) >= 2 * self.image_size
            array = cv2.resize(
                array, (self.image_size,) * 2, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            )
            array = array.reshape(self.image_size, self.image_size, -1)
        if self.channels == 1 and array.shape[2] == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)[..., None]
        elif self.channels == 3 and array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        array = (array - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), stored

    def target(
        self, record: ImageRecord, name: str, stored: tuple[int, int], size: tuple[int, int]
    ) -> dict[str, Any]:
        """Task ``name``'s target for ``record`` at ``size`` plus the ``present``/``pseudo`` flags.

        A missing annotation gives a placeholder (class 0, no positives, an all-ignored mask,
        no boxes) with ``present=False``; the module leaves such samples out of the task's loss.
        """
        task, a = self.tasks[name], record.annotations.get(name)
        kind = task.task_kind
        where = f"{self.source} line {record.line} ({record.id!r}), field 'annotations.{name}'"
        out: dict[str, Any] = {"present": a is not None, "pseudo": bool(a is not None and a.pseudo)}
        if a is None:
            out.update(kind.annotation_targets(None, task.num_classes, size, self.ignore_index))
            return out
        values = {f: getattr(a, f) for f in kind.annotation_fields}
        files = {f: self.root / values[f] for f in kind.file_fields}
        for f, path in files.items():
            values[f] = self._read_file(path, f"{where}.{f}'")
        try:
            targets = kind.annotation_targets(values, task.num_classes, stored, self.ignore_index)
        except ValueError as err:
            named = "".join(f" ({f} {path})" for f, path in files.items())
            raise ManifestError(f"{where}{named}: {err}") from err
        out.update(kind.resize_targets(targets, stored, size))
        return out

    @staticmethod
    def _read_file(path: Path, where: str) -> np.ndarray:
        """A file field's array (a mask), single channel."""
        try:
            array = read_image(path)
        except (OSError, ValueError) as err:
            raise ManifestError(f"{where}: cannot read {path}: {err}") from err
        return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


class ImageCentricDataset(Dataset):
    """Each item is one image with the targets of every task: ``{"image", "tasks": {name: target}}``.

    Targets carry the flags ``present`` (the image has this task's annotation) and ``pseudo``.
    Batch items with :func:`collate_image_centric`.
    """

    def __init__(self, records: Sequence[ImageRecord], builder: CaseBuilder) -> None:
        self.records = list(records)
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        image, stored = self.builder.image(record)
        size = (image.shape[1], image.shape[2])
        targets = {name: self.builder.target(record, name, stored, size) for name in self.builder.tasks}
        return {"image": image, "tasks": targets}


class ManifestTaskDataset(Dataset):
    """One task's view of a manifest: case dicts (image + target + ``pseudo`` flag) of its annotated images."""

    def __init__(self, records: Sequence[ImageRecord], task: str, builder: CaseBuilder) -> None:
        self.records = [r for r in records if task in r.annotations]
        self.task = task
        self.builder = builder
        self.num_classes = builder.tasks[task].num_classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        image, stored = self.builder.image(record)
        case = self.builder.target(record, self.task, stored, (image.shape[1], image.shape[2]))
        del case["present"]
        return {"image": image, **case}


def collate_image_centric(cases: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Batch :class:`ImageCentricDataset` items as ``{task: task_batch}``.

    Every task batch holds the SAME image tensor object (so the module encodes it once) plus the
    task's targets and the ``present``/``pseudo`` flags as bool tensors (B,).
    """
    try:
        image = torch.stack([c["image"] for c in cases])
    except RuntimeError as err:
        raise ValueError(f"images of one batch differ in size; set data image_size: {err}") from err
    batch = {}
    for name in cases[0]["tasks"]:
        task_batch = collate_cases([c["tasks"][name] for c in cases])
        task_batch["image"] = image
        batch[name] = task_batch
    return batch


# ----------------------------------------------------------------------------------------------
# the data module


class ImageCentricDataModule(MultiTaskDataModule):
    """Builds every task of ``tasks`` from one image-centric manifest.

    Training batches are ``{task: task_batch}``. With ``sampling="image"`` one loader draws
    images; every task batch holds the same images (with ``present``/``pseudo`` flags), so
    :class:`umedpt.image_centric.ImageCentricModule` encodes them once. With ``sampling="task"``
    each task draws its own images among those annotated for it (the decentralised mix, as
    :class:`MultiTaskDataModule`; batch size from each task's ``batch_size``). Validation and test
    use one loader per task over the images with a real (not pseudo) annotation of that task.

    Args:
        manifest: JSON-lines or CSV manifest (see the module docstring).
        tasks: the tasks (in a config: ``tasks: ${model.init_args.tasks}``); annotations of
            other tasks in the manifest are ignored.
        sampling: ``"image"`` (image-centric batches) or ``"task"`` (one loader per task).
        batch_size: images per image-centric training batch.
        image_size: resize images, masks and boxes to this square size (``None``: as stored).
        channels: 3 or 1 image channels.
        mean: intensity mean subtracted after scaling to [0, 1].
        std: intensity standard deviation divided by.
        ignore_index: mask value of unlabelled pixels (segmentation heads ignore it; default 255).
        num_workers: DataLoader worker processes.
        eval_batch_size: batch size of validation/test/predict loaders (``None``: ``batch_size``).
        seed: seed of the training shuffles.
    """

    def __init__(
        self,
        manifest: str,
        tasks: list[Task] | None = None,
        sampling: Literal["image", "task"] = "image",
        batch_size: int = 16,
        image_size: int | None = None,
        channels: int = 3,
        mean: float = 0.5,
        std: float = 0.25,
        ignore_index: int = 255,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            tasks=tasks, num_workers=num_workers, eval_batch_size=eval_batch_size or batch_size, seed=seed
        )
        if sampling not in ("image", "task"):
            raise ValueError(f"ImageCentricDataModule: sampling must be 'image' or 'task', got {sampling!r}")
        if batch_size < 1:
            raise ValueError(f"ImageCentricDataModule: batch_size must be >= 1, got {batch_size}")
        if channels not in (1, 3):
            raise ValueError(f"ImageCentricDataModule: channels must be 1 or 3, got {channels}")
        self.manifest = Path(manifest)
        self.sampling = sampling
        self.batch_size = batch_size
        self.preprocessing = {
            "image_size": image_size,
            "channels": channels,
            "mean": mean,
            "std": std,
            "ignore_index": ignore_index,
        }
        self.records: list[ImageRecord] | None = None
        self.image_dataset: ImageCentricDataset | None = None
        # what a later step (pseudo-labelling) needs to load images the same way
        self.save_hyperparameters({"manifest": str(manifest), **self.preprocessing})

    @property
    def builder(self) -> CaseBuilder:
        """Loads images and targets of the current task list the configured way."""
        tasks = {t.name: t for t in self.tasks}
        return CaseBuilder(self.manifest.parent, tasks, **self.preprocessing, source=str(self.manifest))

    def load_records(self) -> list[ImageRecord]:
        """The manifest's records, read and validated against the tasks once."""
        if self.records is None:
            self.records = read_manifest(self.manifest, self.tasks)
        return self.records

    def build_dataset(self, task: Task, split: str) -> Dataset:
        """``task``'s view of ``split``: images annotated for it (val/test: real annotations only)."""
        records = [r for r in self.load_records() if r.split == split]
        if split != "train":
            records = [
                r for r in records if task.name in r.annotations and not r.annotations[task.name].pseudo
            ]
        dataset = ManifestTaskDataset(records, task.name, self.builder)
        if len(dataset) == 0:
            raise ValueError(
                f"task {task.name!r}: manifest {self.manifest} has no {split} image annotated for it"
            )
        if split == "train" and self.sampling == "task" and len(dataset) < task.batch_size:
            raise ValueError(
                f"task {task.name!r}: {len(dataset)} train images annotated, fewer than batch_size={task.batch_size}"
            )
        return dataset

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.sampling == "image" and self.image_dataset is None:
            names = set(self.builder.tasks)
            records = [r for r in self.load_records() if r.split == "train" and names & set(r.annotations)]
            if len(records) < self.batch_size:
                raise ValueError(
                    f"manifest {self.manifest}: {len(records)} annotated train images, fewer than "
                    f"batch_size={self.batch_size}"
                )
            self.image_dataset = ImageCentricDataset(records, self.builder)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move tensors to ``device`` keeping shared tensors shared; ``present``/``pseudo`` stay on the CPU.

        An image tensor shared by several task batches is copied once, so the tasks still share
        it (and one encoder pass) on the device. The flags stay on the host, so selecting the
        annotated samples needs no device synchronisation.
        """
        return batch_to_device(batch, device, keep_on_host=FLAG_KEYS)

    def train_dataloader(self) -> Any:
        if self.sampling == "task":
            return super().train_dataloader()
        # resumable mid-epoch, worker seeds from the loader's own stream (as the per-task loaders)
        return ResumableDataLoader(
            self.image_dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.image_dataset), seed=self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_image_centric,
            generator=torch.Generator().manual_seed(self.seed),
        )


# ----------------------------------------------------------------------------------------------
# synthetic worlds as manifests, and label-budget-matched IMAX / DMAX views

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
    parser = argparse.ArgumentParser(description=main.__doc__)
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


if __name__ == "__main__":
    raise SystemExit(main())
