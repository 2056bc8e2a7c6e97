"""Read one 2D image file at full depth: PNG/TIFF/JPEG/BMP, NPY, DICOM and 2D NIfTI.

Pixel values are returned exactly as stored (8-bit, 16-bit, 32-bit integers or floats), never
converted to 8 bits; DICOM values go through the modality LUT (``RescaleSlope`` and
``RescaleIntercept``, e.g. to Hounsfield units). Intensity scaling happens later, in
:mod:`umedpt.data.normalize`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from umedpt.data.normalize import ImageMeta
from umedpt.data.readers.problems import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageMeta", "load_image", "read_image"]

#: file name endings that image folders and segmentation directories pick up
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy", ".dcm", ".dicom", ".nii", ".nii.gz",
)
_RASTER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_image(path: str | Path) -> np.ndarray:
    """The pixels of a 2D image file at full depth: (H, W), or (H, W, 3) RGB, or (H, W, 4) RGBA.

    Values and type are those stored (DICOM: after the modality LUT). Raises :class:`DataError` naming the file for a missing or
    undecodable file, or for data that is not a 2D image (e.g. a 3D NIfTI volume).
    """
    return load_image(path)[0]


def load_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """:func:`read_image` plus the file's :class:`ImageMeta` (display window, inversion)."""
    path = Path(path)
    if not path.is_file():
        raise DataError.of(str(path), "file", "not found" if not path.exists() else "is not a file")
    name = path.name.lower()
    try:
        if name.endswith(_RASTER_SUFFIXES):
            image, meta = _read_raster(path), ImageMeta()
        elif name.endswith(_NIFTI_SUFFIXES):
            image, meta = _read_nifti_2d(path), ImageMeta()
        elif name.endswith(".npy"):
            image, meta = np.load(path, allow_pickle=False), ImageMeta()
        elif name.endswith(_DICOM_SUFFIXES) or _has_dicom_preamble(path):
            image, meta = _read_dicom(path)
        else:
            image, meta = _read_raster(path), ImageMeta()
    except DataError:
        raise
    except Exception as err:  # every decoder has its own exception types
        raise DataError.of(str(path), "image", f"cannot read: {type(err).__name__}: {err}") from err
    return _check_shape(image, path), meta


def _check_shape(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
        if image.dtype.kind not in "buif":
            raise DataError.of(str(path), "image", f"unsupported pixel type {image.dtype}")
        if image.size == 0:
            raise DataError.of(str(path), "image", f"is empty (shape {image.shape})")
        return image
    raise DataError.of(
        str(path), "image", f"shape {tuple(image.shape)} is not a 2D image (H, W) or (H, W, C) with C in 1, 3, 4"
    )


def _has_dicom_preamble(path: Path) -> bool:
    """DICOM part 10 files carry ``DICM`` after a 128-byte preamble, whatever their name."""
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _read_raster(path: Path) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)  # imdecode also handles non-ASCII paths
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # failures are reported below
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    finally:
        cv2.utils.logging.setLogLevel(level)
    if image is None:  # OpenCV cannot decode some TIFF variants; Pillow can
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as pil:
                image = np.asarray(pil)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError.of(str(path), "image", f"cannot decode as an image ({err})") from err
        return image
    if image.ndim == 3 and image.shape[-1] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[-1] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def _read_dicom(path: Path) -> tuple[np.ndarray, ImageMeta]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise DataError.of(str(path), "PixelData", "the DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError.of(
            str(path), "NumberOfFrames", f"multi-frame DICOM ({frames} frames) is not a 2D image"
        )
    raw = ds.pixel_array
    image = apply_modality_lut(raw, ds) if raw.ndim == 2 else raw
    if image.dtype.kind == "f":
        image = image.astype(np.float32)  # 16-bit values times the slope are exact in float32
    window = None
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = [float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v) for v in (center, width)]
        window = (first[0], first[1])
    invert = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    return image, ImageMeta(window=window, invert=invert)


def _read_nifti_2d(path: Path) -> np.ndarray:
    import nibabel as nib

    image = nib.load(path)
    shape = tuple(int(s) for s in image.shape)
    if sum(s > 1 for s in shape) > 2:
        raise DataError.of(
            str(path), "image", f"is a volume of shape {shape}: slice it with umedpt.data.readers.NiftiSliceDataset"
        )
    return np.asanyarray(image.dataobj).reshape([s for s in shape if s > 1] or [1, 1])
