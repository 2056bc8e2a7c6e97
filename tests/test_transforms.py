"""Transforms keep image, mask and boxes aligned; presets, determinism, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umedpt.data.normalize import WINDOWS, ImageMeta, Normalization
from umedpt.data.readers import SegmentationDataset
from umedpt.data.transforms import MASK_FILL, PRESETS, CaseTransform

pytest_plugins = ["tests.data"]  # the data_files session fixture

BOX = (12, 10, 30, 22)  # x1, y1, x2, y2 of the bright object


def scene(channels: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 48x64 dark [0, 1] image with one bright rectangle, its mask and its box."""
    image = np.full((48, 64, channels), 0.1, np.float32)
    mask = np.zeros((48, 64), np.uint16)
    x1, y1, x2, y2 = BOX
    image[y1:y2, x1:x2] = 0.9
    mask[y1:y2, x1:x2] = 1
    return image, mask, np.array([BOX], np.float32)


def assert_aligned(out: dict[str, np.ndarray]) -> None:
    """The object's mask pixels lie in its box (pixel centers, 1 px of interpolation slack) and are the bright ones."""
    image, mask = out["image"].mean(axis=-1), out["mask"]
    assert set(np.unique(mask).tolist()) <= {0, 1, MASK_FILL}
    inside = mask == 1
    assert inside.sum() > 20
    assert image[inside].mean() > image[mask == 0].mean() + 0.3
    assert len(out["boxes"]) == 1 and out["box_labels"].tolist() == [1]
    x1, y1, x2, y2 = out["boxes"][0]
    ys, xs = np.nonzero(inside)
    assert x1 - 1 <= xs.min() + 0.5 and xs.max() + 0.5 <= x2 + 1
    assert y1 - 1 <= ys.min() + 0.5 and ys.max() + 0.5 <= y2 + 1
    h, w = mask.shape
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_flip_moves_box_and_mask_with_the_object():
    image, mask, boxes = scene()
    flip = CaseTransform([{"name": "HorizontalFlip", "p": 1.0}], image_size=None, train=True, boxes=True)
    out = flip(image, mask, boxes, np.array([1]), seed=0)
    x1, y1, x2, y2 = BOX
    np.testing.assert_allclose(out["boxes"], [[64 - x2, y1, 64 - x1, y2]])
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1])
    bright = out["image"][..., 0] > 0.5
    np.testing.assert_array_equal(bright, out["mask"] == 1)
    assert_aligned(out)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_keep_image_mask_and_boxes_aligned(preset, channels):
    image, mask, boxes = scene(channels)
    train = CaseTransform(preset, image_size=40, train=True, boxes=True, channels=channels)
    outputs = [train(image, mask, boxes, np.array([1]), seed=seed) for seed in range(12)]
    for out in outputs:
        assert out["image"].shape == (40, 40, channels) and out["image"].dtype == np.float32
        assert out["mask"].shape == (40, 40)
        assert_aligned(out)
    if preset != "none":
        assert any(not np.array_equal(outputs[0]["image"], o["image"]) for o in outputs[1:])
    again = train(image, mask, boxes, np.array([1]), seed=3)
    np.testing.assert_array_equal(again["image"], outputs[3]["image"])  # a seed fixes the draw
    val = CaseTransform(preset, image_size=40, train=False, boxes=True, channels=channels)
    first, second = (val(image, mask, boxes, np.array([1]), seed=s) for s in (0, 1))
    np.testing.assert_array_equal(first["image"], second["image"])  # validation is deterministic
    np.testing.assert_allclose(first["boxes"], [[b * 40 / s for b, s in zip(BOX, (64, 48, 64, 48), strict=True)]], atol=1e-4)


def test_transforms_draw_independently():
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    flips = CaseTransform([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}], None, train=True)
    outputs = {flips(image, seed=seed)["image"].tobytes() for seed in range(64)}
    assert len(outputs) == 4  # all four flip combinations, not just "both or none"


def test_letterbox_keeps_the_aspect_ratio_and_pads_masks_as_ignored():
    image, mask, boxes = scene()
    out = CaseTransform("none", image_size=32, resize="letterbox", boxes=True)(image, mask, boxes, np.array([1]))
    assert out["image"].shape == (32, 32, 3)
    rows = np.flatnonzero((out["mask"] != MASK_FILL).any(axis=1))
    assert len(rows) == 24  # 48x64 -> 24x32, padded top and bottom
    np.testing.assert_allclose(out["boxes"], [[b / 2 + (4 if k % 2 else 0) for k, b in enumerate(BOX)]])
    assert_aligned(out)


def test_transform_spec_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'xrays'; expected one of \['ct', "):
        CaseTransform("xrays")
    with pytest.raises(ValueError, match=r"transform\[0\]: 'Nope' is not an albumentations transform"):
        CaseTransform([{"name": "Nope"}])
    with pytest.raises(ValueError, match=r"transform\[1\]: expected a mapping with 'name'"):
        CaseTransform([{"name": "HorizontalFlip"}, "VerticalFlip"])
    with pytest.raises(ValueError, match=r"resize: expected 'stretch' or 'letterbox'"):
        CaseTransform(image_size=32, resize="crop")


def test_reader_augmentation_fills_ignore_index_and_follows_torch_seed(data_files):
    files = data_files["segmentation"]
    rotate = [{"name": "Affine", "rotate": [40, 40], "fill_mask": MASK_FILL, "p": 1.0}]
    ds = SegmentationDataset(str(files["images"]), str(files["masks"]), num_classes=3, mask_suffix="_mask",
                             image_size=48, transform=rotate, ignore_index=99,
                             mask_values={0: 0, 1: 1, 2: 2, 255: 99})
    mask = ds[1]["mask"]
    assert (mask == 99).sum() > 100 and set(mask.unique().tolist()) <= {0, 1, 2, 99}  # corners brought in
    crop = SegmentationDataset(str(files["images"]), str(files["masks"]), num_classes=3, mask_suffix="_mask",
                               image_size=48, transform="ct")
    torch.manual_seed(5)
    first = [crop[1]["image"] for _ in range(4)]
    torch.manual_seed(5)
    second = [crop[1]["image"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # reproducible under seed_everything
    assert not all(torch.equal(first[0], a) for a in first[1:])  # yet every draw differs


def test_normalisation_methods():
    ramp = np.arange(-1000, 1001, dtype=np.int16).reshape(1, -1)
    soft = Normalization.from_spec("soft_tissue").to_unit(ramp)
    center, width = WINDOWS["soft_tissue"]
    np.testing.assert_allclose(soft, np.clip((ramp - center + width / 2) / width, 0, 1), atol=1e-6)
    big_endian = Normalization.from_spec("soft_tissue").to_unit(ramp.astype(">i2"))  # e.g. NIfTI files
    np.testing.assert_array_equal(big_endian, soft)
    explicit = Normalization.from_spec({"method": "window", "center": 0, "width": 2000}).to_unit(ramp)
    np.testing.assert_allclose(explicit, (ramp + 1000) / 2000, atol=1e-6)
    assert Normalization.from_spec("auto").to_unit(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    twelve_bit = Normalization.from_spec({"method": "range", "min": 0, "max": 4095})
    np.testing.assert_allclose(twelve_bit.to_unit(np.array([[0, 4095, 8000]], np.uint16)), [[0, 1, 1]])
    spiky = np.zeros((100, 100), np.float32)
    spiky[0, 0] = 1e6  # one hot pixel does not flatten the percentile scaling
    spiky[50:] = 10
    unit = Normalization.from_spec("percentile").to_unit(spiky)
    assert unit[99, 99] == 1.0 and unit[0, 1] == 0.0
    inverted = Normalization().to_unit(np.array([[0, 100]], np.int16), ImageMeta(window=(50, 100), invert=True))
    np.testing.assert_allclose(inverted, [[1.0, 0.0]])
    imagenet = Normalization.from_spec({"method": "minmax", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    np.testing.assert_allclose(imagenet.standardize(np.full((2, 2, 3), 0.485, np.float32))[..., 0], 0.0, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lungs", r"'lungs' is neither a method"),
        ({"method": "window", "center": 40}, r"give both center and width"),
        ({"method": "percentile", "low": 99, "high": 1}, r"percentiles need 0 <= low < high <= 100"),
        ({"methd": "minmax"}, r"unknown keys \['methd'\]"),
        ({"std": [0.2, 0.0, 0.2]}, r"std > 0"),
    ],
)
def test_normalisation_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        Normalization.from_spec(spec)
    with pytest.raises(ValueError, match=r"method 'range' on float32 images needs min and max"):
        Normalization(method="range").to_unit(np.zeros((2, 2), np.float32))
