"""Real-format readers: samples/s of ``dataset[i]`` in ONE process, per reader and image size.

What one DataLoader worker does for one training sample: read the file, decode it at full depth,
check it, normalise it to [0, 1], resize and augment it with the reader's preset (train split),
standardise it and build the case dict. Each reader of :mod:`umedpt.data.readers` gets realistic
synthetic input files, written first into a temporary folder (deterministic, nothing
downloaded), and the preset its modality uses in ``configs/examples/``:

=========================  ===================================================  ============
reader                     input                                                preset
=========================  ===================================================  ============
MedMNISTDataset            224 px RGB ``.npz`` (9 classes) / grey (14 labels)   histology / xray
ManifestDataset            CSV + 512 px 16-bit grey PNG x-rays (3 labels)       xray
ManifestDataset            CSV + 512 px int16 CT DICOM (HU via the LUT)         ct
ImageFolderDataset         512 px 8-bit RGB JPEG / PNG in class folders         dermoscopy
SegmentationDataset        512 px RGB PNG + 0/255 PNG mask                      microscopy
CocoDetectionDataset       640x480 RGB JPEG, 5 boxes each                       photo
NiftiSliceDataset          256x256x64 int16 CT volumes + labels, axial slices   ct
SyntheticTaskDataset       rendered scenes (segmentation, detection)            (its own)
=========================  ===================================================  ============

Items are read in the order of the training sampler (:class:`EpochShuffleSampler`): shuffled
over all files, which matters for the NIfTI reader's volume cache. One warm-up item, then
``--items`` timed items; a second pass over the same items times the read alone
(``FileDataset.raw``: read, decode, check; the synthetic generator's ``scene``: render).
``ms/sample`` is wall-clock; ``cpu ms`` is this process's CPU time, which a loaded machine
inflates less.

    OMP_NUM_THREADS=1 python benchmarks/data_readers.py                 # 64 and 224 px, 48 items
    OMP_NUM_THREADS=1 python benchmarks/data_readers.py --sizes 224 --items 96 --only Nifti

Writes ``benchmarks/results/data_readers_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from common import device_name, markdown_table, write_result

from umedpt.data.loading import EpochShuffleSampler


@dataclass
class Case:
    """One reader over one input: ``build(image_size)`` returns its train dataset."""

    reader: str
    input: str
    preset: str
    build: Callable[[int], Any]


# ------------------------------------------------------------------ synthetic pixels
def texture(rng: np.random.Generator, h: int, w: int, channels: int = 1, noise: float = 0.03) -> np.ndarray:
    """Smooth random shading plus pixel noise, float32 (h, w, channels) in [0, 1].

    Real images compress somewhere between flat fields and white noise; this does too.
    """
    low = rng.random((max(h // 32, 2), max(w // 32, 2), channels), dtype=np.float32)
    field = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
    field = 0.15 + 0.6 * field + rng.normal(0.0, noise, (h, w, channels)).astype(np.float32)
    return np.clip(field, 0.0, 1.0)


def blobs(rng: np.random.Generator, h: int, w: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 (h, w) mask of ``count`` random discs (1 inside) and their ``xyxy`` boxes."""
    mask = np.zeros((h, w), np.uint8)
    boxes = []
    for _ in range(count):
        r = int(rng.integers(min(h, w) // 24, min(h, w) // 8))
        x, y = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        cv2.circle(mask, (x, y), r, 1, -1)
        boxes.append([x - r, y - r, x + r + 1, y + r + 1])
    return mask, np.asarray(boxes, np.float32)


def scene(rng: np.random.Generator, h: int, w: int, channels: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured image (float32 (h, w, channels)) with ``count`` brighter discs, their mask and boxes."""
    mask, boxes = blobs(rng, h, w, count)
    image = texture(rng, h, w, channels)
    image = np.where(mask[..., None] > 0, np.clip(image + 0.25, 0.0, 1.0), image)
    return image, mask, boxes


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float to uint8, dropping a single channel axis."""
    pixels = (image * 255).round().astype(np.uint8)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def write_raster(path: Path, image: np.ndarray, quality: int = 90) -> None:
    """Write an (H, W) or RGB (H, W, 3) array with OpenCV (which wants BGR); JPEG at ``quality``."""
    pixels = image[..., ::-1] if image.ndim == 3 else image
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels), params):
        raise OSError(f"could not write {path}")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV manifest with the rows' keys as header."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def ct_hu(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A CT-like slice in HU (float32): air outside an elliptic body, soft tissue, bright discs."""
    y, x = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    body = (x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1
    mask, _ = blobs(rng, h, w, 6)
    hu = 40 + 300 * (texture(rng, h, w)[..., 0] - 0.5) + 600.0 * mask
    return np.where(body, hu, -1000 + rng.normal(0, 10, (h, w))).astype(np.float32)


# ------------------------------------------------------------------ input files per reader
def medmnist_cases(root: Path, n: int, rng: np.random.Generator) -> list[Case]:
    """PathMNIST-like (RGB, 9 classes) and ChestMNIST-like (grey, 14 labels) 224 px ``.npz`` files."""
    from umedpt.data.readers import MedMNISTDataset

    counts = {"train": n, "val": 8, "test": 8}
    rgb = {f"{s}_images": to_uint8(np.stack([texture(rng, 224, 224, 3) for _ in range(c)])) for s, c in counts.items()}
    rgb.update({f"{s}_labels": rng.integers(0, 9, (c, 1)).astype(np.uint8) for s, c in counts.items()})
    grey = {f"{s}_images": to_uint8(np.stack([texture(rng, 224, 224) for _ in range(c)])) for s, c in counts.items()}
    grey.update({f"{s}_labels": rng.integers(0, 2, (c, 14)).astype(np.uint8) for s, c in counts.items()})
    np.savez_compressed(root / "pathmnist_224.npz", **rgb)
    np.savez_compressed(root / "chestmnist_224.npz", **grey)
    return [
        Case("MedMNISTDataset (RGB)", f"{n} x 224 px RGB uint8 npz, 9 classes", "histology",
             lambda size: MedMNISTDataset(str(root / "pathmnist_224.npz"), image_size=size, transform="histology")),
        Case("MedMNISTDataset (grey)", f"{n} x 224 px grey uint8 npz, 14 labels", "xray",
             lambda size: MedMNISTDataset(str(root / "chestmnist_224.npz"), image_size=size, transform="xray")),
    ]  # fmt: skip


def xray_manifest_case(root: Path, n: int, rng: np.random.Generator) -> list[Case]:
    """512 px 16-bit (12-bit values) grey PNG radiographs listed in a CSV with three 0/1 columns."""
    from umedpt.data.readers import ManifestDataset

    (root / "cxr").mkdir()
    findings = ["effusion", "nodule", "pneumothorax"]
    rows = []
    for k in range(n):
        image, _, _ = scene(rng, 512, 512, 1, 4)
        write_raster(root / "cxr" / f"cxr_{k:03d}.png", (image[..., 0] * 4095).astype(np.uint16))
        rows.append({"path": f"cxr/cxr_{k:03d}.png", "split": "train", **{f: int(rng.integers(0, 2)) for f in findings}})
    write_csv(root / "cxr.csv", rows)
    return [
        Case("ManifestDataset (PNG)", f"{n} x 512x512 16-bit grey PNG, CSV, 3 labels, percentile", "xray",
             lambda size: ManifestDataset(str(root / "cxr.csv"), kind="multilabel", label_column=findings,
                                          image_size=size, transform="xray", normalize="percentile")),
    ]  # fmt: skip


def dicom_case(root: Path, n: int, rng: np.random.Generator) -> list[Case]:
    """512x512 int16 CT slices (slope 1, intercept -1024, window 40/400) from pydicom's bundled CT_small.dcm."""
    import pydicom
    from pydicom.data import get_testdata_file

    from umedpt.data.readers import ManifestDataset

    template = get_testdata_file("CT_small.dcm")  # bundled with pydicom; a missing one would be downloaded
    if template is None or not Path(template).is_file():
        raise FileNotFoundError("pydicom's bundled test file CT_small.dcm is missing")
    (root / "ct").mkdir()
    rows = []
    for k in range(n):
        ds = pydicom.dcmread(template)
        ds.set_pixel_data((ct_hu(rng, 512, 512) + 1024).round().astype(np.int16), "MONOCHROME2", 16)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.InstanceNumber = k + 1
        ds.save_as(root / "ct" / f"slice_{k:03d}.dcm", enforce_file_format=True)
        rows.append({"file": f"ct/slice_{k:03d}.dcm", "split": "train", "contrast": ["no", "yes"][k % 2]})
    write_csv(root / "ct.csv", rows)
    return [
        Case("ManifestDataset (DICOM)", f"{n} x 512x512 int16 CT DICOM, soft_tissue window, 1 channel", "ct",
             lambda size: ManifestDataset(str(root / "ct.csv"), path_column="file", label_column="contrast",
                                          image_size=size, transform="ct", normalize="soft_tissue", channels=1)),
    ]  # fmt: skip


def folder_cases(root: Path, n: int, rng: np.random.Generator) -> list[Case]:
    """512 px 8-bit RGB images in ``<split>/<class>/`` folders, once as JPEG (quality 90), once as PNG."""
    from umedpt.data.readers import ImageFolderDataset

    classes = ["benign", "malignant", "nevus"]
    formats = {"JPEG": "jpg", "PNG": "png"}
    for k in range(n):
        image, _, _ = scene(rng, 512, 512, 3, 3)
        for ext in formats.values():
            folder = root / f"skin_{ext}" / "train" / classes[k % 3]
            folder.mkdir(parents=True, exist_ok=True)
            write_raster(folder / f"lesion_{k:03d}.{ext}", to_uint8(image))
    return [
        Case(f"ImageFolderDataset ({name})", f"{n} x 512x512 8-bit RGB {name}, 3 class folders", "dermoscopy",
             lambda size, ext=ext: ImageFolderDataset(str(root / f"skin_{ext}"), image_size=size, transform="dermoscopy"))
        for name, ext in formats.items()
    ]  # fmt: skip


def segmentation_case(root: Path, n: int, rng: np.random.Generator) -> list[Case]:
    """512 px RGB PNG images with 0/255 PNG masks paired by name (``<name>_mask.png``)."""
    from umedpt.data.readers import SegmentationDataset

    for folder in ("images", "masks"):
        (root / "nuclei" / folder / "train").mkdir(parents=True)
    for k in range(n):
        image, mask, _ = scene(rng, 512, 512, 3, 12)
        write_raster(root / "nuclei" / "images" / "train" / f"tile_{k:03d}.png", to_uint8(image))
        write_raster(root / "nuclei" / "masks" / "train" / f"tile_{k:03d}_mask.png", mask * 255)
    return [
        Case("SegmentationDataset", f"{n} x 512x512 RGB PNG + 0/255 PNG mask (mask_values)", "microscopy",
             lambda size: SegmentationDataset(str(root / "nuclei" / "images"), str(root / "nuclei" / "masks"),
                                              num_classes=2, mask_suffix="_mask", mask_values={0: 0, 255: 1},
                                              image_size=size, transform="microscopy")),
    ]  # fmt: skip


def coco_case(root: Path, n: int, rng: np.random.Generator) -> list[Case]:
    """640x480 RGB JPEGs with 5 boxes each (3 categories, non-contiguous ids) in ``instances_train.json``."""
    from umedpt.data.readers import CocoDetectionDataset

    (root / "coco" / "train").mkdir(parents=True)
    images, annotations = [], []
    for k in range(n):
        image, _, boxes = scene(rng, 480, 640, 3, 5)
        write_raster(root / "coco" / "train" / f"img_{k:03d}.jpg", to_uint8(image))
        images.append({"id": k + 1, "file_name": f"img_{k:03d}.jpg", "height": 480, "width": 640})
        for x1, y1, x2, y2 in boxes.tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": int(rng.choice([1, 4, 9])),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": 1, "name": "lymphocyte"}, {"id": 4, "name": "tumour_cell"}, {"id": 9, "name": "mitosis"}]
    (root / "coco" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return [
        Case("CocoDetectionDataset", f"{n} x 640x480 RGB JPEG, 5 boxes each", "photo",
             lambda size: CocoDetectionDataset(str(root / "coco" / "instances_{split}.json"),
                                               images=str(root / "coco" / "{split}"), image_size=size,
                                               transform="photo")),
    ]  # fmt: skip


def nifti_cases(root: Path, volumes: int, rng: np.random.Generator) -> list[Case]:
    """256x256x64 int16 CT volumes (HU) with uint8 label volumes, stored gzipped and uncompressed."""
    import nibabel as nib

    from umedpt.data.readers import NiftiSliceDataset

    shape = (256, 256, 64)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    x, y, z = np.ogrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j, -1 : 1 : shape[2] * 1j]
    for suffix in ("nii.gz", "nii"):
        for folder in ("images", "labels"):
            (root / f"liver_{suffix}" / folder / "train").mkdir(parents=True)
    for k in range(volumes):
        cx, cy = rng.uniform(-0.2, 0.2, 2)
        body = (x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1
        organ = ((x - cx) / 0.4) ** 2 + ((y - cy) / 0.3) ** 2 + (z / 0.8) ** 2 <= 1
        lesion = ((x - cx - 0.1) / 0.12) ** 2 + ((y - cy) / 0.1) ** 2 + ((z - 0.1) / 0.3) ** 2 <= 1
        label = (organ.astype(np.uint8) + (organ & lesion)).astype(np.uint8)
        hu = np.where(body, 40.0, -1000.0) + 20.0 * organ + 50.0 * lesion + rng.normal(0, 15, shape)
        image = hu.round().astype(np.int16)
        for suffix in ("nii.gz", "nii"):
            base = root / f"liver_{suffix}"
            nib.save(nib.Nifti1Image(image, affine), base / "images" / "train" / f"case_{k}.{suffix}")
            nib.save(nib.Nifti1Image(label, affine), base / "labels" / "train" / f"case_{k}.{suffix}")
    return [
        Case(f"NiftiSliceDataset (.{suffix})", f"{volumes} x 256x256x64 int16 volumes + labels, axial slices, "
             f"{'gzipped' if suffix.endswith('gz') else 'uncompressed'}", "ct",
             lambda size, suffix=suffix: NiftiSliceDataset(
                 str(root / f"liver_{suffix}" / "images"), str(root / f"liver_{suffix}" / "labels"), num_classes=3,
                 axis=2, normalize={"method": "window", "center": 60, "width": 400}, image_size=size,
                 transform="ct"))
        for suffix in ("nii.gz", "nii")
    ]  # fmt: skip


def synthetic_cases(n: int) -> list[Case]:
    """The built-in generator for comparison: a segmentation and a detection family."""
    from umedpt.data.synthetic import SyntheticTaskDataset

    return [
        Case(f"SyntheticTaskDataset ({family})", f"rendered {style} scenes, {n} indices", "(built in)",
             lambda size, style=style, family=family: SyntheticTaskDataset(style, family, num_samples=n,
                                                                           image_size=size))
        for style, family in (("fluorescence", "segmentation"), ("radiograph", "detection"))
    ]  # fmt: skip


def write_inputs(root: Path, files: int, seed: int = 0) -> list[Case]:
    """Write every reader's input files into ``root`` (deterministic for ``seed``) and return the cases."""
    rng = np.random.default_rng(seed)
    return [
        *medmnist_cases(root, files, rng),
        *xray_manifest_case(root, files, rng),
        *dicom_case(root, files, rng),
        *folder_cases(root, files, rng),
        *segmentation_case(root, files, rng),
        *coco_case(root, files, rng),
        *nifti_cases(root, max(files // 16, 2), rng),
        *synthetic_cases(files),
    ]


# ------------------------------------------------------------------ timing
def time_items(dataset: Any, items: int) -> dict[str, float]:
    """Wall and CPU ms per ``dataset[i]`` over ``items`` items in training-sampler order, and the read alone."""
    order = list(EpochShuffleSampler(len(dataset), seed=0))
    picks = [order[(1 + k) % len(order)] for k in range(items)]
    dataset[order[0]]  # warm-up: lazy imports, pipelines, the first volume
    wall, cpu = time.perf_counter(), time.process_time()
    for i in picks:
        dataset[i]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    read = dataset.raw if hasattr(dataset, "raw") else dataset.scene
    read_wall = time.perf_counter()
    for i in picks:
        read(i)
    read_wall = time.perf_counter() - read_wall
    return {"samples_per_s": items / wall, "ms_per_sample": 1000 * wall / items,
            "cpu_ms_per_sample": 1000 * cpu / items, "read_ms_per_sample": 1000 * read_wall / items}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image_size values (quick: 64, full: 224)")
    parser.add_argument("--items", type=int, default=48, help="items timed per reader and size")
    parser.add_argument("--files", type=int, default=48, help="input files per format (NIfTI: files // 16 volumes)")
    parser.add_argument("--only", nargs="*", default=None, help="run only readers whose name contains one of these")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0]  # before this process adds its own
    rows = []
    with tempfile.TemporaryDirectory(prefix="umedpt_readers_") as tmp:
        start = time.perf_counter()
        cases = write_inputs(Path(tmp), args.files)
        megabytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
        print(f"wrote {megabytes:.0f} MiB of inputs in {time.perf_counter() - start:.1f} s", flush=True)
        cases = [c for c in cases if not args.only or any(o.lower() in c.reader.lower() for o in args.only)]
        for size in args.sizes:
            for case in cases:
                timing = time_items(case.build(size), args.items)
                rows.append({"reader": case.reader, "input": case.input, "preset": case.preset, "image_size": size,
                             **{k: round(v, 2 if k.startswith("samples") else 3) for k, v in timing.items()}})  # fmt: skip
                print(rows[-1], flush=True)

    table = markdown_table(
        ["reader", "input", "preset", "size", "samples/s", "ms/sample", "cpu ms", "read ms"],
        [[r["reader"], r["input"], r["preset"], r["image_size"], f"{r['samples_per_s']:.1f}",
          f"{r['ms_per_sample']:.1f}", f"{r['cpu_ms_per_sample']:.1f}", f"{r['read_ms_per_sample']:.1f}"]
         for r in rows],
    )  # fmt: skip
    print("\n" + table)
    write_result(
        "data_readers_cpu",
        {
            "benchmark": "data_readers",
            "device": device_name("cpu"),
            "cores": os.cpu_count(),
            "load_average_at_start": round(load, 2),
            "items": args.items,
            "files_per_format": args.files,
            "order": "EpochShuffleSampler(seed=0), one warm-up item",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
