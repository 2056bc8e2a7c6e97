"""Unlabelled image collections: the images of a folder, a glob pattern or a list file, no labels."""

from __future__ import annotations

import glob as globbing
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from umedpt.data.normalize import NormalizationSpec
from umedpt.data.problems import DataError, Problem
from umedpt.data.readers.base import FileDataset, Item, Kind, NonFinite
from umedpt.data.readers.image_io import IMAGE_SUFFIXES, ImageMeta
from umedpt.data.readers.volume import VolumeSlices
from umedpt.data.transforms import ResizeMode, TransformSpec

__all__ = ["ImageCollectionDataset"]

#: the share of a collection's images that go to the validation and test splits by default
DEFAULT_HELD_OUT: dict[str, float] = {"val": 0.05, "test": 0.05}


_NIFTI = (".nii", ".nii.gz")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def collection_files(source: str | Path) -> tuple[list[Path], Path]:
    """The image files of ``source``, sorted, and the folder their names are relative to: every
    image file under a folder (recursively), the files a glob pattern matches (``**`` recurses),
    or the paths listed one per line in a ``.txt`` file (relative to that file; blank lines and
    ``#`` comments skipped)."""
    text = str(source)
    path = Path(text)
    if globbing.has_magic(text):
        prefix = text[: min(text.index(c) for c in "*?[" if c in text)]
        base = Path(prefix[: prefix.rfind("/") + 1] or ".")  # the folder before the first wildcard
        return sorted(Path(p) for p in globbing.glob(text, recursive=True) if _is_image(Path(p))), base
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if _is_image(p)), path
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [path.parent / line for line in lines if line and not line.startswith("#")], path.parent
    if path.is_file():
        raise ValueError(f"ImageCollectionDataset: {path} is neither a folder, a glob pattern nor a .txt list of images")
    raise FileNotFoundError(f"ImageCollectionDataset: {path} not found (a folder, a glob pattern or a .txt list)")


def split_of(name: str, held_out: Mapping[str, float]) -> str:
    """The split of a file by the hash of its name: stable when files are added or removed."""
    value = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split in ("val", "test"):
        edge += held_out.get(split, 0.0)
        if value < edge:
            return split
    return "train"


class ImageCollectionDataset(FileDataset):
    """Images without labels, for the self-supervised kinds (``mim``, ``feature_mim``).

    Args:
        root: a folder (every image file under it, recursively), a glob pattern
            (``scans/**/*.dcm``) or a ``.txt`` file listing image paths, one per line. With
            ``{split}`` in it, each split has its own (``data/{split}``); otherwise the files
            are assigned to splits by a hash of their path relative to ``root`` (see
            ``held_out``), so a file keeps its split when others are added.
        split: ``train``, ``val`` or ``test``.
        held_out: fractions of the files in ``val`` and ``test`` when they are assigned by hash
            (default 5% each).
        kind: the kind the images serve (``mim`` or ``feature_mim``; both read images alone).
        image_size, transform, normalize, channels, resize, nonfinite: see
            :class:`~umedpt.data.readers.base.FileDataset`.
        volume_axis: 3D NIfTI volumes give one sample per slice along this axis (0, 1 or 2; with
            ``canonical`` 0 = sagittal, 1 = coronal, 2 = axial, the default). 4D series are
            skipped and listed in :attr:`notes`.
        canonical, cache_volumes: see :class:`~umedpt.data.readers.volume.NiftiSliceDataset`.

    Every format the readers read works (PNG/TIFF/JPEG/BMP, NPY, DICOM with one sample per
    frame, NIfTI images and one sample per slice of NIfTI volumes); ``umedpt data check`` reports
    unreadable or non-finite images by file (and slice).
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        held_out: Mapping[str, float] | None = None,
        kind: Kind = "mim",
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
        volume_axis: int = 2,
        canonical: bool = True,
        cache_volumes: int = 2,
    ) -> None:
        super().__init__(split, kind, image_size=image_size, transform=transform, normalize=normalize,
                         channels=channels, resize=resize, nonfinite=nonfinite)
        if not self.task_kind.image_only:
            raise ValueError(
                f"ImageCollectionDataset: images without labels serve the image-only kinds, not {kind!r}"
            )
        held = dict(DEFAULT_HELD_OUT if held_out is None else held_out)
        unknown = sorted(set(held) - {"val", "test"})
        if unknown or any(not 0.0 <= v < 1.0 for v in held.values()) or sum(held.values()) >= 1.0:
            raise ValueError(
                f"ImageCollectionDataset: held_out must map 'val' and/or 'test' to fractions in [0, 1) "
                f"that leave some images for training, got {held}"
            )
        if "{split}" in str(root):
            files, _ = collection_files(str(root).format(split=split))
        else:
            files, base = collection_files(root)
            files = [f for f in files if split_of(_relative(f, base), held) == split]
        self.set_classes(1, ["image"])
        self.volumes = VolumeSlices(volume_axis, canonical, cache_volumes, owner="ImageCollectionDataset")
        self.items = [Item(image=str(f)) for f in files]
        self.expand_frames()
        items, self.slices = self.items, []
        self.items = []
        for item in items:
            count = self._slices(item.image) if item.frame is None else None
            for k in [None] if count is None else range(count):  # a volume that cannot be sliced gives none
                self.items.append(item if k is None else Item(image=item.image, where=f"{item.image} slice {k}"))
                self.slices.append(k)

    def _slices(self, path: str) -> int | None:
        """How many slices a 3D NIfTI volume gives (0 when it cannot be sliced), None for a 2D image."""
        if not path.lower().endswith(_NIFTI) or not Path(path).is_file():
            return None
        try:
            shape = self.volumes.shape(path)
        except DataError as err:  # one unreadable file does not hide the others
            self.notes.append(err.problem or Problem(path, "image", str(err)))
            return 0
        if sum(s > 1 for s in shape) <= 2:
            return None  # a 2D image stored as NIfTI: read as one image
        why = self.volumes.why_not_3d(path)
        if why is not None:
            self.notes.append(Problem(path, "image", why))
            return 0
        return self.volumes.count(path)

    def source(self, i: int) -> str:
        k = self.slices[i]
        return super().source(i) if k is None else f"{self.items[i].image} [slice {k}]"

    def read(self, i: int) -> tuple[np.ndarray, ImageMeta]:
        k = self.slices[i]
        if k is None:
            return super().read(i)
        return self.volumes.read(self.items[i].image, k, "image", sample=i), ImageMeta()


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()
