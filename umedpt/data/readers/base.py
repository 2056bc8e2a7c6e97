"""The common machinery of every file reader: items, validation, normalisation, transforms.

A reader only lists its samples as :class:`Item` objects (file paths plus the declared targets),
calls :meth:`FileDataset.expand_frames` (one sample per frame of multi-frame DICOM files) and,
when its pixels do not come from one file per sample, overrides :meth:`FileDataset.read`
and :meth:`FileDataset.read_mask`. Everything else is shared:

* :meth:`FileDataset.entry_problems`: checks that need no decoding (files exist, labels in
  range, boxes valid and inside the declared image size);
* :meth:`FileDataset.sample_problems`: checks on decoded pixels (non-finite values, mask size and
  values, boxes inside the real image);
* :meth:`FileDataset.__getitem__`: read at full depth, check, normalise to [0, 1], resize and
  augment, standardise (:class:`~umedpt.data.case.CasePipeline`, the one path every source of
  cases takes), and return the case dict the heads consume;
* :meth:`FileDataset.inspect`: what the data checker needs per sample (problems, size, type, hash).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from umedpt.data.case import CasePipeline
from umedpt.data.normalize import NormalizationSpec
from umedpt.data.problems import DataError, Problem, errors_only, mask_value_message
from umedpt.data.readers.image_io import ImageMeta, frame_count, load_image, read_image
from umedpt.data.transforms import ResizeMode, TransformSpec
from umedpt.kinds import BUILTIN_KINDS, SSL_KINDS, get_kind
from umedpt.kinds.builtin import BOX_TOLERANCE

__all__ = [
    "BOX_TOLERANCE", "KINDS", "NONFINITE", "FileDataset", "Item", "ItemReport", "Kind", "NonFinite", "Sample",
    "SPLITS",
]

Kind = Literal["classification", "multilabel", "segmentation", "detection", "mim", "feature_mim"]
#: the kinds file readers read (their labels, masks and boxes, or the images alone for the
#: self-supervised kinds; a kind of your own brings its dataset)
KINDS: tuple[str, ...] = BUILTIN_KINDS + SSL_KINDS
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: what a reader does with NaN and Inf pixels: ``error`` (the sample is refused, naming the file)
#: or ``zero`` (they become 0 before normalisation, and the data checker warns)
NonFinite = Literal["error", "zero"]
NONFINITE: tuple[str, ...] = ("error", "zero")
#: message of a problem for a file that does not exist
MISSING = "file not found"


@dataclass
class Item:
    """One sample as declared by its source, before any pixel is read.

    Attributes:
        image: the image file, or a description of an array element (``file.npz:train_images[3]``).
        label: classification: class index; multilabel: (K,) 0/1 vector.
        mask: segmentation: the mask file.
        boxes: detection: (n, 4) float32 ``xyxy`` pixels (x2, y2 exclusive).
        box_labels: detection: (n,) int64 class indices.
        box_ids: detection: a name per box for messages (e.g. ``annotation 17``); default ``box <k>``.
        size: (H, W) declared by the annotations, when they declare one.
        where: where the annotation lives (e.g. ``labels.csv row 7``), when not in the image file.
        frame: the frame (0-based) of a multi-frame DICOM ``image`` (and ``mask``) this sample is;
            None for a file holding one image.
        on_disk: ``image`` and ``mask`` are files whose existence can be checked.
        invalid: ``(field, message)`` of declarations that could not be parsed (e.g. an unknown class name).
    """

    image: str
    label: int | np.ndarray | None = None
    mask: str | None = None
    boxes: np.ndarray | None = None
    box_labels: np.ndarray | None = None
    box_ids: list[str] | None = None
    size: tuple[int, int] | None = None
    where: str | None = None
    frame: int | None = None
    on_disk: bool = True
    invalid: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Sample:
    """A sample's pixels at full depth: the image with its display metadata and the class-index mask."""

    image: np.ndarray
    meta: ImageMeta = field(default_factory=ImageMeta)
    mask: np.ndarray | None = None


@dataclass
class ItemReport:
    """What :meth:`FileDataset.inspect` finds about one sample.

    Attributes:
        index: the sample index in its split.
        source: the image (file or array element).
        problems: everything wrong with the sample.
        shape: shape of the stored image (None when unreadable).
        dtype: pixel type of the stored image.
        value_range: smallest and largest finite stored value (None when none is finite).
        digest: hash of the stored pixels (duplicate detection).
        class_counts: per class: 1/0 for (multi-)labels, pixels for masks, boxes for detection.
    """

    index: int
    source: str
    problems: list[Problem] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    value_range: tuple[float, float] | None = None
    digest: str | None = None
    class_counts: np.ndarray | None = None


def pixel_digest(image: np.ndarray) -> str:
    """Hash of an array's type, shape and values: equal pixels give equal digests."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.dtype.str}{image.shape}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class FileDataset(Dataset):
    """Base class of the file readers: one task's samples of one split, as umedpt case dicts.

    Subclasses set :attr:`items`, then call :meth:`set_classes`. Items are ``image`` float32
    (C, H, W) standardised, plus ``label`` (int, or float32 (K,) multi-hot), ``mask`` int64 (H, W)
    with ``ignore_index``, or ``boxes`` float32 (n, 4) ``xyxy`` and ``box_labels`` int64 (n,).

    Args:
        split: ``train``, ``val`` or ``test``; only ``train`` is augmented.
        kind: the task kind the reader serves.
        image_size: side of the square images returned; None keeps each image's own size.
        transform: augmentation preset (see :mod:`umedpt.data.transforms`), a list of
            albumentations specs, or None.
        normalize: intensity normalisation (see :mod:`umedpt.data.normalize`).
        channels: channels of the returned images, 1 or 3 (grey is repeated, RGB converted to luminance,
            alpha dropped).
        resize: ``stretch`` or ``letterbox``.
        ignore_index: mask value that marks unlabelled pixels (segmentation).
        nonfinite: what to do with NaN or Inf pixel values (float images): ``error`` (default)
            refuses the sample, naming the file and the count; ``zero`` replaces them by 0 before
            normalisation (the data checker reports a warning).
    """

    def __init__(
        self,
        split: str,
        kind: Kind,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        ignore_index: int = 255,
        nonfinite: NonFinite = "error",
    ) -> None:
        name = type(self).__name__
        if split not in SPLITS:
            raise ValueError(f"{name}: split must be one of {list(SPLITS)}, got {split!r}")
        if kind not in KINDS:
            raise ValueError(f"{name}: kind must be one of {list(KINDS)}, got {kind!r}")
        if channels not in (1, 3):
            raise ValueError(f"{name}: channels must be 1 or 3, got {channels}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"{name}: nonfinite must be one of {list(NONFINITE)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.split = split
        self.kind: str = kind
        #: what the kind means (its targets, checks and class counts), resolved once
        self.task_kind = get_kind(kind)
        self.channels = channels
        self.image_size = image_size
        self.ignore_index = ignore_index
        #: stored pixels -> case: scale, channels, resize + augment with the targets, standardise
        self.pipeline = CasePipeline(
            normalize, channels, image_size, transform, resize, train=split == "train",
            boxes="boxes" in self.task_kind.target_keys, ignore_index=ignore_index,
        )
        self.normalization = self.pipeline.normalization
        self.items: list[Item] = []
        #: problems of the whole split found while listing it (e.g. unused manifest rows)
        self.notes: list[Problem] = []
        self.num_classes = 0
        self.class_names: list[str] = []
        #: fields whose loading warnings were shown (:meth:`raw` shows one per field)
        self._warned: set[str] = set()

    def set_classes(self, num_classes: int | None, class_names: Sequence[str] | None) -> None:
        """Set :attr:`num_classes` and :attr:`class_names` (default names ``"0"``, ``"1"``, ...)."""
        name = type(self).__name__
        if num_classes is None:
            if class_names is None:
                raise ValueError(f"{name}: give num_classes or class_names")
            num_classes = len(class_names)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{name}: {len(class_names)} class_names for num_classes={num_classes}")
        if num_classes < 1:
            raise ValueError(f"{name}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = [str(c) for c in class_names] if class_names is not None else [
            str(i) for i in range(num_classes)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def expand_frames(self) -> None:
        """Replace each item whose image is a multi-frame DICOM file by one item per frame.

        Frame ``k`` keeps the item's label and mask file, with :attr:`Item.frame` ``= k`` and
        ``frame k`` added to :attr:`Item.where`. Only the files' headers are read (see
        :func:`~umedpt.data.readers.image_io.frame_count`); missing files stay one item.
        """
        items = []
        for item in self.items:
            frames = frame_count(item.image) if item.on_disk and item.frame is None else 1
            if frames == 1:
                items.append(item)
                continue
            for k in range(frames):
                where = f"{item.where} frame {k}" if item.where else f"{item.image} [frame {k}]"
                items.append(replace(item, frame=k, where=where, invalid=list(item.invalid)))
        self.items = items

    # ---------------------------------------------------------------- reading
    def source(self, i: int) -> str:
        """The image of sample ``i`` (file path or array element; ``file.dcm [frame k]`` for a frame)."""
        item = self.items[i]
        return item.image if item.frame is None else f"{item.image} [frame {item.frame}]"

    def mask_source(self, i: int) -> str:
        """The mask of sample ``i`` (its file, or the image when the sample has none)."""
        item = self.items[i]
        if item.mask is None:
            return self.source(i)
        return item.mask if item.frame is None else f"{item.mask} [frame {item.frame}]"

    def read(self, i: int) -> tuple[np.ndarray, ImageMeta]:
        """The stored image of sample ``i`` at full depth and its display metadata."""
        item = self.items[i]
        return load_image(item.image, item.frame)

    def read_mask(self, i: int) -> np.ndarray:
        """The stored mask of sample ``i`` (before any value mapping).

        The mask of a frame of a multi-frame image is the same frame of a mask file with as many frames.
        """
        item = self.items[i]
        if item.mask is None:
            raise DataError.of(self.source(i), "mask", "the sample has no mask file", index=i)
        if item.frame is None:
            return read_image(item.mask)
        frames, image_frames = frame_count(item.mask), frame_count(item.image)
        if frames != image_frames:
            raise DataError.of(
                self.mask_source(i), "mask", f"has {frames} frame(s) but the image {item.image} has {image_frames}: "
                "the mask of a multi-frame image must be a multi-frame DICOM file with one frame per image frame",
                index=i,
            )
        return read_image(item.mask, item.frame)

    def mask_classes(self, i: int, stored: np.ndarray) -> tuple[np.ndarray, list[Problem]]:
        """Class-index mask (int64) from the stored mask, and the problems of its values.

        Subclasses with a value mapping (e.g. 0/255 masks) override this.
        """
        where = self.mask_source(i)
        problems = []
        if stored.dtype.kind == "f" and not np.array_equal(stored, np.round(stored)):
            problems.append(Problem(where, "mask", "has non-integer values; masks must hold class indices", index=i))
        return stored.astype(np.int64), problems

    def load(self, i: int) -> tuple[Sample, list[Problem]]:
        """The sample's pixels and the problems found on them; raises :class:`DataError` if unreadable."""
        image, meta = self.read(i)
        image, problems = self.finite_image(i, image)
        mask = None
        if "mask" in self.task_kind.target_keys:
            stored = self.read_mask(i)
            where = self.mask_source(i)
            if stored.ndim == 3 and (stored == stored[..., :1]).all():
                stored = stored[..., 0]
            if stored.ndim != 2:
                problems.append(
                    Problem(where, "mask", f"has {stored.shape[-1]} different channels; class-index masks "
                            "are single-channel", index=i)
                )
            else:
                mask, mask_problems = self.mask_classes(i, stored)
                problems += mask_problems
        sample = Sample(image, meta, mask)
        return sample, problems + self.sample_problems(i, sample)

    def finite_image(self, i: int, image: np.ndarray) -> tuple[np.ndarray, list[Problem]]:
        """``image`` with its NaN/Inf values handled as :attr:`nonfinite` says, and the problem they make.

        ``error``: the image is returned as is with an error; ``zero``: a copy with 0 in their
        place and a warning. Integer images are always finite.
        """
        if image.dtype.kind != "f":
            return image, []
        bad = ~np.isfinite(image)
        count = int(np.count_nonzero(bad))
        if count == 0:
            return image, []
        nan = int(np.count_nonzero(np.isnan(image)))
        what = f"{count} of {image.size} values are not finite ({nan} NaN, {count - nan} Inf)"
        if self.nonfinite == "zero":
            problem = Problem(self.source(i), "image", f"{what}; replaced by 0 (nonfinite: zero)", "warning", index=i)
            return np.where(bad, np.zeros((), image.dtype), image), [problem]
        message = f"{what}; fix the file, or set nonfinite: zero to replace them by 0 before normalisation"
        return image, [Problem(self.source(i), "image", message, index=i)]

    def raw(self, i: int) -> Sample:
        """Sample ``i`` at full depth (no normalisation); raises :class:`DataError` on any error.

        A warning found on the pixels (e.g. a mask that is mostly ``ignore_index``) is shown as a
        ``UserWarning``, once per dataset (and DataLoader worker) and field.
        """
        errors = errors_only(self.entry_problems(i))
        if not errors:
            sample, problems = self.load(i)
            errors = errors_only(problems)
            for problem in problems:
                if problem.severity == "warning" and problem.field not in self._warned:
                    self._warned.add(problem.field)
                    warnings.warn(f"{problem} (shown once; `umedpt data check` lists every file)", stacklevel=2)
        if errors:
            raise DataError(str(errors[0]), errors[0])
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        """The case dict of sample ``i``; a :class:`DataError` names the file and field of a bad sample."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {i!r}")
        if not 0 <= i < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {i}")
        i = int(i)
        sample = self.raw(i)
        item = self.items[i]
        masks = {"mask": sample.mask} if sample.mask is not None else None
        boxes = {"boxes": (item.boxes, item.box_labels)} if "boxes" in self.task_kind.target_keys else None
        case = self.pipeline(sample.image, sample.meta, masks, boxes)
        targets: dict[str, Any] = {"label": item.label}
        if masks is not None:
            targets["mask"] = case.masks["mask"]
        if boxes is not None:
            targets["boxes"], targets["box_labels"] = case.boxes["boxes"]
        return {"image": case.image, **self.task_kind.case_targets(**targets)}

    def stored(self, i: int) -> dict[str, Any]:
        """Sample ``i`` before resizing and augmentation, as ``umedpt data optimize`` stores it:
        ``image`` float32 (H, W, C) in [0, 1] (the normalisation's first step, channels set) and
        its targets at that size (``label``, ``mask`` class indices, ``boxes`` + ``box_labels``)."""
        sample = self.raw(int(i))
        item = self.items[int(i)]
        out: dict[str, Any] = {"image": self.pipeline.unit(sample.image, sample.meta)}
        if item.label is not None:
            out["label"] = item.label
        if sample.mask is not None:
            out["mask"] = sample.mask
        if "boxes" in self.task_kind.target_keys:
            out["boxes"], out["box_labels"] = item.boxes, item.box_labels
        return out

    # ---------------------------------------------------------------- validation
    def entry_problems(self, i: int) -> list[Problem]:
        """Problems of sample ``i`` found without decoding: missing files, labels, declared boxes."""
        item = self.items[i]
        where = item.where or item.image
        problems = []
        if item.on_disk:
            for fld, path in (("file", item.image), ("mask", item.mask)):
                if path is not None and not Path(path).is_file():
                    problems.append(Problem(path, fld, MISSING, index=i))
        problems += [Problem(where, fld, message, index=i) for fld, message in item.invalid]
        if item.invalid and "label" in self.task_kind.target_keys:
            return problems  # the label could not be parsed
        return problems + self._target_problems(i, item.size, "image size the annotations declare")

    def _target_problems(self, i: int, size: tuple[int, int] | None, what: str) -> list[Problem]:
        """The kind's problems with sample ``i``'s declared targets (boxes checked against ``size``)."""
        item = self.items[i]
        found = self.task_kind.target_problems(
            self._declared_targets(item), self.num_classes, self.class_names, size, what, item.box_ids
        )
        return [Problem(item.where or item.image, fld, message, index=i) for fld, message in found]

    @staticmethod
    def _declared_targets(item: Item) -> dict[str, Any]:
        return {"label": item.label, "mask": item.mask, "boxes": item.boxes, "box_labels": item.box_labels}

    def sample_problems(self, i: int, sample: Sample) -> list[Problem]:
        """Problems of sample ``i`` that need its pixels: mask size and values, boxes inside the image."""
        item = self.items[i]
        h, w = sample.image.shape[:2]
        problems = []
        if sample.mask is not None:
            where = self.mask_source(i)
            if sample.mask.shape != (h, w):
                mh, mw = sample.mask.shape
                problems.append(
                    Problem(where, "mask", f"size {mh}x{mw} differs from the image's {h}x{w} ({item.image})", index=i)
                )
            message = mask_value_message(sample.mask, self.num_classes, self.ignore_index)
            if message:
                problems.append(Problem(where, "mask", message, index=i))
        if "boxes" in self.task_kind.target_keys and item.size != (h, w):  # declared sizes are checked without pixels
            if item.size is not None:
                problems.append(
                    Problem(item.where or item.image, "size", f"annotations declare {item.size[0]}x{item.size[1]} "
                            f"but {item.image} is {h}x{w}", index=i)
                )
            problems += self._target_problems(i, (h, w), "image")
        return problems

    def inspect(self, i: int) -> ItemReport:
        """Everything the data checker reports about sample ``i`` (reads and decodes it)."""
        report = ItemReport(index=i, source=self.source(i), problems=self.entry_problems(i))
        if any(p.message == MISSING for p in report.problems):
            return report
        try:
            sample, problems = self.load(i)
        except DataError as err:
            report.problems.append(err.problem or Problem(self.source(i), "image", str(err), index=i))
            return report
        report.problems += problems
        image = sample.image
        report.shape, report.dtype = tuple(image.shape), str(image.dtype)
        values = image[np.isfinite(image)] if image.dtype.kind == "f" else image
        report.value_range = (float(values.min()), float(values.max())) if values.size else None
        report.digest = pixel_digest(image)
        if sample.mask is not None:
            valid = sample.mask[(sample.mask >= 0) & (sample.mask < self.num_classes)]
            report.class_counts = np.bincount(valid.ravel(), minlength=self.num_classes)
        else:
            report.class_counts = self.declared_counts(i)
        return report

    def declared_counts(self, i: int) -> np.ndarray | None:
        """Per-class counts of sample ``i`` known without decoding, or None.

        1/0 per class for (multi-)labels, boxes per class for detection; None for segmentation
        (masks must be decoded) or a label that is not valid.
        """
        item = self.items[i]
        if item.invalid and "label" in self.task_kind.target_keys:
            return None
        return self.task_kind.class_counts(self._declared_targets(item), self.num_classes)

    def problems(self, deep: bool = False) -> list[Problem]:
        """All problems of the split: from the declarations only, or (``deep``) decoding every sample."""
        found = list(self.notes)
        for i in range(len(self)):
            found += self.inspect(i).problems if deep else self.entry_problems(i)
        return found

    def describe(self) -> dict[str, Any]:
        """Reader-specific facts for the checker's report (e.g. a category mapping)."""
        return {}

