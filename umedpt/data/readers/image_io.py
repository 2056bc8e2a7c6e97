"""Read one 2D image file at full depth: PNG/TIFF/JPEG/BMP, NPY, DICOM and 2D NIfTI.

Pixel values are returned exactly as stored (8-bit, 16-bit, 32-bit integers or floats), never
converted to 8 bits; DICOM values go through the modality LUT (``RescaleSlope`` and
``RescaleIntercept``, e.g. to Hounsfield units). Intensity scaling happens later, in
:mod:`umedpt.data.normalize`.

DICOM: ``PALETTE COLOR`` images come back as RGB through their palette, ``YBR_*`` colour as RGB.
A multi-frame file holds :func:`frame_count` 2D images; ``read_image(path, frame=k)`` reads one
(only that frame is read from the file and decoded), and the readers make one sample per frame.
Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded by the plugins of the
``dicom`` extra (``pip install 'umedpt[dicom]'``); without them the error says so.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from umedpt.data.normalize import ImageMeta
from umedpt.data.problems import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageMeta", "frame_count", "load_image", "read_image"]

#: file name endings that image folders and segmentation directories pick up
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy", ".dcm", ".dicom", ".nii", ".nii.gz",
)
_RASTER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: DICOM values longer than this are read only when used: one frame of a large multi-frame file is
#: read without reading the others
_DEFER_SIZE = "256 KB"
#: what to install when pydicom lacks the decoder of a compressed transfer syntax
DICOM_EXTRA = "pip install 'umedpt[dicom]'"
#: TIFF tag of how colour samples are stored: 1 interleaved (RGBRGB...), 2 in separate planes (RR..GG..BB..)
_PLANAR_CONFIGURATION = 284


def read_image(path: str | Path, frame: int | None = None) -> np.ndarray:
    """The pixels of a 2D image file at full depth: (H, W), or (H, W, 3) RGB, or (H, W, 4) RGBA.

    Values and type are those stored (DICOM: after the modality LUT; palette colour as RGB).
    ``frame`` picks one frame (0-based) of a multi-frame DICOM file, which without it is an error;
    any other file has only frame 0. Raises :class:`DataError` naming the file for a missing or
    undecodable file, or for data that is not a 2D image (e.g. a 3D NIfTI volume).
    """
    return load_image(path, frame)[0]


def load_image(path: str | Path, frame: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    """:func:`read_image` plus the file's :class:`ImageMeta` (display window, inversion)."""
    path = Path(path)
    if not path.is_file():
        raise DataError.of(str(path), "file", "not found" if not path.exists() else "is not a file")
    name = path.name.lower()
    try:
        dicom = _is_dicom(path)
        if frame and not dicom:
            raise DataError.of(str(path), "frame", f"no frame {frame}: the file holds one image (frame 0)")
        if dicom:
            image, meta = _read_dicom(path, frame)
        elif name.endswith(_NIFTI_SUFFIXES):
            image, meta = _read_nifti_2d(path), ImageMeta()
        elif name.endswith(".npy"):
            image, meta = np.load(path, allow_pickle=False), ImageMeta()
        else:
            image, meta = _read_raster(path), ImageMeta()
    except DataError:
        raise
    except Exception as err:  # every decoder has its own exception types
        raise DataError.of(str(path), "image", f"cannot read: {type(err).__name__}: {err}") from err
    return _check_shape(image, path), meta


def frame_count(path: str | Path) -> int:
    """How many 2D images ``path`` holds: ``NumberOfFrames`` of a multi-frame DICOM file, else 1.

    Reads only the DICOM header. A missing or unreadable file counts 1: reading it reports the problem.
    """
    path = Path(path)
    try:
        if not path.is_file() or not _is_dicom(path):
            return 1
        import pydicom

        return _frames(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"]))
    except Exception:  # pydicom raises several types for damaged files
        return 1


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


def _is_dicom(path: Path) -> bool:
    """Read as DICOM: a ``.dcm``/``.dicom`` name, or any name but a known image suffix with the ``DICM`` preamble."""
    name = path.name.lower()
    if name.endswith(_DICOM_SUFFIXES):
        return True
    if name.endswith((*_RASTER_SUFFIXES, *_NIFTI_SUFFIXES, ".npy")):
        return False
    return _has_dicom_preamble(path)


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
    if image.ndim == 3 and image.dtype.itemsize > 1 and _tiff_planar_configuration(data) == 2:
        raise DataError.of(
            str(path), "image", f"{image.dtype} colour samples stored in separate planes (TIFF PlanarConfiguration 2) "
            "are not decoded correctly by OpenCV; save the image with interleaved channels (e.g. "
            "tifffile.imwrite(path, rgb, planarconfig='contig')) or as .npy"
        )
    if image.ndim == 3 and image.shape[-1] in (3, 4):  # BGR(A) to RGB(A) for every pixel type (cvtColor has no float64)
        return np.ascontiguousarray(image[..., [2, 1, 0, 3][: image.shape[-1]]])
    return image


def _tiff_planar_configuration(data: np.ndarray) -> int:
    """PlanarConfiguration of the first image of a TIFF file's bytes: 2 for separate colour planes, else 1.

    1 (interleaved, the default) also for files that are not TIFF or whose first directory cannot be read.
    """
    raw = memoryview(data)  # the file's bytes, read in place (no copy)
    order = {b"II": "<", b"MM": ">"}.get(bytes(raw[:2]))
    if order is None:
        return 1
    try:
        version = struct.unpack_from(f"{order}H", raw, 2)[0]
        if version == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, value at byte 8
            (offset,) = struct.unpack_from(f"{order}I", raw, 4)
            (count,) = struct.unpack_from(f"{order}H", raw, offset)
            start, size, value = offset + 2, 12, 8
        elif version == 43:  # BigTIFF: 8-byte entry count, 20-byte entries, value at byte 12
            (offset,) = struct.unpack_from(f"{order}Q", raw, 8)
            (count,) = struct.unpack_from(f"{order}Q", raw, offset)
            start, size, value = offset + 8, 20, 12
        else:
            return 1
        for k in range(count):
            (tag,) = struct.unpack_from(f"{order}H", raw, start + k * size)
            if tag == _PLANAR_CONFIGURATION:
                return int(struct.unpack_from(f"{order}H", raw, start + k * size + value)[0])
    except struct.error:
        return 1
    return 1


def _frames(ds: Any) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _read_dicom(path: Path, frame: int | None) -> tuple[np.ndarray, ImageMeta]:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
    if "PixelData" not in ds:
        raise DataError.of(str(path), "PixelData", "the DICOM file has no pixel data")
    frames = _frames(ds)
    if frames > 1 and frame is None:
        raise DataError.of(
            str(path), "NumberOfFrames", f"multi-frame DICOM ({frames} frames) is not one 2D image: the readers "
            f"make one sample per frame; read one with read_image(path, frame=k), k in 0..{frames - 1}"
        )
    k = frame or 0
    if not 0 <= k < frames:
        raise DataError.of(str(path), "frame", f"no frame {k}: the file has {frames} (0..{frames - 1})")
    raw = _decode(path, ds, k if frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        image = apply_color_lut(raw, ds)  # palette indices to RGB (8 or 16 bits, as the palette stores them)
    elif raw.ndim == 2:
        image = apply_modality_lut(raw, _functional_group(ds, k, "PixelValueTransformationSequence") or ds)
    else:
        image = raw  # RGB; YBR_* colour was converted to RGB by pydicom
    if image.dtype.kind == "f":
        image = image.astype(np.float32)  # 16-bit values times the slope are exact in float32
    window = None
    voi = _functional_group(ds, k, "FrameVOILUTSequence") or ds
    center, width = voi.get("WindowCenter"), voi.get("WindowWidth")
    if center is not None and width is not None:
        first = [float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v) for v in (center, width)]
        window = (first[0], first[1])
    invert = photometric == "MONOCHROME1"
    return image, ImageMeta(window=window, invert=invert)


def _functional_group(ds: Any, frame: int, sequence: str) -> Any:
    """The item of ``sequence`` that applies to ``frame`` in an enhanced (multi-frame) DICOM file, or None.

    Enhanced CT/MR/... files keep the rescale (``PixelValueTransformationSequence``) and the window
    (``FrameVOILUTSequence``) in the per-frame functional groups, or in the shared ones for every frame.
    """
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def _decode(path: Path, ds: Any, frame: int | None) -> np.ndarray:
    """The decoded pixels of ``ds`` (read from ``path``): all of them, or only ``frame`` of a multi-frame file."""
    from pydicom.pixels import pixel_array

    try:
        if frame is None:
            return ds.pixel_array
        with path.open("rb") as f:
            return pixel_array(f, index=frame)  # reads and decodes this frame only
    except (RuntimeError, NotImplementedError) as err:
        problem = _decoder_problem(path, ds)
        if problem is None:
            raise
        raise problem from err


def _decoder_problem(path: Path, ds: Any) -> DataError | None:
    """The error for pixel data that no installed decoder can decode, or None when one can."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if not uid:
        return None
    uid = UID(str(uid))
    syntax = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return DataError.of(
            str(path), "PixelData", f"pydicom has no decoder for the transfer syntax {syntax}; "
            "convert the file to a supported syntax (e.g. uncompressed or JPEG 2000)"
        )
    if decoder.is_available:
        return None
    return DataError.of(
        str(path), "PixelData", f"cannot decode the transfer syntax {syntax}: no decoder for it is installed; "
        f"install the DICOM decoders with {DICOM_EXTRA}"
    )


def _read_nifti_2d(path: Path) -> np.ndarray:
    import nibabel as nib

    image = nib.load(path)
    shape = tuple(int(s) for s in image.shape)
    if sum(s > 1 for s in shape) > 2:
        raise DataError.of(
            str(path), "image", f"is a volume of shape {shape}: slice it with umedpt.data.readers.NiftiSliceDataset"
        )
    return np.asanyarray(image.dataobj).reshape([s for s in shape if s > 1] or [1, 1])
