"""Readers on real files that packages ship: scikit-image's fundus, immunohistochemistry and grey
micrographs, nilearn's MNI152 T1 template and a statistical map stored in LAS orientation.

Nothing is downloaded: the files are looked up inside the installed packages (the ``dev`` extra
pins scikit-image and nilearn) and each test is skipped when a file is not there.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from umedpt.data.check import main as check_main
from umedpt.data.readers import (
    DataError,
    ImageFolderDataset,
    ManifestDataset,
    NiftiSliceDataset,
    SegmentationDataset,
    read_image,
)

#: the default standardisation of every reader: (x - 0.5) / 0.25 of the [0, 1] image
MEAN, STD = 0.5, 0.25
SIZE = 48
MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
STAT_MAP = "image_10426.nii.gz"  # a float32 statistical map stored as LAS


def bundled(package: str, *parts: str) -> Path:
    """A file inside an installed package (found without importing it), or skip the test."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        pytest.skip(f"{package} does not ship {'/'.join(parts)}")
    return path


def skimage_file(name: str) -> Path:
    return bundled("skimage", "data", name)


def nilearn_file(name: str) -> Path:
    return bundled("nilearn", "datasets", "data", name)


def decoded(path: Path) -> np.ndarray:
    """The file's pixels as OpenCV decodes them (RGB order), checked against imageio's decoder."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(image, iio.imread(path))
    return image


def expected_case(pixels: np.ndarray, size: int) -> np.ndarray:
    """(3, size, size) input of a uint8 image: /255, area resize, grey repeated, standardised."""
    unit = cv2.resize(pixels.astype(np.float32) / 255, (size, size), interpolation=cv2.INTER_AREA)
    if unit.ndim == 2:
        unit = np.repeat(unit[..., None], 3, axis=-1)
    return ((unit - MEAN) / STD).transpose(2, 0, 1)


def run_check(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """``umedpt data check -c config --json``: the exit status and the report."""
    code = check_main(["check", "-c", str(config), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def write_config(path: Path, *tasks: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"model": {"tasks": list(tasks)}, "data": {"dataset_defaults": {"image_size": SIZE}}}))
    return path


def task(name: str, kind: str, num_classes: int, reader: str, /, **init_args: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "num_classes": num_classes, "batch_size": 1,
            "data": {"class_path": f"umedpt.data.readers.{reader}", "init_args": init_args}}


# ------------------------------------------------------------------ scikit-image: folders and manifests
#: (split, class, file) of the image folder
FOLDER = [
    ("train", "fundus", "retina.jpg"),      # RGB JPEG, 1411 x 1411
    ("train", "histology", "ihc.png"),      # RGB PNG, immunohistochemistry
    ("train", "grey", "cell.png"),          # grey PNG, 660 x 550 (not square)
    ("val", "grey", "camera.png"),          # grey PNG
]


def image_folder(root: Path) -> Path:
    for split, label, name in FOLDER:
        (root / split / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(skimage_file(name), root / split / label / name)
    return root


def test_image_folder_reads_the_stored_pixels_and_makes_standardised_cases(tmp_path):
    root = image_folder(tmp_path / "photos")
    train = ImageFolderDataset(str(root), image_size=SIZE)
    assert train.class_names == ["fundus", "grey", "histology"] and len(train) == 3
    files = {Path(item.image).name: (i, item.label) for i, item in enumerate(train.items)}
    assert {name: label for name, (_, label) in files.items()} == {"retina.jpg": 0, "cell.png": 1, "ihc.png": 2}
    channels = {"retina.jpg": 3, "ihc.png": 3, "cell.png": 1}
    for name, (i, label) in files.items():
        pixels = decoded(Path(train.items[i].image))
        raw = train.raw(i).image
        assert raw.dtype == np.uint8 and raw.shape == pixels.shape
        assert (raw.shape[2] if raw.ndim == 3 else 1) == channels[name]
        np.testing.assert_array_equal(raw, pixels)
        case = train[i]
        assert case["label"] == label and case["image"].dtype == torch.float32
        assert case["image"].shape == (3, SIZE, SIZE) and torch.isfinite(case["image"]).all()
        np.testing.assert_allclose(case["image"].numpy(), expected_case(pixels, SIZE), rtol=0, atol=1e-5)
    assert train.raw(files["cell.png"][0]).image.shape == (660, 550)
    # channel order: a fundus photograph is red, its blue channel dark (a BGR mix-up swaps them)
    fundus = train.raw(files["retina.jpg"][0]).image.reshape(-1, 3).mean(axis=0)
    assert fundus[0] > 2 * fundus[2]
    case = train[files["retina.jpg"][0]]["image"]
    assert case[0].mean() > case[2].mean()
    val = ImageFolderDataset(str(root), split="val", image_size=SIZE)
    assert [(Path(item.image).name, item.label) for item in val.items] == [("camera.png", 1)]
    grey = val[0]["image"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])  # grey repeated to 3 channels


def test_rgb_files_become_luminance_for_one_channel_tasks(tmp_path):
    root = image_folder(tmp_path / "photos")
    train = ImageFolderDataset(str(root), image_size=None, channels=1)
    for i, item in enumerate(train.items):
        pixels = decoded(Path(item.image))
        grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels
        image = train[i]["image"]
        assert image.shape == (1, *pixels.shape[:2])  # image_size None keeps the stored size
        np.testing.assert_allclose(image[0].numpy() * STD + MEAN, grey / 255, rtol=0, atol=1 / 255)


MANIFEST = [  # path, split, colour, microscopy
    ("fundus rétine/retina.jpg", "train", "1", "0"),
    ("ihc.png", "train", "1", "1"),
    ("cell.png", "validation", "0", "1"),
    ("camera.png", "test", "0", "0"),
]


def manifest(root: Path) -> Path:
    for path, *_ in MANIFEST:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(skimage_file(Path(path).name), root / path)
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "split", "colour", "microscopy"), *MANIFEST])
    return root / "labels.csv"


def test_manifest_reads_labels_and_pixels_of_real_files(tmp_path):
    file = manifest(tmp_path)
    splits = {}
    for split in ("train", "val", "test"):
        ds = ManifestDataset(str(file), split=split, kind="multilabel", label_column=["colour", "microscopy"],
                             image_size=SIZE, resize="letterbox")
        assert ds.class_names == ["colour", "microscopy"]
        splits[split] = ds
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    rows = [(splits["train"], 0), (splits["train"], 1), (splits["val"], 0), (splits["test"], 0)]
    for (ds, i), (path, _, colour, microscopy) in zip(rows, MANIFEST, strict=True):
        assert ds.items[i].image == str(tmp_path / path)  # relative to the manifest, non-ASCII folder included
        np.testing.assert_array_equal(ds.raw(i).image, decoded(tmp_path / path))
        case = ds[i]
        assert case["label"].tolist() == [float(colour), float(microscopy)]
        assert case["image"].shape == (3, SIZE, SIZE) and torch.isfinite(case["image"]).all()
        assert case["image"].min() >= -MEAN / STD and case["image"].max() <= (1 - MEAN) / STD
    # letterbox keeps the aspect ratio of the 660 x 550 cell image: the padded columns are 0 before standardising
    cell = splits["val"][0]["image"][0].numpy() * STD + MEAN
    width = round(SIZE * 550 / 660)
    pad = (SIZE - width) // 2
    assert (cell[:, :pad] == 0).all() and (cell[:, pad + width:] == 0).all() and cell[:, pad:pad + width].max() > 0.5


# ------------------------------------------------------------------ scikit-image: segmentation pairs
def classes_by_threshold(grey: np.ndarray) -> np.ndarray:
    """Three classes of a grey image by its terciles: 0 dark, 1 middle, 2 bright (uint8)."""
    low, high = np.percentile(grey, (100 / 3, 200 / 3))
    return ((grey > low).astype(np.uint8) + (grey > high)).astype(np.uint8)


def segmentation_pairs(root: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """camera.png (train) with a 0/1/2 class-index mask and cell.png (val) with a 0/255 binary mask."""
    pairs = {}
    for split, name in (("train", "camera"), ("val", "cell")):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        image = root / "images" / split / f"{name}.png"
        shutil.copy(skimage_file(f"{name}.png"), image)
        classes = classes_by_threshold(decoded(image))
        if split == "val":  # foreground 255, as annotation tools save binary masks
            classes = np.where(classes > 0, 255, 0).astype(np.uint8)
        assert cv2.imwrite(str(root / "masks" / split / f"{name}_mask.png"), classes)
        pairs[split] = (image, classes)
    return pairs


def test_segmentation_pairs_a_real_image_with_its_thresholded_mask(tmp_path):
    pairs = segmentation_pairs(tmp_path)
    values = {0: 0, 1: 1, 2: 2, 255: 1}
    for split, (image, stored) in pairs.items():
        ds = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), split=split, num_classes=3,
                                 mask_suffix="_mask", mask_values=values, image_size=None)
        assert len(ds) == 1 and ds.items[0].mask == str(tmp_path / "masks" / split / f"{image.stem}_mask.png")
        classes = np.vectorize(values.get)(stored)
        assert set(np.unique(classes)) == ({0, 1, 2} if split == "train" else {0, 1})
        sample = ds.raw(0)
        np.testing.assert_array_equal(sample.image, decoded(image))
        np.testing.assert_array_equal(sample.mask, classes)
        case = ds[0]  # image_size None: the stored size, mask exactly the classes
        assert case["image"].shape == (3, *stored.shape) and torch.isfinite(case["image"]).all()
        assert case["mask"].dtype == torch.int64 and torch.equal(case["mask"], torch.from_numpy(classes.astype(np.int64)))
        sized = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), split=split, num_classes=3,
                                    mask_suffix="_mask", mask_values=values, image_size=SIZE)[0]
        assert sized["image"].shape == (3, SIZE, SIZE) and sized["mask"].shape == (SIZE, SIZE)
        assert torch.isfinite(sized["image"]).all() and set(sized["mask"].unique().tolist()) <= {0, 1, 2}


def test_data_check_finds_no_error_in_the_real_files(tmp_path, capsys):
    photos = image_folder(tmp_path / "photos")
    labels = manifest(tmp_path / "table")
    pairs = segmentation_pairs(tmp_path / "seg")
    config = write_config(
        tmp_path / "real.yaml",
        task("photos", "classification", 3, "ImageFolderDataset", root=str(photos)),
        task("findings", "multilabel", 2, "ManifestDataset", manifest=str(labels), kind="multilabel",
             label_column=["colour", "microscopy"]),
        task("regions", "segmentation", 3, "SegmentationDataset", images=str(tmp_path / "seg" / "images"),
             masks=str(tmp_path / "seg" / "masks"), num_classes=3, mask_suffix="_mask",
             mask_values={0: 0, 1: 1, 2: 2, 255: 1}),
    )
    code, report = run_check(capsys, config, "--splits", "train", "val")
    assert code == 0 and report["ok"] and report["errors"] == 0 and report["warnings"] == 0, report
    tasks = {t["name"]: t for t in report["tasks"]}
    train = tasks["photos"]["splits"]["train"]
    assert train["count"] == 3 and train["class_counts"] == [1, 1, 1]
    assert train["sizes"] == {"1411x1411": 1, "512x512": 1, "660x550": 1}
    assert train["channels"] == {"3": 2, "1": 1} and train["dtypes"] == {"uint8": 3}
    low = min(int(decoded(skimage_file(n)).min()) for _, _, n in FOLDER[:3])
    high = max(int(decoded(skimage_file(n)).max()) for _, _, n in FOLDER[:3])
    assert train["value_range"] == [low, high]
    assert tasks["findings"]["splits"]["train"]["class_counts"] == [2, 1]
    assert tasks["findings"]["splits"]["val"]["class_counts"] == [0, 1]
    for split, (_, stored) in pairs.items():
        classes = np.where(stored == 255, 1, stored)
        summary = tasks["regions"]["splits"][split]
        assert summary["class_counts"] == np.bincount(classes.ravel(), minlength=3).tolist()
        assert summary["sizes"] == {f"{stored.shape[0]}x{stored.shape[1]}": 1}


# ------------------------------------------------------------------ TIFF colour layouts
def test_float64_rgb_tiff_is_read_in_rgb_order(tmp_path):
    rgb = np.random.default_rng(0).random((9, 7, 3))
    assert cv2.imwrite(str(tmp_path / "float.tif"), np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV writes BGR
    image = read_image(tmp_path / "float.tif")
    assert image.dtype == np.float64
    np.testing.assert_array_equal(image, rgb)


def test_planar_colour_tiff_is_an_error_naming_the_layout():
    path = skimage_file("multipage_rgb.tif")  # float64 RGB, each channel stored as its own plane
    with pytest.raises(DataError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: image: float64 colour samples stored in separate planes "
                                      "(TIFF PlanarConfiguration 2)")
    assert "planarconfig='contig'" in str(info.value)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize(("bigtiff", "byteorder"), [(False, "<"), (True, ">")])
def test_planar_tiff_layouts_are_read_exactly_or_refused(tmp_path, dtype, bigtiff, byteorder):
    tifffile = pytest.importorskip("tifffile")  # scikit-image's TIFF writer (dev extra)
    rgb = (np.random.default_rng(1).random((20, 30, 3)) * 250).astype(dtype)
    for planar in ("contig", "separate"):
        path = tmp_path / f"{planar}.tif"
        data = rgb if planar == "contig" else rgb.transpose(2, 0, 1)
        tifffile.imwrite(path, data, photometric="rgb", planarconfig=planar, bigtiff=bigtiff, byteorder=byteorder)
        if planar == "separate" and rgb.dtype.itemsize > 1:  # OpenCV would return mixed-up samples
            with pytest.raises(DataError, match=r"separate planes \(TIFF PlanarConfiguration 2\)"):
                read_image(path)
        else:
            image = read_image(path)
            assert image.dtype == rgb.dtype
            np.testing.assert_array_equal(image, rgb)


# ------------------------------------------------------------------ nilearn: NIfTI volumes
def mni_layout(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template with labels 0 background, 1 grey matter, 2 white matter from nilearn's maps."""
    t1 = nib.load(nilearn_file(MNI_T1))
    gm = np.asanyarray(nib.load(nilearn_file(MNI_GM)).dataobj)
    wm = np.asanyarray(nib.load(nilearn_file(MNI_WM)).dataobj)
    labels = np.where(np.maximum(gm, wm) > 127, 1 + (wm > gm), 0).astype(np.uint8)
    for folder in ("images/train", "labels/train"):
        (root / folder).mkdir(parents=True)
    shutil.copy(nilearn_file(MNI_T1), root / "images" / "train" / "mni.nii.gz")
    nib.save(nib.Nifti1Image(labels, t1.affine), root / "labels" / "train" / "mni.nii.gz")
    return np.asanyarray(t1.dataobj), labels


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mni_template_slices_are_the_voxels(tmp_path, axis):
    voxels, labels = mni_layout(tmp_path)
    assert voxels.shape == (197, 233, 189) and voxels.dtype == np.uint8  # RAS, so canonical = stored axes
    ds = NiftiSliceDataset(str(tmp_path / "images"), str(tmp_path / "labels"), num_classes=3, axis=axis,
                           image_size=SIZE)
    assert len(ds) == voxels.shape[axis] and ds.slices == list(range(voxels.shape[axis]))
    middle = voxels.shape[axis] // 2
    for k in (0, middle, voxels.shape[axis] - 1):
        sample = ds.raw(k)
        assert sample.image.dtype == np.uint8
        np.testing.assert_array_equal(sample.image, np.take(voxels, k, axis=axis))
        np.testing.assert_array_equal(sample.mask, np.take(labels, k, axis=axis))
        case = ds[k]
        assert case["image"].shape == (3, SIZE, SIZE) and torch.isfinite(case["image"]).all()
        assert case["mask"].shape == (SIZE, SIZE) and set(case["mask"].unique().tolist()) <= {0, 1, 2}
    brain = ds[middle]
    assert set(brain["mask"].unique().tolist()) == {0, 1, 2}  # grey and white matter in the middle slice
    np.testing.assert_allclose(brain["image"][0].numpy(),
                               (cv2.resize(np.take(voxels, middle, axis=axis).astype(np.float32) / 255, (SIZE, SIZE),
                                           interpolation=cv2.INTER_AREA) - MEAN) / STD, rtol=0, atol=1e-5)


def test_reoriented_template_gives_the_same_canonical_slices(tmp_path):
    voxels, _ = mni_layout(tmp_path)
    t1 = nib.load(tmp_path / "images" / "train" / "mni.nii.gz")
    target = nib.orientations.axcodes2ornt(("S", "L", "P"))  # axial last -> first, left-right and front-back flipped
    stored = t1.as_reoriented(nib.orientations.ornt_transform(nib.orientations.io_orientation(t1.affine), target))
    assert nib.aff2axcodes(stored.affine) == ("S", "L", "P") and stored.shape == (189, 197, 233)
    for folder in ("images/train", "labels/train"):
        (tmp_path / "slp" / folder).mkdir(parents=True)
    nib.save(stored, tmp_path / "slp" / "images" / "train" / "mni.nii")  # uncompressed: read slice by slice
    nib.save(nib.Nifti1Image(np.zeros(stored.shape, np.uint8), stored.affine),
             tmp_path / "slp" / "labels" / "train" / "mni.nii")
    for axis in (0, 1, 2):
        ds = NiftiSliceDataset(str(tmp_path / "slp" / "images"), str(tmp_path / "slp" / "labels"), num_classes=1,
                               axis=axis, image_size=None)
        assert len(ds) == voxels.shape[axis]
        for k in (voxels.shape[axis] // 3, voxels.shape[axis] // 2):
            np.testing.assert_array_equal(ds.raw(k).image, np.take(voxels, k, axis=axis))
    stored_axial = np.asanyarray(stored.dataobj)[voxels.shape[2] // 2]
    assert not np.array_equal(stored_axial, voxels[..., voxels.shape[2] // 2])  # what canonical=False would cut


def test_las_statistical_map_is_sliced_in_ras_order(tmp_path):
    path = nilearn_file(STAT_MAP)
    stat = nib.load(path)
    assert nib.aff2axcodes(stat.affine) == ("L", "A", "S")
    canonical = nib.as_closest_canonical(stat).get_fdata(dtype=np.float32)
    stored = np.asanyarray(stat.dataobj)
    assert np.array_equal(canonical, stored[::-1]) and not np.array_equal(canonical, stored)
    labels = ((stored > 3) + 2 * (stored < -3)).astype(np.uint8)  # positive and negative clusters
    nib.save(nib.Nifti1Image(labels, stat.affine), tmp_path / "labels.nii.gz")
    (tmp_path / "maps.csv").write_text(f"image,mask,split\n{path},labels.nii.gz,train\n")
    ds = NiftiSliceDataset(manifest=str(tmp_path / "maps.csv"), num_classes=3, axis=0, image_size=SIZE)
    assert len(ds) == stat.shape[0]
    for k in (0, 20, stat.shape[0] - 1):
        sample = ds.raw(k)
        assert sample.image.dtype == np.float32
        np.testing.assert_array_equal(sample.image, canonical[k])  # slice 0 is the leftmost, stored last
        np.testing.assert_array_equal(sample.mask, labels[::-1][k])
        assert torch.isfinite(ds[k]["image"]).all() and ds[k]["image"].shape == (3, SIZE, SIZE)


def test_data_check_of_the_mni_template(tmp_path, capsys):
    voxels, labels = mni_layout(tmp_path)
    config = write_config(
        tmp_path / "mni.yaml",
        task("tissue", "segmentation", 3, "NiftiSliceDataset", images=str(tmp_path / "images"),
             masks=str(tmp_path / "labels"), num_classes=3, axis=2, normalize="percentile"),
    )
    code, report = run_check(capsys, config, "--splits", "train")
    assert code == 0 and report["errors"] == 0, report
    (tissue,) = report["tasks"]
    summary = tissue["splits"]["train"]
    assert summary["count"] == 189 and summary["sizes"] == {"197x233": 189} and summary["dtypes"] == {"uint8": 189}
    assert summary["value_range"] == [int(voxels.min()), int(voxels.max())]
    assert summary["class_counts"] == np.bincount(labels.ravel(), minlength=3).tolist()
    # the only warnings: empty slices above the head hold the same (zero) pixels
    empty = [k for k in range(189) if not voxels[..., k].any()]
    assert report["warnings"] == max(len(empty) - 1, 0)
    assert all("same pixels as" in p["message"] for p in tissue["problems"])
