"""Readers for the file formats researchers have; each dataset returns umedpt case dicts.

==========================  ===================================================================
``MedMNISTDataset``         MedMNIST ``.npz`` (classification, multi-label)
``ManifestDataset``         CSV/TSV manifest of image paths and labels (classification, multi-label)
``ImageFolderDataset``      ``<root>/<split>/<class>/<image>`` folders (classification)
``SegmentationDataset``     image + class-index mask files (PNG, TIFF, NPY, DICOM, 2D NIfTI)
``CocoDetectionDataset``    COCO JSON boxes and categories (detection)
``NiftiSliceDataset``       3D NIfTI volumes + label volumes, sliced along an axis (segmentation)
``ImageCollectionDataset``  images of a folder, glob or list file, no labels (``mim``, ``feature_mim``)
==========================  ===================================================================

Every reader reads images with :func:`read_image`, so any of them accepts PNG/TIFF/JPEG/BMP,
NPY, DICOM (modality LUT applied, palette colour as RGB) and 2D NIfTI files at full depth; the
file readers make one sample per frame of a multi-frame DICOM file (:func:`frame_count`).
"""

from umedpt.data.problems import DataError, Problem
from umedpt.data.readers.base import FileDataset, Item, ItemReport, Sample
from umedpt.data.readers.coco import CocoDetectionDataset
from umedpt.data.readers.collection import ImageCollectionDataset
from umedpt.data.readers.image_io import IMAGE_SUFFIXES, ImageMeta, frame_count, load_image, read_image
from umedpt.data.readers.manifest import ImageFolderDataset, ManifestDataset
from umedpt.data.readers.medmnist import MedMNISTDataset
from umedpt.data.readers.segmentation import SegmentationDataset
from umedpt.data.readers.volume import NiftiSliceDataset

__all__ = [
    "IMAGE_SUFFIXES",
    "CocoDetectionDataset",
    "DataError",
    "FileDataset",
    "ImageCollectionDataset",
    "ImageFolderDataset",
    "ImageMeta",
    "Item",
    "ItemReport",
    "ManifestDataset",
    "MedMNISTDataset",
    "NiftiSliceDataset",
    "Problem",
    "Sample",
    "SegmentationDataset",
    "frame_count",
    "load_image",
    "read_image",
]
