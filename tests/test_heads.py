"""Task heads: shapes, norms, initial loss scale, ignore_index, metrics vs references, FCOS, overfitting."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import timm
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from heads import DEFAULT_HEADS, ClassificationHead, DetectionHead, MultiLabelHead, SegmentationHead, TaskHead
from heads.detection import FRESH_FCOS_LOSS, DetectionOutputs
from heads.segmentation import pad_to_pyramid

CHANNELS = (32, 64, 128, 256)
STRIDES = (4, 8, 16, 32)
NUM_CLASSES = 3
HEAD_KINDS = ("classification", "multilabel", "fpn", "unet", "detection")


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """The tensors here are tiny: one intra-op thread is faster and immune to CPU contention (2 threads
    on a busy 2-core machine made these tests up to 15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_head(kind: str, **kwargs: Any) -> TaskHead:
    """A small head of ``kind`` (segmentation kinds are named by decoder) for the test pyramid.

    Output layers start random (std ``INIT_STD``): the seed makes every head the same in every run.
    """
    torch.manual_seed(0)
    if kind == "classification":
        return ClassificationHead(CHANNELS, STRIDES, NUM_CLASSES, **kwargs)
    if kind == "multilabel":
        return MultiLabelHead(CHANNELS, STRIDES, NUM_CLASSES, **kwargs)
    if kind in ("fpn", "unet"):
        return SegmentationHead(CHANNELS, STRIDES, NUM_CLASSES, decoder=kind, decoder_channels=32, **kwargs)
    return DetectionHead(CHANNELS, STRIDES, NUM_CLASSES, fpn_channels=32, **kwargs)


def pyramid(batch: int, height: int, width: int, seed: int = 0) -> list[Tensor]:
    """Random features with the shapes of a Swin pyramid (strides 4-32) for an image size."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, height // s, width // s, generator=g)
        for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]


def random_batch(kind: str, batch: int, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """Random targets for ``kind``; detection boxes are inside the image and the last image has none."""
    g = torch.Generator().manual_seed(seed)
    if kind == "classification":
        return {"label": torch.arange(batch) % NUM_CLASSES}
    if kind == "multilabel":
        return {"label": torch.randint(0, 2, (batch, NUM_CLASSES), generator=g).float()}
    if kind in ("fpn", "unet"):
        return {"mask": torch.randint(0, NUM_CLASSES, (batch, height, width), generator=g)}
    boxes, labels = [], []
    size = torch.tensor([width, height], dtype=torch.float32)
    for i in range(batch):
        n = 0 if i == batch - 1 else 3
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(n, 2, generator=g) * size * 0.35
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, size)], dim=1))
        labels.append(torch.randint(0, NUM_CLASSES, (n,), generator=g))
    return {"boxes": boxes, "box_labels": labels}


def test_registry_resolves_to_task_heads() -> None:
    assert set(DEFAULT_HEADS) == {"classification", "multilabel", "segmentation", "detection"}
    for path in DEFAULT_HEADS.values():
        module, name = path.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), name), TaskHead)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_output_shapes(kind: str, size: tuple[int, int]) -> None:
    h, w = size
    head = make_head(kind, score_thresh=0.0) if kind == "detection" else make_head(kind)
    out = head(pyramid(2, h, w), size)
    if kind == "classification":
        assert out.shape == (2, NUM_CLASSES)
        probs = head.predict(out)  # a fresh head (small random classifier) predicts about uniformly
        assert torch.allclose(probs.sum(-1), torch.ones(2)) and (probs - 1 / NUM_CLASSES).abs().max() < 0.4
    elif kind == "multilabel":
        assert out.shape == (2, NUM_CLASSES)
        assert (head.predict(out) - 0.5).abs().max() < 0.4
    elif kind in ("fpn", "unet"):
        assert out.shape == (2, NUM_CLASSES, h, w)
        assert head.predict(out).shape == (2, h, w)
    else:
        locations = sum((h // s) * (w // s) for s in (8, 16, 32)) + math.ceil(h / 64) * math.ceil(w / 64)
        assert out.head_outputs["cls_logits"].shape == (2, locations, NUM_CLASSES)
        assert out.head_outputs["bbox_regression"].shape == (2, locations, 4)
        assert out.head_outputs["bbox_ctrness"].shape == (2, locations, 1)
        assert [a.shape for a in out.anchors] == [(locations, 4)] * 2
        assert head.strides == [8, 16, 32, 64]
        detections = head.predict(out)
        assert len(detections) == 2 and all(d["boxes"].shape == (100, 4) for d in detections)


@pytest.mark.parametrize("size", [(64, 96), (100, 100)])
def test_heads_on_a_real_swin_pyramid(size: tuple[int, int]) -> None:
    """Odd sizes give Swin levels of 25, 13, 7, 4 px: the FPN decoder must still align them."""
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        strict_img_size=False,
        embed_dim=32,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        img_size=64,
    )
    with torch.no_grad():
        features = swin.forward_intermediates(
            torch.randn(2, 3, *size), output_fmt="NCHW", intermediates_only=True, norm=True
        )
    assert [f.shape[1] for f in features] == list(CHANNELS)
    for kind in HEAD_KINDS:
        head = make_head(kind)
        out = head(features, size)
        assert torch.isfinite(head.loss(out, random_batch(kind, 2, *size)))
        if kind in ("fpn", "unet"):
            assert out.shape == (2, NUM_CLASSES, *size)


def test_pad_to_pyramid_pads_odd_swin_levels_and_keeps_even_ones() -> None:
    odd = [torch.ones(1, 2, n, n + 1) for n in (25, 13, 7, 4)]
    padded = pad_to_pyramid(odd)
    assert [tuple(p.shape[-2:]) for p in padded] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    assert all(torch.equal(p[..., : o.shape[-2], : o.shape[-1]], o) for p, o in zip(padded, odd, strict=True))
    assert padded[0].sum() == odd[0].sum()  # zeros only in the padded border
    even = pyramid(1, 64, 96)
    assert all(torch.equal(p, e) for p, e in zip(pad_to_pyramid(even), even, strict=True))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_no_batchnorm(kind: str) -> None:
    modules = list(make_head(kind).modules())
    assert not [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
    assert any(isinstance(m, norms) for m in modules)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_initial_scaled_loss_is_about_one(kind: str) -> None:
    head = make_head(kind)
    outputs = head(pyramid(4, 64, 96), (64, 96))
    scaled = head.default_loss_scale * head.loss(outputs, random_batch(kind, 4, 64, 96)).item()
    assert 0.5 <= scaled <= 1.5
    if kind != "detection":  # small random output layers: about uniform predictions
        assert scaled == pytest.approx(1.0, abs=0.4)


def test_detection_loss_scale_is_measured_fresh_loss() -> None:
    head = make_head("detection")
    out = head(pyramid(4, 64, 96), (64, 96))
    terms = head.fcos.compute_loss(
        head.targets(random_batch("detection", 4, 64, 96)),
        out.head_outputs,
        out.anchors,
        out.num_anchors_per_level,
    )
    assert terms["classification"].item() == pytest.approx(0.25 * 0.99**2 * math.log(100), rel=0.1)
    assert terms["bbox_regression"].item() == pytest.approx(0.9, abs=0.1)
    assert terms["bbox_ctrness"].item() == pytest.approx(math.log(2), abs=0.05)
    assert head.default_loss_scale == pytest.approx(1 / FRESH_FCOS_LOSS)


@pytest.mark.parametrize("decoder", ["fpn", "unet"])
def test_segmentation_ignores_ignore_index_in_loss_and_metrics(decoder: str) -> None:
    head = make_head(decoder, ignore_index=255)
    batch = random_batch(decoder, 2, 32, 32)
    ignored = torch.zeros(2, 32, 32, dtype=torch.bool)
    ignored[:, :, :10] = True
    batch["mask"][ignored] = 255
    logits = torch.randn(2, NUM_CLASSES, 32, 32, requires_grad=True)
    changed = logits.detach().clone()
    changed[ignored.unsqueeze(1).expand_as(changed)] = 50 * torch.randn(int(ignored.sum()) * NUM_CLASSES)
    loss = head.loss(logits, batch)
    assert head.loss(changed, batch).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[ignored.unsqueeze(1).expand_as(logits)].abs().max() == 0
    results = []
    for out in (logits.detach(), changed):
        metrics = head.build_metrics()
        head.update_metrics(metrics, out, batch)
        results.append({k: float(v) for k, v in metrics.compute().items()})
    assert results[0] == results[1]


def test_segmentation_all_pixels_ignored_gives_finite_loss() -> None:
    head = make_head("fpn")
    mask = torch.full((1, 16, 16), 255)
    assert torch.isfinite(head.loss(torch.randn(1, NUM_CLASSES, 16, 16), {"mask": mask}))


@pytest.mark.parametrize("absent_class", [False, True])
def test_segmentation_metrics_match_numpy(absent_class: bool) -> None:
    head = make_head("fpn")
    rng = np.random.default_rng(0)
    target = rng.integers(0, NUM_CLASSES, (2, 12, 12))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, NUM_CLASSES, target.shape))
    if absent_class:  # class 2 neither in the masks nor in the predictions: not averaged
        target[target == 2], pred[pred == 2] = 0, 1
    target[:, :3] = 255
    logits = 10 * nn.functional.one_hot(torch.from_numpy(pred), NUM_CLASSES).permute(0, 3, 1, 2).float()
    metrics = head.build_metrics()
    head.update_metrics(metrics, logits, {"mask": torch.from_numpy(target)})
    result = metrics.compute()
    valid = target != 255
    p, t = pred[valid], target[valid]
    tp = np.array([np.sum((p == c) & (t == c)) for c in range(NUM_CLASSES)])
    fp = np.array([np.sum((p == c) & (t != c)) for c in range(NUM_CLASSES)])
    fn = np.array([np.sum((p != c) & (t == c)) for c in range(NUM_CLASSES)])
    present = tp + fp + fn > 0
    assert present.sum() == (2 if absent_class else 3)
    dice, iou = 2 * tp / np.maximum(2 * tp + fp + fn, 1), tp / np.maximum(tp + fp + fn, 1)
    assert float(result["dice"]) == pytest.approx(dice[present].mean(), abs=1e-6)
    assert float(result["iou"]) == pytest.approx(iou[present].mean(), abs=1e-6)


def rank_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC as the probability that a positive outranks a negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    return float(np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])))


def f1(pred: np.ndarray, positive: np.ndarray) -> float:
    tp, fp, fn = np.sum(pred & positive), np.sum(pred & ~positive), np.sum(~pred & positive)
    return float(2 * tp / (2 * tp + fp + fn))


def test_classification_metrics_match_reference() -> None:
    head = make_head("classification")
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(40, NUM_CLASSES, generator=g), torch.arange(40) % NUM_CLASSES
    metrics = head.build_metrics()
    head.update_metrics(metrics, logits, {"label": labels})
    result = metrics.compute()
    probs, y = head.predict(logits).numpy(), labels.numpy()
    pred = probs.argmax(1)
    assert float(result["accuracy"]) == pytest.approx(np.mean(pred == y), abs=1e-6)
    assert float(result["f1"]) == pytest.approx(np.mean([f1(pred == c, y == c) for c in range(3)]), abs=1e-6)
    auroc = np.mean([rank_auroc(probs[:, c], y == c) for c in range(3)])
    assert float(result["auroc"]) == pytest.approx(auroc, abs=1e-5)


def test_multilabel_metrics_match_reference() -> None:
    head = make_head("multilabel")
    g = torch.Generator().manual_seed(2)
    logits, labels = (
        torch.randn(40, NUM_CLASSES, generator=g),
        torch.randint(0, 2, (40, NUM_CLASSES), generator=g),
    )
    metrics = head.build_metrics()
    head.update_metrics(metrics, logits, {"label": labels.float()})
    result = metrics.compute()
    probs, y = head.predict(logits).numpy(), labels.numpy().astype(bool)
    assert float(result["f1"]) == pytest.approx(
        np.mean([f1(probs[:, k] > 0.5, y[:, k]) for k in range(3)]), abs=1e-6
    )
    assert float(result["auroc"]) == pytest.approx(
        np.mean([rank_auroc(probs[:, k], y[:, k]) for k in range(3)]), abs=1e-5
    )


def crafted_outputs(
    head: DetectionHead, size: tuple[int, int], boxes: Tensor, labels: Tensor, scores: Tensor
) -> DetectionOutputs:
    """Head outputs of one image that decode to exactly ``boxes`` with ``scores`` (all else ~0)."""
    out = head(pyramid(1, *size), size)
    locations = out.anchors[0].shape[0]
    cls_logits = torch.full((1, locations, NUM_CLASSES), -20.0)
    regression = torch.zeros(1, locations, 4)
    rows = torch.arange(len(boxes)) * 3  # distinct locations of the finest level
    cls_logits[0, rows, labels] = torch.logit(scores**2)  # score = sqrt(p_class * p_centerness)
    regression[0, rows] = head.fcos.box_coder.encode(out.anchors[0][rows], boxes)
    outputs = {
        "cls_logits": cls_logits,
        "bbox_regression": regression,
        "bbox_ctrness": torch.full((1, locations, 1), 30.0),
    }
    return DetectionOutputs(outputs, out.anchors, out.num_anchors_per_level, size)


def test_detection_empty_images_give_finite_loss_and_gradients() -> None:
    head = make_head("detection")
    features = pyramid(2, 64, 64)
    empty = {
        "boxes": [torch.zeros(0, 4), torch.zeros(0, 4)],
        "box_labels": [torch.zeros(0, dtype=torch.long)] * 2,
    }
    for batch in (empty, random_batch("detection", 2, 64, 64)):
        head.zero_grad()
        loss = head.loss(head(features, (64, 64)), batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    assert head.loss(head(features, (64, 64)), empty).item() < 0.01  # only focal negatives at the 0.01 prior


def test_detection_predictions_respect_image_threshold_and_count() -> None:
    head = make_head("detection", score_thresh=0.05, detections_per_img=7)
    out = head(pyramid(2, 64, 96), (64, 96))
    out.head_outputs["bbox_regression"] = (
        out.head_outputs["bbox_regression"] + 5.0
    )  # boxes far past the borders
    for det in head.predict(out):
        assert 0 < len(det["boxes"]) <= 7
        assert (det["scores"] >= 0.05).all()
        assert (
            (det["boxes"] >= 0).all()
            and (det["boxes"][:, [0, 2]] <= 96).all()
            and (det["boxes"][:, [1, 3]] <= 64).all()
        )
        assert set(det) == {"boxes", "scores", "labels"} and det["labels"].dtype == torch.int64
    high = make_head("detection", score_thresh=0.5)
    assert all(len(d["boxes"]) == 0 for d in high.predict(high(pyramid(1, 64, 96), (64, 96))))


def test_detection_nms_removes_a_duplicate_box() -> None:
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [11.0, 10.0, 41.0, 40.0], [50.0, 20.0, 90.0, 60.0]])
    labels, scores = torch.tensor([1, 1, 1]), torch.tensor([0.9, 0.8, 0.7])
    kept = []
    for nms_thresh in (0.6, 1.0):
        head = make_head("detection", nms_thresh=nms_thresh)
        det = head.predict(crafted_outputs(head, (64, 96), boxes, labels, scores))[0]
        kept.append(det)
    assert torch.allclose(kept[0]["boxes"], boxes[[0, 2]], atol=1e-3)
    assert torch.allclose(kept[0]["scores"], scores[[0, 2]], atol=1e-4)
    assert len(kept[1]["boxes"]) == 3  # nms_thresh=1.0 keeps the duplicate


def coco_map(
    gts: list[tuple[Tensor, Tensor]], dets: list[tuple[Tensor, Tensor, Tensor]]
) -> tuple[float, float]:
    """mAP@[.5:.95] and mAP@.5 from pycocotools' COCOeval."""

    def xywh(b: Tensor) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    images, annotations, results = [], [], []
    for i, ((gt_boxes, gt_labels), (boxes, labels, scores)) in enumerate(zip(gts, dets, strict=True)):
        images.append({"id": i, "width": 96, "height": 64})
        for b, c in zip(gt_boxes, gt_labels, strict=True):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": xywh(b),
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        results += [
            {"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
            for b, c, s in zip(boxes, labels, scores, strict=True)
        ]
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c} for c in range(NUM_CLASSES)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


def test_detection_map_perfect_is_one_and_matches_pycocotools() -> None:
    head = make_head("detection", score_thresh=0.05)
    gt_boxes = [
        torch.tensor([[4.0, 4.0, 30.0, 28.0], [40.0, 10.0, 90.0, 60.0]]),
        torch.tensor([[20.0, 20.0, 60.0, 50.0]]),
    ]
    gt_labels = [torch.tensor([0, 2]), torch.tensor([1])]
    batches = [{"boxes": [b], "box_labels": [c]} for b, c in zip(gt_boxes, gt_labels, strict=True)]

    perfect = head.build_metrics()
    for b, c, batch in zip(gt_boxes, gt_labels, batches, strict=True):
        head.update_metrics(perfect, crafted_outputs(head, (64, 96), b, c, torch.full((len(b),), 0.9)), batch)
    result = perfect.compute()
    assert set(result) == {"map", "map_50", "map_75", "mar_100"} and all(
        v.numel() == 1 for v in result.values()
    )
    assert float(result["map"]) == pytest.approx(1.0)

    shifted = head.build_metrics()
    dets = [
        (
            torch.tensor([[6.0, 5.0, 31.0, 30.0], [48.0, 14.0, 96.0, 62.0], [60.0, 2.0, 80.0, 20.0]]),
            torch.tensor([0, 2, 0]),
            torch.tensor([0.6, 0.8, 0.9]),
        ),
        (torch.tensor([[24.0, 22.0, 62.0, 54.0]]), torch.tensor([1]), torch.tensor([0.7])),
    ]
    for (boxes, labels, scores), batch in zip(dets, batches, strict=True):
        outputs = crafted_outputs(head, (64, 96), boxes, labels, scores)
        assert torch.allclose(
            head.predict(outputs)[0]["boxes"], boxes[scores.argsort(descending=True)], atol=1e-3
        )
        head.update_metrics(shifted, outputs, batch)
    result = shifted.compute()
    reference = coco_map(list(zip(gt_boxes, gt_labels, strict=True)), dets)
    assert 0 < float(result["map"]) < 1
    assert (float(result["map"]), float(result["map_50"])) == pytest.approx(reference, abs=1e-4)


def structured_batch(kind: str) -> dict[str, Any]:
    """A 2-image 32x48 batch a head can fit: block masks, two boxes and an empty image, random labels."""
    if kind in ("fpn", "unet"):
        mask = torch.zeros(2, 32, 48, dtype=torch.long)
        mask[0, 8:24, 8:24], mask[0, :, 32:] = 1, 2
        mask[1, 16:, :24], mask[1, :16, 24:40] = 2, 1
        return {"mask": mask}
    if kind == "detection":
        boxes = [torch.tensor([[4.0, 4.0, 28.0, 24.0], [30.0, 8.0, 46.0, 30.0]]), torch.zeros(0, 4)]
        return {"boxes": boxes, "box_labels": [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]}
    return random_batch(kind, 2, 32, 48)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_overfits_a_fixed_batch(kind: str) -> None:
    torch.manual_seed(0)
    head = make_head(kind)
    features, batch = pyramid(2, 32, 48), structured_batch(kind)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = head.loss(head(features, (32, 48)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


BAD_ARGUMENTS: list[tuple[type[TaskHead], dict[str, Any], str]] = [
    (ClassificationHead, {"num_classes": 1}, r"ClassificationHead: num_classes must be >= 2, got 1"),
    (ClassificationHead, {"dropout": 1.0}, r"ClassificationHead: dropout .* got 1.0"),
    (ClassificationHead, {"label_smoothing": -0.1}, r"ClassificationHead: label_smoothing .* got -0.1"),
    (ClassificationHead, {"reductions": STRIDES[:3]}, r"ClassificationHead: in_channels .* reductions"),
    (MultiLabelHead, {"num_classes": 1}, r"MultiLabelHead: num_classes must be >= 2, got 1"),
    (
        MultiLabelHead,
        {"pos_weight": [1.0, 2.0]},
        r"MultiLabelHead: pos_weight .*num_classes=3 .* \[1.0, 2.0\]",
    ),
    (SegmentationHead, {"decoder": "deeplab"}, r"SegmentationHead: decoder must be one of .* 'deeplab'"),
    (SegmentationHead, {"num_classes": 1}, r"SegmentationHead: num_classes must be >= 2 .* got 1"),
    (SegmentationHead, {"ignore_index": 2}, r"SegmentationHead: ignore_index=2 collides"),
    (SegmentationHead, {"decoder_channels": 48}, r"SegmentationHead: .*divisible by 32.* got 48"),
    (
        SegmentationHead,
        {"in_channels": CHANNELS[1:], "reductions": STRIDES[1:]},
        r"'fpn' needs >= 4 pyramid levels",
    ),
    (SegmentationHead, {"dice_weight": 0, "ce_weight": 0}, r"SegmentationHead: dice_weight and ce_weight"),
    (DetectionHead, {"levels": (1, 4)}, r"DetectionHead: levels .* got \[1, 4\]"),
    (DetectionHead, {"levels": (2, 1)}, r"DetectionHead: levels .* got \[2, 1\]"),
    (DetectionHead, {"levels": ()}, r"DetectionHead: levels .* got \[\]"),
    (DetectionHead, {"fpn_channels": 16}, r"DetectionHead: fpn_channels .* got 16"),
    (DetectionHead, {"extra_levels": -1}, r"DetectionHead: extra_levels .* got -1"),
    (DetectionHead, {"score_thresh": 1.5}, r"DetectionHead: score_thresh .* got 1.5"),
    (DetectionHead, {"nms_thresh": 0.0}, r"DetectionHead: nms_thresh .* got 0.0"),
    (DetectionHead, {"detections_per_img": 0}, r"DetectionHead: detections_per_img .* got 0"),
    (DetectionHead, {"topk_candidates": 0}, r"DetectionHead: topk_candidates .* got 0"),
    (DetectionHead, {"center_sampling_radius": 0}, r"DetectionHead: center_sampling_radius .* got 0"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_raise_clear_errors(cls: type[TaskHead], kwargs: dict[str, Any], message: str) -> None:
    arguments = {"in_channels": CHANNELS, "reductions": STRIDES, "num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=message):
        cls(**arguments)


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("classification", "label"),
        ("multilabel", "label"),
        ("fpn", "mask"),
        ("unet", "mask"),
        ("detection", "boxes"),
    ],
)
def test_missing_target_key_names_the_key_and_the_keys_present(kind: str, key: str) -> None:
    head = make_head(kind)
    out = head(pyramid(1, 64, 96), (64, 96))
    with pytest.raises(
        KeyError, match=rf"{type(head).__name__}: the batch has no target '{key}'.*'image', 'mask_x'"
    ):
        head.loss(out, {"image": torch.zeros(1, 3, 32, 32), "mask_x": None})
    with pytest.raises(KeyError, match=key):
        head.update_metrics(head.build_metrics(), out, {"image": torch.zeros(1, 3, 32, 32)})


@pytest.mark.parametrize(
    ("boxes", "labels", "message"),
    [
        ([[10.0, 10.0, 10.0, 20.0]], [0], "image 0 has a box with non-positive width or height"),
        ([[10.0, 10.0, 20.0, 20.0]], [3], r"image 0 has labels outside \[0, 2\]: \[3\]"),
        ([[10.0, 10.0, 20.0, 20.0]], [0, 1], "image 0 has 1 boxes but 2 labels"),
    ],
)
def test_detection_rejects_bad_targets(boxes: list[list[float]], labels: list[int], message: str) -> None:
    head = make_head("detection")
    batch = {"boxes": [torch.tensor(boxes)], "box_labels": [torch.tensor(labels)]}
    with pytest.raises(ValueError, match=rf"DetectionHead: {message}"):
        head.loss(head(pyramid(1, 64, 96), (64, 96)), batch)
