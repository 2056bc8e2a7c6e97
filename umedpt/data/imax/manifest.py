"""IMAX manifests as records: the schema (:class:`Annotation`, :class:`ImageRecord`), reading,
checking and writing JSON-lines and CSV manifests.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from umedpt.data.problems import DataError, did_you_mean
from umedpt.kinds import BUILTIN_KINDS, get_kind, same_kind
from umedpt.tasks import Task, as_task

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
