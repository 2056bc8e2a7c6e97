"""Tests of the synthetic worlds: determinism, label consistency, learnability and the dataset API."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from umedpt.data import synthetic  # noqa: E402
from umedpt.data.synthetic import (  # noqa: E402
    COUNT_BIN_EDGES,
    GRADE_NAMES,
    LABEL_FAMILIES,
    MIN_VISIBLE_AREA,
    NUM_OBJECT_TYPES,
    OBJECT_NAMES,
    SIZE_BIN_EDGES,
    STYLES,
    Scene,
    SyntheticTaskDataset,
    class_names,
    num_classes,
    render_scene,
)

K = NUM_OBJECT_TYPES
CLASSIFICATION = [f for f, kind in LABEL_FAMILIES.items() if kind == "classification"]


def _digest(scene: Scene) -> str:
    h = hashlib.sha256()
    for array in (scene.image, scene.mask, scene.boxes, scene.box_labels):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def test_public_constants():
    assert STYLES == ("radiograph", "ct", "fluorescence", "histology", "dermoscopy")
    assert K == 4
    assert LABEL_FAMILIES == {
        "grade": "classification",
        "objects": "multilabel",
        "dominant": "classification",
        "count_bin": "classification",
        "size_bin": "classification",
        "segmentation": "segmentation",
        "detection": "detection",
    }
    for style in STYLES:
        assert len(OBJECT_NAMES[style]) == K and len(set(OBJECT_NAMES[style])) == K
        assert len(GRADE_NAMES[style]) == 3 and len(set(GRADE_NAMES[style])) == 3


@pytest.mark.parametrize("style", STYLES)
def test_class_names_and_counts(style):
    objects = list(OBJECT_NAMES[style])
    expected = {
        "grade": list(GRADE_NAMES[style]),
        "objects": objects,
        "dominant": [*objects, "none"],
        "count_bin": ["0-1", "2-3", "4-6", "7+"],
        "size_bin": ["small", "medium", "large"],
        "segmentation": ["background", *objects],
        "detection": objects,
    }
    for family, names in expected.items():
        assert class_names(style, family) == names
        assert num_classes(style, family) == len(names)


@pytest.mark.parametrize("size", [32, 64, 224, 37])
@pytest.mark.parametrize("style", STYLES)
def test_scene_arrays(style, size):
    for index in range(3):
        scene = render_scene(style, 0, index, size)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.float32
        assert scene.image.min() >= 0.0 and scene.image.max() <= 1.0
        assert scene.image.std() > 0.02  # not a blank frame
        assert scene.mask.shape == (size, size) and scene.mask.dtype == np.int64
        assert scene.mask.min() >= 0 and scene.mask.max() <= K
        n = len(scene.boxes)
        assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
        assert scene.box_labels.shape == (n,) and scene.box_labels.dtype == np.int64
        assert ((scene.box_labels >= 0) & (scene.box_labels < K)).all()
        assert (scene.boxes[:, :2] >= 0).all() and (scene.boxes[:, 2:] <= size).all()
        assert (scene.boxes[:, 2:] > scene.boxes[:, :2]).all()
        if style in ("radiograph", "ct"):
            assert np.array_equal(scene.image[..., 0], scene.image[..., 1])
            assert np.array_equal(scene.image[..., 0], scene.image[..., 2])
        else:
            assert not np.array_equal(scene.image[..., 0], scene.image[..., 2])


def test_large_size_renders():
    scene = render_scene("histology", 1, 2, 512)
    assert scene.image.shape == (512, 512, 3) and scene.mask.shape == (512, 512)


def test_determinism_within_process():
    for style in STYLES:
        a, b = render_scene(style, 7, 11, 64), render_scene(style, 7, 11, 64)
        assert _digest(a) == _digest(b)
        assert a.labels["grade"] == b.labels["grade"] and np.array_equal(
            a.labels["objects"], b.labels["objects"]
        )
        assert _digest(render_scene(style, 7, 12, 64)) != _digest(a)
        assert _digest(render_scene(style, 8, 11, 64)) != _digest(a)


def test_determinism_across_processes():
    code = (
        "import hashlib, importlib.util, sys\n"
        "import numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('synthetic', {synthetic.__file__!r})\n"
        "m = sys.modules['synthetic'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "for style in m.STYLES:\n"
        "    s = m.render_scene(style, 3, 5, 48)\n"
        "    h = hashlib.sha256()\n"
        "    for a in (s.image, s.mask, s.boxes, s.box_labels): h.update(np.ascontiguousarray(a).tobytes())\n"
        "    print(h.hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [_digest(render_scene(style, 3, 5, 48)) for style in STYLES]


def test_layout_does_not_depend_on_size():
    for style in STYLES:
        small, large = render_scene(style, 0, 4, 128), render_scene(style, 0, 4, 256)
        assert small.labels["grade"] == large.labels["grade"]
        if small.labels["count"] == large.labels["count"]:
            np.testing.assert_allclose(small.boxes * 2, large.boxes, atol=4)


def _check_scene_labels(scene: Scene, size: int) -> None:
    mask, boxes, labels = scene.mask, scene.boxes.astype(int), scene.box_labels
    n = len(boxes)
    # every box is the tight box of pixels of its type: each of its four edges touches such a pixel
    covered = np.zeros_like(mask, dtype=bool)
    for (x1, y1, x2, y2), t in zip(boxes, labels, strict=True):
        inside = mask[y1:y2, x1:x2] == t + 1
        assert inside.any(0)[[0, -1]].all() and inside.any(1)[[0, -1]].all()
        covered[y1:y2, x1:x2] |= mask[y1:y2, x1:x2] == t + 1
    # every foreground pixel lies inside a box of its own type
    assert np.array_equal(covered, mask > 0)
    type_area = np.bincount(mask.ravel(), minlength=K + 1)[1:]
    assert set(labels.tolist()) == set(np.flatnonzero(type_area).tolist())
    np.testing.assert_array_equal(scene.labels["objects"], (type_area > 0).astype(np.float32))
    assert scene.labels["objects"].dtype == np.float32
    assert scene.labels["count"] == n
    assert scene.labels["count_bin"] == int(np.searchsorted(COUNT_BIN_EDGES, n, side="right"))
    assert scene.labels["count_bin"] == (0 if n < 2 else 1 if n < 4 else 2 if n < 7 else 3)
    assert scene.labels["dominant"] == (int(type_area.argmax()) if n else K)
    assert 0 <= scene.labels["grade"] <= 2
    assert 0 <= scene.labels["size_bin"] <= 2
    if n == 0:
        assert scene.labels["size_bin"] == 0
        return
    # with no two boxes of one type overlapping, the pixels of a type in a box are that box's object
    same_type_overlap = any(
        labels[i] == labels[j]
        and min(boxes[i, 2], boxes[j, 2]) > max(boxes[i, 0], boxes[j, 0])
        and min(boxes[i, 3], boxes[j, 3]) > max(boxes[i, 1], boxes[j, 1])
        for i in range(n)
        for j in range(i)
    )
    if not same_type_overlap:
        areas = [
            int((mask[y1:y2, x1:x2] == t + 1).sum())
            for (x1, y1, x2, y2), t in zip(boxes, labels, strict=True)
        ]
        assert min(areas) >= MIN_VISIBLE_AREA
        median = float(np.median(np.sqrt(areas))) / size
        assert scene.labels["size_bin"] == int(np.searchsorted(SIZE_BIN_EDGES, median, side="right"))


@pytest.mark.parametrize("style", STYLES)
def test_labels_are_consistent_with_mask_and_boxes(style):
    for size, count in ((96, 40), (32, 15), (224, 5)):
        for index in range(count):
            _check_scene_labels(render_scene(style, 0, index, size), size)


def test_empty_scenes_and_label_balance():
    for style in ("radiograph", "histology"):
        scenes = [render_scene(style, 2, index, 32) for index in range(300)]
        empty = [s for s in scenes if s.labels["count"] == 0]
        assert 3 <= len(empty) <= 45
        for s in empty:
            assert not s.mask.any() and s.boxes.shape == (0, 4) and s.box_labels.shape == (0,)
            assert s.labels["dominant"] == K and s.labels["count_bin"] == 0 and s.labels["size_bin"] == 0
            assert not s.labels["objects"].any()
        for family in CLASSIFICATION:
            counts = np.bincount([s.labels[family] for s in scenes], minlength=num_classes(style, family))
            assert len(counts) == num_classes(style, family)
            assert counts.min() >= 3, (style, family, counts)
        presence = np.mean([s.labels["objects"] for s in scenes], axis=0)
        assert ((presence > 0.2) & (presence < 0.8)).all()


# ----------------------------------------------------------------------------------------------
# learnability with simple image statistics and a linear classifier

_TRAIN, _HELD_OUT = 300, 120
_QUANTILES = np.array([0.25, 0.5, 0.75, 0.9, 0.97])


def _features(image: np.ndarray) -> np.ndarray:
    """Colour means and deviations and quantiles of the Laplacian magnitude at three scales."""
    mean, std = cv2.meanStdDev(image)
    out = [mean.ravel(), std.ravel()]
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    for scale in (1, 2, 4):
        level = cv2.resize(
            gray, (gray.shape[1] // scale, gray.shape[0] // scale), interpolation=cv2.INTER_AREA
        )
        magnitude = np.abs(cv2.Laplacian(level, cv2.CV_32F)).ravel()
        ranks = (_QUANTILES * (magnitude.size - 1)).astype(int)
        out.append(np.partition(magnitude, ranks)[ranks])
    return np.concatenate(out)


def _linear_accuracy(x: np.ndarray, y: np.ndarray, train: int) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted by gradient descent on ``train``."""
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    x = np.hstack([x, np.ones((len(x), 1))])
    targets = np.eye(int(y.max()) + 1)[y[:train]]
    weights = np.zeros((x.shape[1], targets.shape[1]))
    for _ in range(1000):
        logits = x[:train] @ weights
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        weights -= 0.5 * (x[:train].T @ (p - targets) / train + 1e-3 * weights)
    return float(((x[train:] @ weights).argmax(1) == y[train:]).mean())


@pytest.fixture(scope="module")
def grade_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image features and grades of 420 scenes of every style at 128 x 128."""
    data = {}
    for style in STYLES:
        scenes = [render_scene(style, 0, index, 128) for index in range(_TRAIN + _HELD_OUT)]
        features = np.stack([_features(s.image) for s in scenes])
        data[style] = (features, np.array([s.labels["grade"] for s in scenes]))
    return data


@pytest.mark.parametrize("style", STYLES)
def test_grade_is_learnable_but_not_from_mean_intensity(style, grade_data):
    features, grades = grade_data[style]
    accuracy = _linear_accuracy(features, grades, _TRAIN)
    mean_only = _linear_accuracy(features[:, :3].mean(1, keepdims=True), grades, _TRAIN)
    assert accuracy > 0.6 and mean_only < 0.5, (accuracy, mean_only)


def test_count_bin_from_connected_components():
    """Counting bright blobs in fluorescence images predicts the count bin far above chance (~0.3)."""
    hits = 0
    for index in range(200):
        scene = render_scene("fluorescence", 5, index, 128)
        bright = (cv2.cvtColor(scene.image, cv2.COLOR_RGB2GRAY) > 0.2).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(bright)
        blobs = int((stats[1:, cv2.CC_STAT_AREA] >= 10).sum())
        hits += int(np.searchsorted(COUNT_BIN_EDGES, blobs, side="right")) == scene.labels["count_bin"]
    assert hits / 200 > 0.6


# ----------------------------------------------------------------------------------------------
# the dataset


@pytest.mark.parametrize("family", list(LABEL_FAMILIES))
def test_dataset_case_dicts(family):
    ds = SyntheticTaskDataset("ct", family, num_samples=6, image_size=48, seed=3)
    assert len(ds) == 6 and ds.kind == LABEL_FAMILIES[family]
    assert ds.class_names == class_names("ct", family) and ds.num_classes == len(ds.class_names)
    for i in range(len(ds)):
        case, scene = ds[i], ds.scene(i)
        image = case["image"]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 0.25 + 0.5, scene.image, atol=1e-6)
        if ds.kind == "classification":
            assert set(case) == {"image", "label"} and isinstance(case["label"], int)
            assert case["label"] == scene.labels[family] and 0 <= case["label"] < ds.num_classes
        elif ds.kind == "multilabel":
            assert set(case) == {"image", "label"} and case["label"].dtype == torch.float32
            assert case["label"].shape == (K,)
        elif ds.kind == "segmentation":
            assert set(case) == {"image", "mask"} and case["mask"].dtype == torch.int64
            assert case["mask"].shape == (48, 48) and int(case["mask"].max()) < ds.num_classes
        else:
            assert set(case) == {"image", "boxes", "box_labels"}
            assert case["boxes"].dtype == torch.float32 and case["box_labels"].dtype == torch.int64
            assert case["boxes"].shape == (len(case["box_labels"]), 4)


def test_dataset_detection_with_no_objects_has_empty_boxes():
    ds = SyntheticTaskDataset("dermoscopy", "detection", num_samples=200, image_size=32)
    empty = next(i for i in range(len(ds)) if ds.scene(i).labels["count"] == 0)
    case = ds[empty]
    assert case["boxes"].shape == (0, 4) and case["box_labels"].shape == (0,)


def test_dataset_single_channel_is_luminance():
    rgb = SyntheticTaskDataset("histology", "grade", num_samples=2, image_size=40)
    gray = SyntheticTaskDataset("histology", "grade", num_samples=2, image_size=40, channels=1)
    image = rgb[1]["image"] * 0.25 + 0.5
    luminance = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    assert gray[1]["image"].shape == (1, 40, 40)
    torch.testing.assert_close(gray[1]["image"][0] * 0.25 + 0.5, luminance, atol=1e-3, rtol=0)


def test_dataset_splits_are_disjoint_and_families_share_images():
    digests = {}
    for split in ("train", "val", "test"):
        ds = SyntheticTaskDataset("fluorescence", "grade", split=split, num_samples=64, image_size=32)
        digests[split] = {
            hashlib.sha256(ds[i]["image"].numpy().tobytes()).hexdigest() for i in range(len(ds))
        }
        assert len(digests[split]) == 64
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    seg = SyntheticTaskDataset("fluorescence", "segmentation", split="val", num_samples=4, image_size=32)
    grade = SyntheticTaskDataset("fluorescence", "grade", split="val", num_samples=4, image_size=32)
    assert torch.equal(seg[2]["image"], grade[2]["image"])
    other_seed = SyntheticTaskDataset(
        "fluorescence", "grade", split="val", num_samples=4, image_size=32, seed=1
    )
    assert not torch.equal(other_seed[2]["image"], grade[2]["image"])


def test_dataset_collates_with_default_collate():
    ds = SyntheticTaskDataset("radiograph", "dominant", num_samples=4, image_size=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"style": "mri"}, ValueError, r"style must be one of .*radiograph.*got 'mri'"),
        ({"family": "age"}, ValueError, r"family must be one of .*grade.*got 'age'"),
        ({"split": "dev"}, ValueError, r"split must be one of .*train.*got 'dev'"),
        ({"image_size": 16}, ValueError, r"image_size must be in \[32, 512\], got 16"),
        ({"image_size": 600}, ValueError, r"image_size must be in \[32, 512\], got 600"),
        ({"channels": 2}, ValueError, r"channels must be one of \[1, 3\], got 2"),
        ({"num_samples": 0}, ValueError, r"num_samples must be in \[1, \d+\], got 0"),
        ({"seed": -1}, ValueError, r"seed must be >= 0, got -1"),
        ({"image_size": 64.0}, TypeError, r"image_size must be an integer, got 64.0"),
    ],
)
def test_dataset_rejects_bad_arguments(kwargs, error, pattern):
    args = {"style": "ct", "family": "grade", **kwargs}
    with pytest.raises(error, match=pattern):
        SyntheticTaskDataset(**args)


def test_bad_indices_and_render_arguments():
    ds = SyntheticTaskDataset("ct", "grade", num_samples=3, image_size=32)
    for bad in (3, -1, 100):
        with pytest.raises(IndexError, match=rf"index must be in \[0, 3\), got {bad}"):
            ds[bad]
    with pytest.raises(ValueError, match=r"style must be one of .*got 'xray'"):
        render_scene("xray", 0, 0)
    with pytest.raises(ValueError, match=r"size must be in \[32, 512\], got 31"):
        render_scene("ct", 0, 0, 31)
    with pytest.raises(ValueError, match=r"index must be >= 0, got -2"):
        render_scene("ct", 0, -2)
    with pytest.raises(ValueError, match=r"family must be one of .*got 'box'"):
        class_names("ct", "box")
