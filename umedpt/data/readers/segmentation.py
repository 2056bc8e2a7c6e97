"""Semantic segmentation: image files paired with class-index mask files (PNG, TIFF, NPY, DICOM...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from umedpt.data.normalize import NormalizationSpec
from umedpt.data.problems import Problem
from umedpt.data.readers.base import FileDataset, Item, NonFinite
from umedpt.data.readers.image_io import IMAGE_SUFFIXES
from umedpt.data.readers.manifest import image_files, read_table, split_path
from umedpt.data.transforms import ResizeMode, TransformSpec

__all__ = ["IGNORED_WARNING", "SegmentationDataset", "file_stem"]

#: a mask whose ``ignore_index`` pixels exceed this fraction is reported (a warning): most likely a
#: 0/255 binary mask read without ``mask_values``, whose foreground would all be ignored
IGNORED_WARNING = 0.5


def file_stem(path: Path) -> str:
    """The file name without its image suffix (``case_01.nii.gz`` -> ``case_01``)."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class SegmentationDataset(FileDataset):
    """Images with masks of class indices, paired by file name or listed in a manifest.

    Directory layout: ``images`` and ``masks`` are folders (``{split}`` in them, or a ``<split>``
    subfolder); the mask of ``images/case1.png`` is the file named ``case1<mask_suffix>`` with any
    image suffix in ``masks`` (``case1.png``, ``case1_mask.tif``, ``case1.npy``...). Manifest
    layout: a CSV with an image and a mask column (see :class:`~umedpt.data.readers.manifest.ManifestDataset`
    for paths and splits).

    Masks hold class indices ``0 .. num_classes - 1`` (0 is usually background) and
    ``ignore_index`` for unlabelled pixels. Masks stored with other values (e.g. 0/255 binary
    masks) are translated by ``mask_values``. RGB masks whose three channels are equal are read
    as single-channel. Without ``mask_values``, a mask whose pixels are mostly (more than
    :data:`IGNORED_WARNING`) ``ignore_index`` is reported as a warning (the default 255 is the
    foreground of 0/255 masks).

    Args:
        images: folder of the images (with ``{split}`` or ``<split>`` subfolders); or None with ``manifest``.
        masks: folder of the masks, same layout.
        split: ``train``, ``val`` or ``test``.
        num_classes: number of classes including background.
        class_names: optional names, one per class.
        manifest: a CSV listing image and mask paths (instead of ``images``/``masks``).
        image_column: manifest column of the image paths.
        mask_column: manifest column of the mask paths.
        split_column: manifest column of the split.
        root: directory the manifest's paths are relative to (default: the manifest's directory).
        mask_suffix: what mask file names add to the image's name (e.g. ``_mask``).
        mask_values: stored mask value -> class index (e.g. ``{0: 0, 255: 1}``); any other value is an error.
        ignore_index: mask value of unlabelled pixels (kept as is; the head ignores it).
        image_size, transform, normalize, channels, resize, nonfinite: see
            :class:`~umedpt.data.readers.base.FileDataset`.
    """

    def __init__(
        self,
        images: str | None = None,
        masks: str | None = None,
        split: str = "train",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        manifest: str | None = None,
        image_column: str = "image",
        mask_column: str = "mask",
        split_column: str = "split",
        root: str | None = None,
        mask_suffix: str = "",
        mask_values: Mapping[int, int] | None = None,
        ignore_index: int = 255,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
    ) -> None:
        super().__init__(split, "segmentation", image_size=image_size, transform=transform, normalize=normalize,
                         channels=channels, resize=resize, ignore_index=ignore_index, nonfinite=nonfinite)
        name = type(self).__name__
        self.set_classes(num_classes, class_names)
        if 0 <= ignore_index < self.num_classes:
            raise ValueError(f"{name}: ignore_index={ignore_index} is a class index (num_classes={self.num_classes})")
        self.mask_values = None
        if mask_values is not None:
            self.mask_values = {int(k): int(v) for k, v in mask_values.items()}
            bad = {k: v for k, v in self.mask_values.items() if not (0 <= v < self.num_classes or v == ignore_index)}
            if bad:
                raise ValueError(f"{name}: mask_values {bad} map to neither a class index nor ignore_index")
        if manifest is not None:
            if images is not None or masks is not None:
                raise ValueError(f"{name}: give either manifest or images and masks folders, not both")
            table = read_table(manifest, split, split_column)
            table.require(image_column, mask_column)
            base = Path(root) if root is not None else table.file.parent
            self.items = [
                Item(image=table.resolve(row[image_column], base), mask=table.resolve(row[mask_column], base),
                     where=f"{table.file.name} line {line}")
                for line, row in table.rows
            ]
        elif images is not None and masks is not None:
            self.items, self.notes = self._pair(split_path(images, split), split_path(masks, split), mask_suffix)
        else:
            raise ValueError(f"{name}: give a manifest, or both images and masks folders")
        self.expand_frames()

    @staticmethod
    def _pair(image_dir: Path, mask_dir: Path, suffix: str) -> tuple[list[Item], list[Problem]]:
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise FileNotFoundError(f"SegmentationDataset: folder {directory} not found")
        masks = {}
        for path in image_files(mask_dir):
            stem = file_stem(path)
            masks[stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem] = path
        images = image_files(image_dir)
        items = [Item(image=str(p), mask=str(masks[file_stem(p)]) if file_stem(p) in masks else None) for p in images]
        orphans = sorted(set(masks) - {file_stem(p) for p in images})
        notes = []
        if orphans:
            notes.append(
                Problem(str(mask_dir), "mask", f"{len(orphans)} masks have no image (e.g. {orphans[:3]})", "warning")
            )
        return items, notes

    def mask_classes(self, i: int, stored: np.ndarray) -> tuple[np.ndarray, list[Problem]]:
        """Translate stored values with ``mask_values`` (when given); without, report mostly ignored masks."""
        mask, problems = super().mask_classes(i, stored)
        if self.mask_values is None:
            return mask, problems + self._ignored_problems(i, mask)
        if problems:
            return mask, problems
        keys = np.array(sorted(self.mask_values), dtype=np.int64)
        values = np.array([self.mask_values[k] for k in keys], dtype=np.int64)
        pos = np.clip(np.searchsorted(keys, mask), 0, len(keys) - 1)
        known = keys[pos] == mask
        if not known.all():
            unknown = np.unique(mask[~known])[:8].tolist()
            problems.append(
                Problem(self.mask_source(i), "mask", f"values {unknown} are not in mask_values {self.mask_values}", index=i)
            )
        return np.where(known, values[pos], self.ignore_index), problems

    def _ignored_problems(self, i: int, mask: np.ndarray) -> list[Problem]:
        """A warning when ``ignore_index`` covers more than :data:`IGNORED_WARNING` of the mask."""
        ignored = np.count_nonzero(mask == self.ignore_index) / max(mask.size, 1)
        if ignored <= IGNORED_WARNING:
            return []
        value = self.ignore_index
        message = (f"{ignored:.0%} of the pixels are ignore_index={value} and are not trained on; if {value} "
                   f"marks a class (e.g. a 0/{value} binary mask), set mask_values (e.g. {{0: 0, {value}: 1}})")
        return [Problem(self.mask_source(i), "mask", message, "warning", index=i)]
