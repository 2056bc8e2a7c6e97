"""3D NIfTI volumes cut into 2D slices for 2D segmentation training."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umedpt.data.normalize import NormalizationSpec
from umedpt.data.problems import DataError, Problem
from umedpt.data.readers.base import Item, NonFinite
from umedpt.data.readers.image_io import ImageMeta
from umedpt.data.readers.segmentation import SegmentationDataset
from umedpt.data.transforms import ResizeMode, TransformSpec

__all__ = ["NiftiSliceDataset", "VolumeSlices", "slice_count", "volume_slice"]

#: voxel axis i of the file goes to canonical axis ORIENT[i, 0], flipped when ORIENT[i, 1] == -1
_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]])


def _orientation(image: Any, canonical: bool) -> np.ndarray:
    if not canonical:
        return _IDENTITY
    from nibabel.orientations import io_orientation

    ornt = io_orientation(image.affine)
    return _IDENTITY if np.isnan(ornt).any() else ornt.astype(int)


def _voxel_axis(ornt: np.ndarray, axis: int) -> int:
    return int(np.flatnonzero(ornt[:, 0] == axis)[0])


def slice_count(image: Any, axis: int, canonical: bool = True) -> int:
    """Number of slices of a nibabel image along ``axis`` (see :func:`volume_slice`)."""
    return int(image.shape[_voxel_axis(_orientation(image, canonical), axis)])


def volume_slice(image: Any, axis: int, index: int, canonical: bool = True, data: np.ndarray | None = None) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a 3D nibabel image, at full depth (scaling applied).

    With ``canonical`` the axes are those of the closest RAS orientation (``axis=2`` is axial for
    any stored orientation), equal to slicing ``nibabel.as_closest_canonical(image)`` but reading
    only one slice from uncompressed files. ``data`` is the whole volume when already in memory.
    """
    shape = tuple(int(s) for s in image.shape[:3])
    ornt = _orientation(image, canonical)
    voxel_axis = _voxel_axis(ornt, axis)
    k = index if ornt[voxel_axis, 1] > 0 else shape[voxel_axis] - 1 - index
    slicer: list[Any] = [slice(None)] * 3
    slicer[voxel_axis] = k
    source = image.dataobj if data is None else data
    plane = np.asanyarray(source[(*slicer, *([0] * (len(image.shape) - 3)))])
    rest = [d for d in range(3) if d != voxel_axis]
    for j, d in enumerate(rest):
        if ornt[d, 1] < 0:
            plane = np.flip(plane, axis=j)
    if ornt[rest[0], 0] > ornt[rest[1], 0]:
        plane = plane.T
    return np.ascontiguousarray(plane)


def _not_3d(shape: tuple[int, ...]) -> str:
    """Why a volume of ``shape`` is skipped, and what to do."""
    if len(shape) < 3:
        return f"shape {shape} is not a 3D volume; read 2D NIfTI images with SegmentationDataset"
    series = int(np.prod(shape[3:]))
    return (f"shape {shape} is a 4D series of {series} volumes (e.g. fMRI or DWI), not a 3D volume; it is skipped: "
            "save the volumes to slice (e.g. one time point or the mean) as 3D files")


class VolumeSlices:
    """Reads 2D slices of 3D NIfTI volumes along one axis, keeping a few opened volumes in memory.

    Compressed ``.nii.gz`` volumes are decompressed whole when a slice is first read (random
    access into gzip streams is slow); uncompressed ``.nii`` slices are read directly from disk.

    Args:
        axis: the axis slices are cut along (0, 1 or 2; with ``canonical`` 0 = sagittal,
            1 = coronal, 2 = axial).
        canonical: index the axes of the closest RAS orientation instead of the stored array axes.
        cache_volumes: how many opened volumes stay in memory (per DataLoader worker).
        owner: the name used in error messages (the dataset class).
    """

    def __init__(self, axis: int = 2, canonical: bool = True, cache_volumes: int = 2, owner: str = "NIfTI") -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"{owner}: axis must be 0, 1 or 2, got {axis}")
        self.axis, self.canonical, self.cache_volumes = axis, canonical, cache_volumes
        self._cache: OrderedDict[str, tuple[Any, np.ndarray | None]] = OrderedDict()

    def open(self, path: str, load: bool = True) -> tuple[Any, np.ndarray | None]:
        """The nibabel image of ``path`` and, for compressed files when ``load``, its voxels (cached)."""
        import nibabel as nib

        image, data = self._cache.pop(path, (None, None))
        if image is None:
            try:
                image = nib.load(path)
            except Exception as err:  # nibabel raises several types for foreign files
                raise DataError.of(path, "image", f"cannot read as NIfTI ({type(err).__name__}: {err})") from err
        if load and data is None and path.lower().endswith(".gz"):
            data = np.asanyarray(image.dataobj)
        self._cache[path] = (image, data)
        while len(self._cache) > max(self.cache_volumes, 1):
            self._cache.popitem(last=False)
        return image, data

    def shape(self, path: str) -> tuple[int, ...]:
        """The stored shape of the volume (its header only)."""
        image, _ = self.open(path, load=False)
        return tuple(int(s) for s in image.shape)

    def why_not_3d(self, path: str) -> str | None:
        """Why ``path`` cannot be sliced (not 3D, or a 4D series), or None when it can."""
        shape = self.shape(path)
        if len(shape) < 3 or any(s != 1 for s in shape[3:]):
            return _not_3d(shape)
        return None

    def count(self, path: str) -> int:
        """The number of slices of the volume along :attr:`axis` (its header only)."""
        image, _ = self.open(path, load=False)
        return slice_count(image, self.axis, self.canonical)

    def read(self, path: str, index: int, fld: str = "image", sample: int | None = None) -> np.ndarray:
        """Slice ``index`` of the volume at full depth; a :class:`DataError` naming the file, the
        slice and ``fld`` when it cannot be read."""
        where = f"{path} [slice {index}]"
        try:  # the header was read when the volume was listed; the voxels are read now
            image, data = self.open(path)
            if index >= slice_count(image, self.axis, self.canonical):
                raise DataError.of(where, fld, "the volume has no such slice", index=sample)
            return volume_slice(image, self.axis, index, self.canonical, data)
        except DataError:
            raise
        except Exception as err:  # gzip, zlib, numpy and nibabel each raise their own types
            raise DataError.of(
                where, fld, f"cannot read the voxels ({type(err).__name__}: {err}); the file may be truncated or "
                "corrupt", index=sample,
            ) from err

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # DataLoader workers build their own cache
        return state


class NiftiSliceDataset(SegmentationDataset):
    """Every slice of 3D NIfTI image volumes with their label volumes, as 2D segmentation samples.

    Volumes and label volumes are paired like :class:`SegmentationDataset` pairs images and masks
    (folders or a manifest). Each volume contributes one sample per slice along ``axis``.
    Missing files and volumes that are not 3D (4D fMRI or DWI series) are skipped and listed in
    :attr:`notes` (the data checker reports them; a split left empty names them).
    Values keep their stored depth (int16 CT stays exact; ``scl_slope``/``scl_inter`` are
    applied) until normalisation; for CT in Hounsfield units use a window, e.g. ``normalize: soft_tissue``.

    Args:
        images, masks, split, num_classes, class_names, manifest, image_column, mask_column,
            split_column, root, mask_suffix, mask_values, ignore_index: see :class:`SegmentationDataset`.
        axis: the axis slices are cut along (0, 1 or 2; with ``canonical`` 0 = sagittal,
            1 = coronal, 2 = axial).
        canonical: index the axes of the closest RAS orientation instead of the stored array axes.
        cache_volumes: how many opened volumes stay in memory per worker (compressed ``.nii.gz``
            volumes are decompressed whole; uncompressed ``.nii`` slices are read directly from disk).
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
        axis: int = 2,
        canonical: bool = True,
        cache_volumes: int = 2,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
    ) -> None:
        super().__init__(
            images=images, masks=masks, split=split, num_classes=num_classes, class_names=class_names,
            manifest=manifest, image_column=image_column, mask_column=mask_column, split_column=split_column,
            root=root, mask_suffix=mask_suffix, mask_values=mask_values, ignore_index=ignore_index,
            image_size=image_size, transform=transform, normalize=normalize, channels=channels, resize=resize,
            nonfinite=nonfinite,
        )
        self.volumes = VolumeSlices(axis, canonical, cache_volumes, owner="NiftiSliceDataset")
        self.axis, self.canonical, self.cache_volumes = axis, canonical, cache_volumes
        volumes, self.items, self.slices = self.items, [], []
        for volume in volumes:
            count = self._slice_count(volume)
            for k in range(count):
                self.items.append(Item(image=volume.image, mask=volume.mask, where=f"{volume.image} slice {k}"))
                self.slices.append(k)

    def _slice_count(self, volume: Item) -> int:
        if not Path(volume.image).is_file():
            self.notes.append(Problem(volume.image, "file", "file not found"))
            return 0
        why = self.volumes.why_not_3d(volume.image)
        if why is not None:
            self.notes.append(Problem(volume.image, "image", why))
            return 0
        if volume.mask is not None and Path(volume.mask).is_file():
            image_shape, mask_shape = self.volumes.shape(volume.image), self.volumes.shape(volume.mask)
            if mask_shape[:3] != image_shape[:3]:
                self.notes.append(
                    Problem(volume.mask, "mask", f"volume shape {mask_shape} differs from the image volume's {image_shape}")
                )
        return self.volumes.count(volume.image)

    def source(self, i: int) -> str:
        return f"{self.items[i].image} [slice {self.slices[i]}]"

    def mask_source(self, i: int) -> str:
        return f"{self.items[i].mask or self.items[i].image} [slice {self.slices[i]}]"

    def read(self, i: int) -> tuple[np.ndarray, ImageMeta]:
        """Slice ``i`` of its image volume, at full depth."""
        return self.volumes.read(self.items[i].image, self.slices[i], "image", sample=i), ImageMeta()

    def read_mask(self, i: int) -> np.ndarray:
        """Slice ``i`` of its label volume."""
        if self.items[i].mask is None:
            raise DataError.of(self.source(i), "mask", "the volume has no label volume", index=i)
        return self.volumes.read(self.items[i].mask, self.slices[i], "mask", sample=i)
