"""DICOM files as users have them, on pydicom's own test files (pydicom and pydicom-data, no download).

Palette colour comes back as RGB, multi-frame files as one 2D image per frame (and one sample per
frame in the readers), compressed transfer syntaxes decode to pydicom's own values, and a missing
decoder is an error naming the file, the transfer syntax and the extra to install.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, JPEGLSLossless

from umedpt.data.readers import (
    DataError,
    ImageFolderDataset,
    ManifestDataset,
    SegmentationDataset,
    frame_count,
    load_image,
    read_image,
)


def _testdata(name: str) -> Path:
    """A file of pydicom's test data, never downloaded (pydicom-data, in the dev extra, ships most)."""
    path = get_testdata_file(name, download=False)
    if path is None or not Path(path).is_file():
        pytest.fail(f"pydicom test file {name} is not installed: pip install -e '.[dev]' brings pydicom-data")
    return Path(path)


def expected(ds: pydicom.Dataset, frame: int | None = None) -> np.ndarray:
    """What pydicom itself gives for a (frame of a) classic DICOM file: palette applied, else the modality LUT."""
    raw = ds.pixel_array if frame is None else ds.pixel_array[frame]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        return apply_color_lut(raw, ds)
    return apply_modality_lut(raw, ds) if raw.ndim == 2 else raw


# ------------------------------------------------------------------ palette colour
@pytest.mark.parametrize(
    ("name", "dtype"),
    [("OBXXXX1A.dcm", np.uint16), ("gdcm-US-ALOKA-16.dcm", np.uint16), ("examples_palette.dcm", np.uint16)],
)
def test_palette_color_is_read_as_rgb(name, dtype):
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.pixel_array.ndim == 2  # stored: indices
    image, meta = load_image(path)
    assert image.shape == (ds.Rows, ds.Columns, 3) and image.dtype == dtype
    np.testing.assert_array_equal(image, apply_color_lut(ds.pixel_array, ds))
    assert (image[..., 0] != image[..., 2]).any()  # colour, not the grey palette indices
    assert meta.window is None and not meta.invert


# ------------------------------------------------------------------ multi-frame
@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("emri_small.dcm", 1),                     # enhanced MR, 10 frames
        ("SC_rgb_2frame.dcm", 3),                  # RGB, 2 frames
        ("SC_rgb_rle_2frame.dcm", 3),              # RGB, RLE
        ("examples_ybr_color.dcm", 3),             # ultrasound, YBR_FULL_422 JPEG baseline, 30 frames
        ("OBXXXX1A_2frame.dcm", 3),                # ultrasound, palette colour, 2 frames
        ("OBXXXX1A_rle_2frame.dcm", 3),            # palette colour, RLE
        ("emri_small_jpeg_2k_lossless.dcm", 1),
        ("emri_small_jpeg_ls_lossless.dcm", 1),
        ("emri_small_RLE.dcm", 1),
    ],
)
def test_multiframe_frames_are_2d_images(name, channels):
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    frames = int(ds.NumberOfFrames)
    assert frames > 1 and frame_count(path) == frames
    for k in sorted({0, 1, frames - 1}):
        image = read_image(path, frame=k)
        np.testing.assert_array_equal(image, expected(ds, k))
        assert image.shape == ((ds.Rows, ds.Columns, 3) if channels == 3 else (ds.Rows, ds.Columns))
    assert not np.array_equal(read_image(path, frame=0), read_image(path, frame=frames - 1))
    with pytest.raises(DataError, match=rf"{name}: NumberOfFrames: multi-frame DICOM \({frames} frames\).*frame=k"):
        read_image(path)
    with pytest.raises(DataError, match=rf"{name}: frame: no frame {frames}: the file has {frames}"):
        read_image(path, frame=frames)


def test_ybr_frames_are_converted_to_rgb():
    path = _testdata("examples_ybr_color.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "YBR_FULL_422"
    ybr = pixel_array(path, index=4, raw=True)  # the stored colour space
    rgb = read_image(path, frame=4)
    assert not np.array_equal(rgb, ybr)
    np.testing.assert_array_equal(rgb, pydicom.pixels.convert_color_space(ybr, "YBR_FULL", "RGB"))


def test_enhanced_ct_rescale_and_window_from_functional_groups():
    path = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds  # enhanced: in the functional groups
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale, window = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    assert float(rescale.RescaleIntercept) == -1024.0
    for k in range(int(ds.NumberOfFrames)):
        hu, meta = load_image(path, frame=k)
        stored = ds.pixel_array[k].astype(np.float64)
        np.testing.assert_array_equal(hu, stored * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept))
        assert hu.dtype == np.float32 and hu.min() == -1024.0  # air in Hounsfield units
        assert meta.window == (float(window.WindowCenter), float(window.WindowWidth)) == (49.0, 102.0)


def test_frame_of_a_single_image_file(tmp_path):
    ct = _testdata("CT_small.dcm")
    assert frame_count(ct) == 1
    np.testing.assert_array_equal(read_image(ct, frame=0), read_image(ct))
    with pytest.raises(DataError, match=r"CT_small\.dcm: frame: no frame 1: the file has 1"):
        read_image(ct, frame=1)
    png = tmp_path / "grey.png"
    cv2.imwrite(str(png), np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert frame_count(png) == 1 and read_image(png, frame=0).shape == (8, 8)
    with pytest.raises(DataError, match=r"grey\.png: frame: no frame 2: the file holds one image"):
        read_image(png, frame=2)
    assert frame_count(tmp_path / "missing.dcm") == 1  # reading it reports the missing file


# ------------------------------------------------------------------ compressed transfer syntaxes
@pytest.mark.parametrize(
    ("name", "twin"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", None),                  # JPEG Baseline, YBR_FULL (lossy)
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),           # JPEG Lossless SV1
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),         # JPEG Lossless SV1, 8-bit grey
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS Lossless
        ("JPEGLSNearLossless_16.dcm", None),              # JPEG-LS Near-Lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),    # JPEG 2000 Lossless
        ("693_J2KR.dcm", "693_UNCR.dcm"),                 # JPEG 2000 Lossless, CT with rescale
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),             # JPEG 2000
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),                 # JPEG 2000, YBR_RCT to RGB
        ("MR_small_RLE.dcm", "MR_small.dcm"),             # RLE Lossless
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),                 # RLE, RGB
        ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),             # RLE, palette colour
    ],
)
def test_compressed_syntaxes_decode_like_pydicom(name, twin):
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    image = read_image(path)
    np.testing.assert_array_equal(image, expected(ds).astype(image.dtype))
    if twin is not None:  # lossless: the same values as the uncompressed file
        np.testing.assert_array_equal(image, read_image(_testdata(twin)))


def test_lossy_jpeg_baseline_is_close_to_the_original():
    jpeg, original = read_image(_testdata("SC_rgb_jpeg_dcmtk.dcm")), read_image(_testdata("SC_rgb.dcm"))
    assert jpeg.shape == original.shape == (100, 100, 3)
    assert np.abs(jpeg.astype(np.float64) - original).mean() < 2  # RGB, not YBR


@pytest.mark.parametrize(("name", "frame"), [("MR_small_jp2klossless.dcm", None), ("emri_small_jpeg_2k_lossless.dcm", 3)])
def test_missing_decoder_names_file_syntax_and_extra(monkeypatch, name, frame):
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as without pylibjpeg-openjpeg and Pillow's JPEG 2000
    path = _testdata(name)
    with pytest.raises(DataError) as info:
        read_image(path, frame=frame)
    message = str(info.value)
    assert message.startswith(f"{path}: PixelData: cannot decode the transfer syntax ")
    assert "JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)" in message
    assert message.endswith("install the DICOM decoders with pip install 'umedpt[dicom]'")
    assert isinstance(info.value.__cause__, RuntimeError) and "missing dependencies" in str(info.value.__cause__)


def test_missing_decoder_in_a_reader_and_the_checker(monkeypatch, tmp_path):
    shutil.copy(_testdata("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "scan.dcm")
    (tmp_path / "labels.csv").write_text("path,split,label\nscan.dcm,train,0\n")
    dataset = ManifestDataset(str(tmp_path / "labels.csv"), num_classes=2, image_size=None)
    monkeypatch.setattr(get_decoder(JPEGLSLossless), "_available", {})
    with pytest.raises(DataError, match=r"scan\.dcm: PixelData: .*JPEG-LS Lossless.*pip install 'umedpt\[dicom\]'"):
        dataset[0]
    (problem,) = dataset.inspect(0).problems
    assert problem.field == "PixelData" and "pip install 'umedpt[dicom]'" in problem.message


def test_transfer_syntax_without_any_decoder(tmp_path):
    ds = pydicom.dcmread(_testdata("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # video: pydicom decodes none
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(DataError) as info:
        read_image(tmp_path / "video.dcm")
    assert str(info.value) == (
        f"{tmp_path / 'video.dcm'}: PixelData: pydicom has no decoder for the transfer syntax "
        f"MPEG2 Main Profile / Main Level ({MPEG2MPML}); convert the file to a supported syntax "
        "(e.g. uncompressed or JPEG 2000)"
    )
    assert isinstance(info.value.__cause__, NotImplementedError)


# ------------------------------------------------------------------ readers: one sample per frame
def test_manifest_reader_makes_one_sample_per_frame(tmp_path):
    files = {"cine.dcm": "emri_small.dcm", "rgb.dcm": "SC_rgb_2frame.dcm", "ct.dcm": "CT_small.dcm"}
    for mine, theirs in files.items():
        shutil.copy(_testdata(theirs), tmp_path / mine)
    rows = [("cine.dcm", "train", "1"), ("rgb.dcm", "train", "0"), ("ct.dcm", "train", "0"), ("ct.dcm", "val", "1")]
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "split", "label"), *rows])
    train = ManifestDataset(str(tmp_path / "labels.csv"), image_size=32, normalize="percentile")
    assert len(train) == 10 + 2 + 1
    assert [item.frame for item in train.items] == [*range(10), 0, 1, None]
    assert [item.label for item in train.items] == [1] * 10 + [0, 0, 0]
    assert train.source(3) == f"{tmp_path / 'cine.dcm'} [frame 3]" and train.items[3].where == "labels.csv line 2 frame 3"
    assert train.source(12) == str(tmp_path / "ct.dcm")
    for i, (name, k) in enumerate([("cine.dcm", 0), ("cine.dcm", 9), ("rgb.dcm", 1)]):
        index = [0, 9, 11][i]
        np.testing.assert_array_equal(train.raw(index).image, read_image(tmp_path / name, frame=k))
    case = train[11]
    assert case["image"].shape == (3, 32, 32) and case["image"].dtype == torch.float32 and case["label"] == 0
    assert not torch.equal(train[0]["image"], train[9]["image"])
    assert len(ManifestDataset(str(tmp_path / "labels.csv"), split="val", image_size=None)) == 1


def test_image_folder_reader_makes_one_sample_per_frame(tmp_path):
    for cls, name in (("palette", "OBXXXX1A_2frame.dcm"), ("grey", "MR_small.dcm")):
        (tmp_path / "train" / cls).mkdir(parents=True)
        shutil.copy(_testdata(name), tmp_path / "train" / cls / name)
    folder = ImageFolderDataset(str(tmp_path), image_size=None)
    assert folder.class_names == ["grey", "palette"] and len(folder) == 3
    assert [(item.label, item.frame) for item in folder.items] == [(0, None), (1, 0), (1, 1)]
    path = tmp_path / "train" / "palette" / "OBXXXX1A_2frame.dcm"
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(folder.raw(2).image, apply_color_lut(ds.pixel_array[1], ds))
    assert folder.source(2) == f"{path} [frame 1]" and folder.items[2].where == f"{path} [frame 1]"


def test_segmentation_multiframe_image_with_multiframe_mask(tmp_path):
    image_dir, mask_dir = tmp_path / "images" / "train", tmp_path / "masks" / "train"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    shutil.copy(_testdata("emri_small.dcm"), image_dir / "cine.dcm")
    ds = pydicom.dcmread(image_dir / "cine.dcm")
    labels = (ds.pixel_array > 100).astype(np.uint16) + (ds.pixel_array > 300)  # (10, 64, 64), classes 0..2
    ds.set_pixel_data(labels, "MONOCHROME2", 8)
    ds.save_as(mask_dir / "cine.dcm")
    seg = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=3, image_size=None)
    assert len(seg) == 10 and [item.frame for item in seg.items] == list(range(10))
    for k in (0, 4, 9):
        sample = seg.raw(k)
        np.testing.assert_array_equal(sample.image, read_image(image_dir / "cine.dcm", frame=k))
        np.testing.assert_array_equal(sample.mask, labels[k])
    assert seg.mask_source(4) == f"{mask_dir / 'cine.dcm'} [frame 4]"
    assert torch.equal(seg[4]["mask"], torch.from_numpy(labels[4].astype(np.int64)))


def test_segmentation_multiframe_image_with_a_2d_mask_is_an_error(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    shutil.copy(_testdata("emri_small.dcm"), tmp_path / "images" / "train" / "cine.dcm")
    cv2.imwrite(str(tmp_path / "masks" / "train" / "cine.png"), np.zeros((64, 64), np.uint8))
    seg = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2, image_size=None)
    assert len(seg) == 10
    mask = tmp_path / "masks" / "train" / "cine.png"
    with pytest.raises(DataError) as info:
        seg.raw(2)
    assert str(info.value) == (
        f"{mask} [frame 2]: mask: has 1 frame(s) but the image {tmp_path / 'images' / 'train' / 'cine.dcm'} has 10: "
        "the mask of a multi-frame image must be a multi-frame DICOM file with one frame per image frame"
    )
