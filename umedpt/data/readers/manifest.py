"""Classification and multi-label data from a CSV manifest or an image folder.

A manifest is a CSV (or TSV) table with one row per image: a path column, label column(s) and,
unless the file name contains ``{split}``, a split column. Paths are relative to ``root``
(default: the manifest's directory). The same table helpers serve the segmentation reader.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from umedpt.data.normalize import NormalizationSpec
from umedpt.data.problems import did_you_mean
from umedpt.data.readers.base import SPLITS, FileDataset, Item, NonFinite
from umedpt.data.readers.image_io import IMAGE_SUFFIXES
from umedpt.data.transforms import ResizeMode, TransformSpec
from umedpt.kinds import get_kind, kind_names

__all__ = ["ImageFolderDataset", "ManifestDataset", "Table", "read_table", "split_path"]

#: spellings accepted in a split column
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


def split_path(path: str | Path, split: str) -> Path:
    """``path`` with ``{split}`` replaced, or ``path/<split>`` when it has no placeholder."""
    text = str(path)
    return Path(text.format(split=split)) if "{split}" in text else Path(text) / split


def image_files(directory: Path) -> list[Path]:
    """The image files directly inside ``directory`` (by suffix), sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


@dataclass
class Table:
    """The rows of one split of a manifest.

    Attributes:
        file: the manifest file the rows come from.
        columns: the header.
        rows: ``(line number, row)`` pairs; line 1 is the header.
    """

    file: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]

    def require(self, *columns: str) -> None:
        """Raise a ``ValueError`` naming the file when a column is missing."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise ValueError(f"{self.file}: no column {missing[0]!r}; the columns are {self.columns}")

    def resolve(self, value: str, root: Path) -> str:
        """A path cell as a path: absolute, or relative to ``root``."""
        path = Path(value.strip())
        return str(path if path.is_absolute() else root / path)


def read_text(file: Path) -> str:
    """The text of a UTF-8 file (a leading byte order mark is dropped).

    Raises a ``ValueError`` naming the file, the byte position and line of the first byte that is
    not UTF-8 (spreadsheets often save CSV as Latin-1 or Windows-1252).
    """
    data = file.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        position = start + err.start
        line = data.count(b"\n", 0, position) + 1
        raise ValueError(
            f"{file} is not UTF-8 text: byte 0x{data[position]:02x} at byte position {position} (line {line}) "
            "cannot be decoded; save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)"
        ) from err


def _read_rows(file: Path, delimiter: str | None) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    if not file.is_file():
        raise FileNotFoundError(f"manifest {file} not found")
    sep = delimiter or ("\t" if file.suffix.lower() in (".tsv", ".tab") else ",")
    reader = csv.DictReader(io.StringIO(read_text(file), newline=""), delimiter=sep)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
    if not columns:
        raise ValueError(f"manifest {file} is empty (no header row)")
    return columns, rows


def read_table(
    manifest: str | Path, split: str, split_column: str = "split", delimiter: str | None = None
) -> Table:
    """The rows of ``split``: the file named by ``{split}``, or the rows whose ``split_column`` says so.

    A row whose split value is none of :data:`SPLIT_ALIASES` (e.g. a typo such as ``trian``) is a
    ``ValueError`` naming the file, the line, the value and the accepted names.
    """
    text = str(manifest)
    if "{split}" in text:
        file = Path(text.format(split=split))
        columns, rows = _read_rows(file, delimiter)
        return Table(file, columns, rows)
    file = Path(text)
    columns, rows = _read_rows(file, delimiter)
    if split_column not in columns:
        raise ValueError(
            f"{file}: no column {split_column!r} to select the {split} split; add one (train/val/test) "
            "or put {split} in the manifest path (e.g. labels_{split}.csv)"
        )
    names = {alias: s for s, aliases in SPLIT_ALIASES.items() for alias in aliases}
    unknown = [(n, row[split_column]) for n, row in rows if row[split_column].lower() not in names]
    if unknown:
        raise ValueError(_unknown_splits(file, split_column, unknown, sorted(names)))
    chosen = [(n, row) for n, row in rows if names[row[split_column].lower()] == split]
    return Table(file, columns, chosen)


def _unknown_splits(file: Path, column: str, unknown: list[tuple[int, str]], allowed: list[str]) -> str:
    """The message for rows whose split value is not a split name: the first one, with a suggestion."""
    line, value = unknown[0]
    hint = did_you_mean(value, allowed)
    more = f"; {len(unknown) - 1} more rows have unknown split values" if len(unknown) > 1 else ""
    return (f"{file} line {line}: {column}: {value!r} is not a split{hint}; expected one of {allowed}{more}")


def all_rows(manifest: str | Path, delimiter: str | None = None) -> list[dict[str, str]]:
    """Every row of every split (to infer class names the same way for all splits)."""
    text = str(manifest)
    files = [Path(text.format(split=s)) for s in SPLITS] if "{split}" in text else [Path(text)]
    return [row for f in files if f.is_file() for _, row in _read_rows(f, delimiter)[1]]


class ManifestDataset(FileDataset):
    """Classification or multi-label images listed in a CSV manifest.

    Classification: ``label_column`` holds a class name or an integer class index per row.
    Multi-label: either ``label_column`` is a list of 0/1 columns (one per class, class names =
    column names by default), or one column of class names joined by ``separator`` (empty = none).

    Args:
        manifest: the CSV/TSV file; ``{split}`` in it selects one file per split.
        split: ``train``, ``val`` or ``test``.
        kind: ``classification`` or ``multilabel``.
        root: directory the paths are relative to (default: the manifest's directory).
        path_column: column of the image paths.
        label_column: label column, or the list of 0/1 columns of a multi-label task.
        split_column: column of the split (``train``/``val``/``test``; ``valid``, ``validation``,
            ``training``, ``testing`` are accepted, any other value is an error); unused when the
            path contains ``{split}``.
        class_names: class names in label order; None infers them from all rows of all splits
            (integer labels: ``0 .. max``; names: sorted).
        num_classes: number of classes when labels are integer indices (to report out-of-range ones).
        separator: separator of class names in a single multi-label column.
        delimiter: CSV delimiter (default: tab for ``.tsv``, else comma).
        image_size, transform, normalize, channels, resize, nonfinite: see
            :class:`~umedpt.data.readers.base.FileDataset`.
    """

    def __init__(
        self,
        manifest: str,
        split: str = "train",
        kind: Literal["classification", "multilabel"] = "classification",
        root: str | None = None,
        path_column: str = "path",
        label_column: str | list[str] = "label",
        split_column: str = "split",
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        separator: str = ";",
        delimiter: str | None = None,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
    ) -> None:
        task_kind = get_kind(kind)
        if task_kind.label_columns is None:
            tabular = [k for k in kind_names() if get_kind(k).label_columns is not None]
            raise ValueError(f"ManifestDataset: kind must be one with a table form {tabular}, got {kind!r}")
        super().__init__(split, kind, image_size=image_size, transform=transform, normalize=normalize,
                         channels=channels, resize=resize, nonfinite=nonfinite)
        table = read_table(manifest, split, split_column, delimiter)
        columns = [label_column] if isinstance(label_column, str) else list(label_column)
        table.require(path_column, *columns)
        fewest, most = task_kind.label_columns
        if not fewest <= len(columns) <= (most or len(columns)):
            count = f"{fewest}" if most == fewest else f"{fewest} to {most or 'any number of'}"
            raise ValueError(f"ManifestDataset: {kind} reads {count} label column(s), got {columns}")
        if class_names is None and num_classes is None:
            cells = [row.get(columns[0], "") for row in all_rows(manifest, delimiter)]
            class_names = task_kind.table_class_names(columns, cells, separator)
        self.set_classes(num_classes, class_names)
        root_dir = Path(root) if root is not None else table.file.parent
        self.items = []
        for line, row in table.rows:
            item = Item(image=table.resolve(row[path_column], root_dir), where=f"{table.file.name} line {line}")
            item.label, problem = task_kind.table_label([row[c] for c in columns], self.class_names, separator)
            if problem:
                item.invalid.append((columns[0], problem))
            self.items.append(item)
        self.expand_frames()


class ImageFolderDataset(FileDataset):
    """Classification images in one folder per class: ``<root>/<split>/<class>/<image>``.

    Args:
        root: the folder holding the split folders, or a path with ``{split}``.
        split: ``train``, ``val`` or ``test``.
        class_names: class folder names in label order; None uses the sorted class folders
            of all splits.
        image_size, transform, normalize, channels, resize, nonfinite: see
            :class:`~umedpt.data.readers.base.FileDataset`.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
    ) -> None:
        super().__init__(split, "classification", image_size=image_size, transform=transform, normalize=normalize,
                         channels=channels, resize=resize, nonfinite=nonfinite)
        directory = split_path(root, split)
        if not directory.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: folder {directory} of the {split} split not found")
        folders = sorted(p.name for p in directory.iterdir() if p.is_dir())
        if class_names is None:
            every = {p.name for s in SPLITS if split_path(root, s).is_dir() for p in split_path(root, s).iterdir()
                     if p.is_dir()}
            class_names = sorted(every)
        extra = sorted(set(folders) - set(class_names))
        if extra:
            raise ValueError(f"ImageFolderDataset: folders {extra} in {directory} are not in class_names {list(class_names)}")
        self.set_classes(None, class_names)
        self.items = [
            Item(image=str(path), label=label)
            for label, name in enumerate(self.class_names)
            if (directory / name).is_dir()
            for path in image_files(directory / name)
        ]
        self.expand_frames()
