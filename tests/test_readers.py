"""Readers of real formats: exact label and pixel round trips, full depth, clear errors, training on them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from pydicom.data import get_testdata_file

from tests.conftest import TINY_ENCODER
from umedpt.data import MultiTaskDataModule, TaskDataError
from umedpt.data.normalize import ImageMeta, Normalization
from umedpt.data.readers import (
    CocoDetectionDataset,
    DataError,
    ImageFolderDataset,
    ManifestDataset,
    MedMNISTDataset,
    NiftiSliceDataset,
    SegmentationDataset,
    load_image,
    read_image,
)
from umedpt.data.readers.volume import volume_slice
from umedpt.tasks import Task

pytest_plugins = ["tests.data"]  # the data_files session fixture

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------ read_image
@pytest.mark.parametrize(
    ("suffix", "array"),
    [
        (".png", np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)),
        (".png", np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)),
        (".png", np.random.default_rng(1).integers(0, 256, (12, 10, 4), dtype=np.uint8)),
        (".png", np.arange(120, dtype=np.uint16).reshape(12, 10) * 541 + 3),
        (".tif", np.arange(120, dtype=np.uint16).reshape(12, 10) * 541 + 1),
        (".tif", np.linspace(-1000, 3000, 120, dtype=np.float32).reshape(12, 10)),
        (".npy", np.linspace(-1, 1, 120, dtype=np.float64).reshape(12, 10)),
        (".npy", np.arange(360, dtype=np.int32).reshape(12, 10, 3) - 100),
    ],
)
def test_read_image_returns_stored_values_exactly(tmp_path, suffix, array):
    path = tmp_path / f"image{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    else:
        order = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}
        stored = cv2.cvtColor(array, order[array.shape[-1]]) if array.ndim == 3 else array
        assert cv2.imwrite(str(path), stored)
    image = read_image(path)
    assert image.dtype == array.dtype
    np.testing.assert_array_equal(image, array)  # RGB order, every bit of depth


def test_read_image_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(DataError, match=r"missing\.png: file: not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png: image: cannot decode"):
        read_image(tmp_path / "bad.png")
    np.save(tmp_path / "volume.npy", np.zeros((4, 5, 6, 7)))
    with pytest.raises(DataError, match=r"volume\.npy: image: shape \(4, 5, 6, 7\) is not a 2D image"):
        read_image(tmp_path / "volume.npy")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "vol.nii")
    with pytest.raises(DataError, match=r"vol\.nii: image: is a volume .*NiftiSliceDataset"):
        read_image(tmp_path / "vol.nii")


def _bundled_dicom(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None or not Path(path).is_file():
        pytest.skip(f"pydicom does not bundle {name}")
    return Path(path)


def test_dicom_rescale_and_window():
    import pydicom

    ct = _bundled_dicom("CT_small.dcm")
    ds = pydicom.dcmread(ct)
    hu = read_image(ct)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, expected)  # exact Hounsfield units
    mr, meta = load_image(_bundled_dicom("MR_small.dcm"))
    assert mr.dtype == np.int16 and meta == ImageMeta(window=(600.0, 1600.0), invert=False)
    unit = Normalization.from_spec("window").to_unit(mr, meta)  # the file's own window
    np.testing.assert_allclose(unit, np.clip((mr - (600 - 800)) / 1600, 0, 1), rtol=0, atol=1e-6)


def test_dicom_manifest_reader(data_files):
    truth = data_files["dicom"]["truth"]
    train = ManifestDataset(str(data_files["dicom"]["manifest"]), image_size=None, normalize="bone")
    assert train.class_names == ["0", "1"] and len(train) == 4
    for i, case in enumerate(truth[:4]):
        np.testing.assert_array_equal(train.raw(i).image, case["hu"])
        assert train[i]["label"] == case["label"]
    val = ManifestDataset(str(data_files["dicom"]["manifest"]), split="val", image_size=None)
    assert Path(val.items[1].image).suffix == ""  # found by its DICM preamble
    np.testing.assert_array_equal(val.raw(1).image, truth[5]["hu"])
    test = ManifestDataset(str(data_files["dicom"]["manifest"]), split="test", image_size=None)
    sample = test.raw(0)  # MONOCHROME1 with its own window: bright where the values are low
    assert sample.meta.invert and sample.meta.window == (500.0, 1000.0)
    unit = test.normalization.to_unit(sample.image, sample.meta)
    low, high = np.unravel_index(sample.image.argmin(), unit.shape), np.unravel_index(sample.image.argmax(), unit.shape)
    assert unit[low] == 1.0 and unit[high] == 0.0


# ------------------------------------------------------------------ MedMNIST
def test_medmnist_round_trips_labels(data_files):
    files = data_files["medmnist"]
    for split in SPLITS:
        multiclass = MedMNISTDataset(str(files["multiclass"]), split=split, image_size=32)
        labels = files["labels"]["multiclass"][f"{split}_labels"][:, 0]
        assert multiclass.kind == "classification" and multiclass.num_classes == 3
        assert [multiclass[i]["label"] for i in range(len(multiclass))] == labels.tolist()
        case = multiclass[0]
        assert case["image"].shape == (3, 32, 32) and case["image"].dtype == torch.float32
        multilabel = MedMNISTDataset(str(files["multilabel"]), split=split, image_size=32, channels=1)
        expected = files["labels"]["multilabel"][f"{split}_labels"].astype(np.float32)
        got = torch.stack([multilabel[i]["label"] for i in range(len(multilabel))])
        assert multilabel.kind == "multilabel" and multilabel.num_classes == 4
        np.testing.assert_array_equal(got.numpy(), expected)
        assert multilabel[0]["image"].shape == (1, 32, 32)


def test_medmnist_errors(tmp_path, data_files):
    with pytest.raises(FileNotFoundError, match=r"nothere\.npz not found; umedpt reads local files only"):
        MedMNISTDataset(str(tmp_path / "nothere.npz"))
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"partial\.npz: no array 'val_images' \(arrays present"):
        MedMNISTDataset(str(tmp_path / "partial.npz"), split="val")
    np.savez(tmp_path / "volumes.npz", train_images=np.zeros((2, 28, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"3D MedMNIST volumes are not supported"):
        MedMNISTDataset(str(tmp_path / "volumes.npz"))
    broken = MedMNISTDataset(str(data_files["broken"]["medmnist"]["multiclass"]), split="val", num_classes=3)
    with pytest.raises(DataError, match=r"multiclass\.npz:val_labels\[1\]: label: 7 is out of range 0\.\.2"):
        broken[1]


# ------------------------------------------------------------------ manifest and folders
def test_manifest_classification_and_multilabel_round_trip(data_files):
    files = data_files["manifest"]
    for split in SPLITS:
        truth = files["truth"][split]
        diagnosis = ManifestDataset(str(files["manifest"]), split=split, label_column="diagnosis", image_size=16)
        assert diagnosis.class_names == ["benign", "malignant", "normal"]
        assert [diagnosis[i]["label"] for i in range(len(diagnosis))] == [t["label"] for t in truth]
        for column in (["calcification", "mass", "nodule"], "findings"):
            findings = ManifestDataset(str(files["manifest"]), split=split, kind="multilabel", label_column=column,
                                       image_size=16)
            assert findings.class_names == ["calcification", "mass", "nodule"]
            got = [findings[i]["label"].tolist() for i in range(len(findings))]
            assert got == [t["findings"] for t in truth]
        folder = ImageFolderDataset(str(files["folder"]), split=split, image_size=16)
        assert folder.class_names == ["benign", "malignant", "normal"]
        assert sorted(folder[i]["label"] for i in range(len(folder))) == sorted(t["label"] for t in truth)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_split_files_integer_labels_and_errors(tmp_path, data_files):
    images = data_files["manifest"]["truth"]["train"][:3]
    for split, labels in (("train", [0, 2, 1]), ("val", [1, 0, 5])):
        _write_csv(tmp_path / f"{split}.csv", [{"file": str(t["path"]), "y": y} for t, y in zip(images, labels, strict=True)])
    inferred = ManifestDataset(str(tmp_path / "{split}.csv"), path_column="file", label_column="y", image_size=16)
    assert inferred.num_classes == 6  # largest integer label of any split + 1
    fixed = ManifestDataset(str(tmp_path / "{split}.csv"), split="val", path_column="file", label_column="y",
                            num_classes=3, image_size=16)
    with pytest.raises(DataError, match=r"val\.csv line 4: label: 5 is out of range 0\.\.2"):
        fixed[2]
    with pytest.raises(ValueError, match=r"train\.csv: no column 'path'; the columns are \['file', 'y'\]"):
        ManifestDataset(str(tmp_path / "{split}.csv"))
    with pytest.raises(ValueError, match=r"no column 'split' to select the train split"):
        ManifestDataset(str(tmp_path / "train.csv"), path_column="file", label_column="y")
    _write_csv(tmp_path / "named.csv", [{"path": str(images[0]["path"]), "split": "valid", "label": "cat"}])
    named = ManifestDataset(str(tmp_path / "named.csv"), split="val", class_names=["benign", "normal"])
    with pytest.raises(DataError, match=r"named\.csv line 2: label: 'cat' is neither a class index nor a class name"):
        named[0]
    _write_csv(tmp_path / "ml.csv", [{"path": str(images[0]["path"]), "split": "train", "a": 1, "b": -1}])
    multilabel = ManifestDataset(str(tmp_path / "ml.csv"), kind="multilabel", label_column=["a", "b"])
    with pytest.raises(DataError, match=r"ml\.csv line 2: label: multi-label values must be 0 or 1, got \{'b': -1\.0\}"):
        multilabel[0]


def test_sixteen_bit_values_survive_until_normalisation(tmp_path):
    values = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) + 30000)  # neighbours differ by 1 of 65535
    cv2.imwrite(str(tmp_path / "a.png"), values)
    _write_csv(tmp_path / "m.csv", [{"path": "a.png", "split": "train", "label": 0}])
    ds = ManifestDataset(str(tmp_path / "m.csv"), num_classes=2, image_size=None, normalize="minmax", channels=1)
    raw = ds.raw(0).image
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, values)
    image = ds[0]["image"][0].numpy()
    expected = ((values - 30000.0) / (values.max() - 30000.0) - 0.5) / 0.25
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-5)
    assert len(np.unique(image)) == values.size  # an 8-bit round trip would merge 3 of 4 values


# ------------------------------------------------------------------ segmentation
def test_segmentation_round_trips_masks_exactly(data_files):
    files = data_files["segmentation"]
    for split in SPLITS:
        ds = SegmentationDataset(str(files["images"]), str(files["masks"]), split=split, num_classes=3,
                                 mask_suffix="_mask", image_size=None)
        for i, truth in enumerate(files["truth"][split]):
            case = ds[i]
            np.testing.assert_array_equal(ds.raw(i).image, truth["image"])
            np.testing.assert_array_equal(case["mask"].numpy(), truth["mask"])  # incl. 255 = ignored
            assert case["mask"].dtype == torch.int64 and case["image"].shape == (3, 48, 64)
            # the object pixels are the bright ones
            image = case["image"][0].numpy()
            assert image[truth["mask"] == 2].min() > image[truth["mask"] == 0].max()


def test_segmentation_mask_values_and_errors(tmp_path):
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    cv2.imwrite(str(tmp_path / "images/train/a.png"), np.full((16, 16), 9, np.uint8))
    cv2.imwrite(str(tmp_path / "masks/train/a.png"), mask)
    binary = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2,
                                 mask_values={0: 0, 255: 1}, ignore_index=-100, image_size=None)
    np.testing.assert_array_equal(binary[0]["mask"].numpy(), (mask == 255).astype(np.int64))
    raw = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2, image_size=None,
                              ignore_index=254)
    with pytest.raises(DataError, match=r"masks/train/a\.png: mask: values \[255\] are not class indices 0\.\.1"):
        raw[0]
    mask[0, 0] = 7
    cv2.imwrite(str(tmp_path / "masks/train/a.png"), mask)
    with pytest.raises(DataError, match=r"a\.png: mask: values \[7\] are not in mask_values"):
        binary[0]
    with pytest.raises(ValueError, match=r"ignore_index=1 is a class index"):
        SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2, ignore_index=1)
    (tmp_path / "masks/train/a.png").unlink()
    with pytest.raises(DataError, match=r"masks/train/a\.png: mask: file not found"):
        raw[0]
    unpaired = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2)
    with pytest.raises(DataError, match=r"images/train/a\.png: mask: no mask for this image"):
        unpaired[0]


# ------------------------------------------------------------------ COCO
def test_coco_round_trips_boxes_and_maps_categories(data_files):
    files = data_files["coco"]
    mapping = {3: 0, 7: 1}
    for split in SPLITS:
        ds = CocoDetectionDataset(files["annotations"], split=split, images=files["images"], image_size=None)
        assert ds.class_names == ["nodule", "mass"] and ds.category_mapping == mapping
        assert ds.describe()["category_mapping"] == {3: [0, "nodule"], 7: [1, "mass"]}
        for i, truth in enumerate(files["truth"][split]):
            case = ds[i]
            expected = [[x, y, x + w, y + h] for _, (x, y, w, h) in truth]
            np.testing.assert_array_equal(case["boxes"].numpy().reshape(-1, 4), np.reshape(expected, (-1, 4)))
            assert case["box_labels"].tolist() == [mapping[c] for c, _ in truth]  # crowd box left out
            assert case["boxes"].dtype == torch.float32 and case["box_labels"].dtype == torch.int64
    ordered = CocoDetectionDataset(files["annotations"], images=files["images"], class_names=["mass", "nodule"])
    assert ordered.category_mapping == {3: 1, 7: 0}


def test_coco_errors(tmp_path, data_files):
    files = data_files["coco"]
    with pytest.raises(ValueError, match=r"needs \{split\} in its path"):
        CocoDetectionDataset(str(tmp_path / "instances.json"))
    with pytest.raises(ValueError, match=r"categories \['mass'\] are not in class_names \['nodule'\]"):
        CocoDetectionDataset(files["annotations"], images=files["images"], class_names=["nodule"])
    (tmp_path / "bad_train.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"bad_train\.json: no 'categories' list"):
        CocoDetectionDataset(str(tmp_path / "bad_{split}.json"))
    broken = data_files["broken"]["coco"]
    ds = CocoDetectionDataset(broken["annotations"], images=broken["images"], image_size=None)
    with pytest.raises(DataError, match=r"instances_train\.json image id 101: boxes: annotation 900 .* lies outside"):
        ds[1]


# ------------------------------------------------------------------ NIfTI
def test_nifti_slices_match_the_canonical_volume(data_files):
    files = data_files["nifti"]
    ds = NiftiSliceDataset(str(files["images"]), str(files["labels"]), num_classes=3, image_size=None,
                           normalize="soft_tissue")
    assert len(ds) == 2 * 6  # two train volumes of 6 axial slices
    for i in (0, 5, 7):
        volume = nib.as_closest_canonical(nib.load(ds.items[i].image)).get_fdata()
        labels = nib.as_closest_canonical(nib.load(ds.items[i].mask)).get_fdata()
        sample = ds.raw(i)
        np.testing.assert_array_equal(sample.image, volume[..., ds.slices[i]])
        np.testing.assert_array_equal(sample.mask, labels[..., ds.slices[i]])
        assert sample.image.dtype == np.int16
    sagittal = NiftiSliceDataset(str(files["images"]), str(files["labels"]), split="val", num_classes=3, axis=0,
                                 image_size=32)
    assert len(sagittal) == 20 and sagittal[3]["mask"].shape == (32, 32)


def test_nifti_slicing_of_a_bundled_volume():
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    image = nib.load(path)
    canonical = nib.as_closest_canonical(image).get_fdata()
    for axis in (0, 1, 2):
        k = canonical.shape[axis] // 2
        np.testing.assert_array_equal(volume_slice(image, axis, k), np.take(canonical, k, axis=axis))


# ------------------------------------------------------------------ data module and CLI
def _task(name: str, kind: str, num_classes: int, class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "num_classes": num_classes, "batch_size": 2,
            "data": {"class_path": class_path, "init_args": init_args}}


def test_training_refuses_data_with_errors(data_files):
    broken = data_files["broken"]["manifest"]
    spec = _task("diag", "classification", 3, "umedpt.data.readers.ManifestDataset",
                 manifest=str(broken["manifest"]), label_column="diagnosis")
    module = MultiTaskDataModule(tasks=[spec], num_workers=0)
    with pytest.raises(ValueError, match=r"task 'diag' \(train split\): 1 data error\(s\), first: .*missing\.png: file"):
        module.setup("fit")
    full = MultiTaskDataModule(tasks=[spec], num_workers=0, check="full")
    with pytest.raises(ValueError, match=r"2 data error\(s\), first: .*missing\.png: file: file not found; .*corrupt\.png"):
        full.setup("fit")
    MultiTaskDataModule(tasks=[spec], num_workers=0, check="off").setup("fit")  # the user's choice
    wrong_kind = Task(**_task("diag", "multilabel", 3, "umedpt.data.readers.ManifestDataset",
                              manifest=str(broken["manifest"]), label_column="diagnosis"))
    with pytest.raises(ValueError, match=r"kind='multilabel' but its train dataset is 'classification'"):
        MultiTaskDataModule(tasks=[wrong_kind]).build_dataset(wrong_kind, "train")


def test_fit_on_real_format_files(tmp_path, data_files):
    from umedpt.cli import main

    medmnist, coco = data_files["medmnist"], data_files["coco"]
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 1,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path)},
        "model": {
            "encoder": {"class_path": "umedpt.SwinEncoder", "init_args": {
                "img_size": 64, "model_kwargs": TINY_ENCODER["model_kwargs"]}},
            "export_encoder": False,
            "tasks": [
                {**_task("tissue", "classification", 3, "umedpt.data.readers.MedMNISTDataset",
                         path=str(medmnist["multiclass"]), transform="histology")},
                {**_task("findings", "detection", 2, "umedpt.data.readers.CocoDetectionDataset",
                         annotations=coco["annotations"], images=coco["images"], transform="photo"),
                 "head_args": {"fpn_channels": 32}},
            ],
        },
        "data": {"num_workers": 0, "dataset_defaults": {"image_size": 64}},
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "-c", str(path)])
    assert cli.trainer.global_step == 2
    assert list(cli.model.task_names) == ["tissue", "findings"]


# ------------------------------------------------------------------ bad inputs name the culprit
def test_manifest_split_typo_is_an_error_with_a_suggestion(tmp_path, data_files):
    image = str(data_files["manifest"]["truth"]["train"][0]["path"])
    rows = [{"path": image, "split": s, "label": 0} for s in ("train", "val", "trian", "tset")]
    manifest = _write_csv(tmp_path / "labels.csv", rows)
    for split in SPLITS:  # every split refuses the table, not only the one the bad row was meant for
        with pytest.raises(
            ValueError,
            match=r"labels\.csv line 4: split: 'trian' is not a split \(did you mean 'train'\?\); expected one of "
                  r"\['test', 'testing', 'train', 'training', 'val', 'valid', 'validation'\]; 1 more rows",
        ):
            ManifestDataset(str(manifest), split=split, num_classes=2)
    segmentation = _write_csv(tmp_path / "seg.csv", [{"image": image, "mask": image, "split": "vla"}])
    with pytest.raises(ValueError, match=r"seg\.csv line 2: split: 'vla' is not a split \(did you mean 'val'\?\)"):
        SegmentationDataset(manifest=str(segmentation), num_classes=2)


def test_non_utf8_manifest_names_file_and_byte(tmp_path, data_files):
    image = str(data_files["manifest"]["truth"]["train"][0]["path"])
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes(f"path,split,label\n{image},train,caf\xe9\n".encode("latin-1"))
    position = len(f"path,split,label\n{image},train,caf".encode())
    expected = rf"latin1\.csv is not UTF-8 text: byte 0xe9 at byte position {position} \(line 2\) .*save it as UTF-8"
    with pytest.raises(ValueError, match=expected):
        ManifestDataset(str(manifest))
    spec = _task("diag", "classification", 2, "umedpt.data.readers.ManifestDataset", manifest=str(manifest))
    with pytest.raises(TaskDataError, match=r"task 'diag' \(train split\): .*" + expected) as info:
        MultiTaskDataModule(tasks=[spec], num_workers=0).setup("fit")
    assert info.value.task == "diag" and info.value.split == "train"
    assert isinstance(info.value.__cause__, ValueError)  # the reader's error, chained
    assert isinstance(info.value.__cause__.__cause__, UnicodeDecodeError)
    bom = tmp_path / "bom.csv"  # a byte order mark is not part of the header
    bom.write_bytes(b"\xef\xbb\xbf" + f"path,split,label\n{image},train,0\n".encode())
    assert len(ManifestDataset(str(bom), num_classes=2)) == 1


@pytest.mark.parametrize(
    ("planted", "counts"), [(np.nan, r"3 NaN, 0 Inf"), (np.inf, r"0 NaN, 3 Inf"), (-np.inf, r"0 NaN, 3 Inf")]
)
def test_nonfinite_pixels_are_an_error_or_zero(tmp_path, planted, counts):
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    image[2, :3] = planted
    np.save(tmp_path / "scan.npy", image)
    manifest = _write_csv(tmp_path / "m.csv", [{"path": "scan.npy", "split": "train", "label": 0}])
    strict = ManifestDataset(str(manifest), num_classes=2, image_size=None, normalize="percentile")
    message = rf"scan\.npy: image: 3 of 64 values are not finite \({counts}\); .*set nonfinite: zero"
    with pytest.raises(DataError, match=message):
        strict[0]
    (problem,) = strict.problems(deep=True)
    assert problem.severity == "error" and problem.field == "image" and problem.index == 0
    assert strict.inspect(0).value_range == (0.0, 1.0)  # over the finite values
    zero = ManifestDataset(str(manifest), num_classes=2, image_size=None, normalize="minmax", nonfinite="zero")
    expected = np.where(np.isfinite(image), image, 0)
    with pytest.warns(UserWarning, match=r"scan\.npy: image: 3 of 64 values are not finite .*replaced by 0 .*shown once"):
        np.testing.assert_array_equal(zero.raw(0).image, expected)
    np.testing.assert_allclose(zero[0]["image"][0].numpy(), (expected - 0.5) / 0.25, atol=1e-6)  # 0 before scaling
    (warning,) = zero.problems(deep=True)
    assert warning.severity == "warning" and "replaced by 0 (nonfinite: zero)" in warning.message
    with pytest.raises(ValueError, match=r"ManifestDataset: nonfinite must be one of \['error', 'zero'\], got 'nan'"):
        ManifestDataset(str(manifest), num_classes=2, nonfinite="nan")


def _nan_volume_manifest(tmp_path: Path) -> Path:
    """A manifest pairing nibabel's bundled volume with NaN voxels with an all-background label volume."""
    from nibabel.testing import data_path

    volume = Path(data_path) / "resampled_anat_moved.nii"
    image = nib.load(volume)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), tmp_path / "labels.nii.gz")
    return _write_csv(tmp_path / "volumes.csv", [{"image": str(volume), "mask": "labels.nii.gz", "split": "train"}])


def test_nonfinite_voxels_of_a_nifti_volume(tmp_path):
    manifest = _nan_volume_manifest(tmp_path)
    ds = NiftiSliceDataset(manifest=str(manifest), num_classes=2, image_size=None)
    volume = nib.as_closest_canonical(nib.load(ds.items[0].image)).get_fdata()
    nan = int(np.isnan(volume[..., 0]).sum())
    with pytest.raises(DataError, match=rf"resampled_anat_moved\.nii \[slice 0\]: image: {nan} of 357 values are not "
                                        r"finite \(\d+ NaN, 0 Inf\)"):
        ds[0]
    problems = ds.problems(deep=True)
    assert [p.index for p in problems if p.severity == "error"] == [0, 1, 2]  # each slice has NaN voxels
    spec = _task("brain", "segmentation", 2, "umedpt.data.readers.NiftiSliceDataset", manifest=str(manifest))
    spec["data"]["init_args"]["num_classes"] = 2
    with pytest.raises(ValueError, match=r"3 data error\(s\), first: .*resampled_anat_moved\.nii \[slice 0\]: image"):
        MultiTaskDataModule(check="full").build_dataset(Task(**spec), "train")
    zero = NiftiSliceDataset(manifest=str(manifest), num_classes=2, image_size=None, nonfinite="zero")
    with pytest.warns(UserWarning, match=r"resampled_anat_moved\.nii \[slice 0\]: image: .*replaced by 0"):
        assert np.isfinite(zero.raw(0).image).all()
    assert torch.isfinite(zero[1]["image"]).all()  # warned once per dataset
    assert {p.severity for p in zero.problems(deep=True)} == {"warning"}


def test_binary_mask_read_as_mostly_ignore_index_warns(tmp_path):
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[2:14, 2:14] = 255  # 56% foreground stored as 255, the default ignore_index
    cv2.imwrite(str(tmp_path / "images/train/a.png"), np.full((16, 16), 9, np.uint8))
    cv2.imwrite(str(tmp_path / "masks/train/a.png"), mask)
    ds = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2, image_size=None)
    message = (r"masks/train/a\.png: mask: 56% of the pixels are ignore_index=255 and are not trained on; if 255 "
               r"marks a class \(e\.g\. a 0/255 binary mask\), set mask_values \(e\.g\. \{0: 0, 255: 1\}\)")
    with pytest.warns(UserWarning, match=message):
        ds[0]
    ds[0]  # once per dataset: no second warning (pytest turns warnings into errors)
    (problem,) = ds.problems(deep=True)
    assert problem.severity == "warning" and problem.field == "mask"
    mapped = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), num_classes=2, image_size=None,
                                 mask_values={0: 0, 255: 1}, ignore_index=-100)
    assert mapped.problems(deep=True) == [] and mapped[0]["mask"].sum() == 144
    mask[2:14, 2:14] = 1
    mask[:6] = 255  # a third ignored: ordinary unlabelled margins
    cv2.imwrite(str(tmp_path / "masks/train/a.png"), mask)
    assert ds.problems(deep=True) == []


def test_truncated_nifti_volume_names_the_file(tmp_path):
    voxels = np.random.default_rng(0).integers(-1000, 1000, (16, 16, 8), dtype=np.int16)
    for name, data in (("ct.nii.gz", voxels), ("labels.nii.gz", np.zeros_like(voxels, np.uint8))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name)
    manifest = _write_csv(tmp_path / "v.csv", [{"image": "ct.nii.gz", "mask": "labels.nii.gz", "split": "train"}])
    ds = NiftiSliceDataset(manifest=str(manifest), num_classes=2, image_size=None)
    np.testing.assert_array_equal(ds.raw(3).image, voxels[..., 3])  # intact, then cut
    data = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "ct.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    truncated = NiftiSliceDataset(manifest=str(manifest), num_classes=2, image_size=None)
    assert len(truncated) == 8  # the header is intact
    message = r"ct\.nii\.gz \[slice 0\]: image: cannot read the voxels \(EOFError: .*\); the file may be truncated"
    with pytest.raises(DataError, match=message) as info:
        truncated[0]
    assert isinstance(info.value.__cause__, EOFError)
    assert all(p.field == "image" and "cannot read the voxels" in p.message for p in truncated.problems(deep=True))


def test_a_split_of_only_4d_series_names_the_files_skipped(tmp_path):
    rows = []
    for name in ("bold", "dwi"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 5), np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), tmp_path / f"{name}_seg.nii.gz")
        rows.append({"image": f"{name}.nii.gz", "mask": f"{name}_seg.nii.gz", "split": "test"})
    manifest = _write_csv(tmp_path / "v.csv", rows)
    spec = _task("fmri", "segmentation", 2, "umedpt.data.readers.NiftiSliceDataset", manifest=str(manifest))
    spec["data"]["init_args"]["num_classes"] = 2
    message = (r"task 'fmri': the test split is empty; 2 problem\(s\) found listing it: .*bold\.nii\.gz: image: "
               r"shape \(8, 8, 4, 5\) is a 4D series of 5 volumes \(e\.g\. fMRI or DWI\), not a 3D volume; .*dwi\.nii\.gz")
    with pytest.raises(ValueError, match=message):
        MultiTaskDataModule(tasks=[spec], num_workers=0).setup("test")
