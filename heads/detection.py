"""Object detection head: torchvision's FCOS on an FPN over the encoder pyramid.

All of FCOS is reused from torchvision: the head is a real
:class:`torchvision.models.detection.FCOS` whose ``backbone`` is an FPN over the chosen encoder
levels (:class:`PyramidFPN`). Only ``FCOS.forward`` is bypassed, because it resizes images and
runs a backbone on them; :meth:`DetectionHead.forward` runs the FPN, ``FCOS.head`` and
``FCOS.anchor_generator`` on the encoder features instead, and the loss and post-processing are
``FCOS.compute_loss`` (center sampling, sigmoid focal loss, GIoU loss, centerness BCE) and
``FCOS.postprocess_detections`` (score threshold, top-k, box decoding, clipping, batched NMS).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from heads.base import TaskHead

__all__ = [
    "DetectionHead",
    "DetectionMAP",
    "DetectionOutputs",
    "ExtraLevels",
    "PositiveBoxRegression",
    "PyramidFPN",
]

#: Loss of a fresh FCOS head per image with boxes, each term normalised by the number of positive
#: locations: sigmoid focal loss of a positive at the prior probability 0.01 (alpha 0.25, gamma 2)
#: + GIoU loss of the fresh box (``ln 2`` strides from its point on each side, see
#: :class:`PositiveBoxRegression`) inside a larger target (about 0.9) + centerness BCE at logit 0 (ln 2).
FRESH_FCOS_LOSS: float = 0.25 * 0.99**2 * -math.log(0.01) + 0.9 + math.log(2.0)


class ExtraLevels(ExtraFPNBlock):
    """``LastLevelP6P7`` for any number of extra levels: stride-2 3x3 convolutions on the last FPN output.

    Args:
        channels: FPN width.
        num_levels: how many levels to add (each halves the resolution).
    """

    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_levels)
        )
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append the extra levels (ReLU between them, as in ``LastLevelP6P7``) to ``p`` and ``names``."""
        x = p[-1]
        for i, conv in enumerate(self.convs):
            x = conv(F.relu(x) if i else x)
            p.append(x)
            names.append(f"extra{i}")
        return p, names


class PositiveBoxRegression(nn.Conv2d):
    """The box-regression convolution of the FCOS head, with a softplus on its output.

    torchvision's ``FCOSRegressionHead`` clamps the regressed box distances with a ReLU. A ReLU
    output that is negative at every location gives boxes of zero width and height, and no
    gradient reaches the branch again: under a high head learning rate one task's regression
    died this way within a run. Softplus keeps every distance positive with a non-zero gradient,
    so the ReLU that follows is the identity and the branch cannot die. A fresh head predicts
    distances of ``softplus(0) = ln 2`` strides (a box about 1.4 strides wide).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(super().forward(x))

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> PositiveBoxRegression:
        """A copy of ``conv`` (same shape and weights) with the softplus output."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            bias=conv.bias is not None,
        )
        new.load_state_dict(conv.state_dict())
        return new


class PyramidFPN(nn.Module):
    """FPN (no norm) over some levels of an encoder pyramid, plus extra coarser levels.

    Args:
        in_channels: channels of every encoder level.
        levels: indices of the encoder levels the FPN reads.
        out_channels: FPN width (``out_channels`` attribute, as ``FCOS`` expects of a backbone).
        extra_levels: number of stride-2 levels added on top of the coarsest FPN level.
    """

    def __init__(
        self, in_channels: Sequence[int], levels: Sequence[int], out_channels: int, extra_levels: int
    ) -> None:
        super().__init__()
        self.levels = list(levels)
        self.out_channels = out_channels
        extra = ExtraLevels(out_channels, extra_levels) if extra_levels else None
        self.fpn = FeaturePyramidNetwork(
            [in_channels[i] for i in self.levels], out_channels, extra_blocks=extra
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """FPN maps, finest first."""
        return list(self.fpn(OrderedDict((str(i), features[i]) for i in self.levels)).values())


@dataclass
class DetectionOutputs:
    """What :meth:`DetectionHead.forward` returns.

    Attributes:
        head_outputs: ``FCOSHead`` outputs: ``cls_logits`` (B, A, C), ``bbox_regression`` (B, A, 4),
            ``bbox_ctrness`` (B, A, 1), all levels concatenated (A anchor points).
        anchors: per image, the (A, 4) anchors (one per location, size = level stride).
        num_anchors_per_level: locations per FPN level.
        image_size: (H, W) of the input images.
    """

    head_outputs: dict[str, Tensor]
    anchors: list[Tensor]
    num_anchors_per_level: list[int]
    image_size: tuple[int, int]


class DetectionMAP(MeanAveragePrecision):
    """``MeanAveragePrecision`` (xyxy boxes, bbox IoU, faster-coco-eval backend) reduced to scalars.

    ``compute`` returns only :attr:`summary_keys`, so every value is a 0-d tensor that can be
    logged (the full result also holds the list of classes and per-class placeholders).
    """

    summary_keys: tuple[str, ...] = ("map", "map_50", "map_75", "mar_100")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", **kwargs)

    def compute(self) -> dict[str, Tensor]:
        """The summary metrics (COCO mAP@[.5:.95], mAP@.5, mAP@.75, mAR@100)."""
        result = super().compute()
        return {key: result[key] for key in self.summary_keys}


class DetectionHead(TaskHead):
    """FCOS detection of ``batch["boxes"]`` (list of (n_i, 4) xyxy pixel boxes) and ``batch["box_labels"]``.

    Args:
        in_channels: channels of each pyramid level of the encoder (strides ascending).
        reductions: stride of each pyramid level relative to the input image.
        num_classes: number of object classes (labels ``0 .. num_classes - 1``, no background class).
        fpn_channels: width of the FPN and of the FCOS head (a multiple of 32: GroupNorm(32)).
        levels: encoder levels the FPN reads (strictly increasing indices); (1, 2, 3) = strides 8-32.
        extra_levels: stride-2 levels added above the coarsest one (1: stride 64 for Swin).
        score_thresh: minimum score of a detection (score = sqrt(class prob * centerness)).
        nms_thresh: IoU above which ``batched_nms`` drops the lower-scoring box of a class.
        detections_per_img: maximum detections per image after NMS.
        topk_candidates: maximum candidates per level before NMS.
        center_sampling_radius: FCOS center sampling radius, in strides.
        head_convs: 3x3 convolutions (with GroupNorm and ReLU) in each of the FCOS classification
            and regression towers (FCOS uses 4; fewer make the head cheaper on small images).

    The loss is the sum of FCOS's three terms (focal classification, GIoU regression, centerness
    BCE), each divided by the number of positive locations. A fresh head gives about
    :data:`FRESH_FCOS_LOSS` (~2.73) on images with boxes, so ``default_loss_scale`` is its inverse;
    images without boxes contribute only classification negatives (about 0 at init).
    Boxes must have positive width and height and labels must be in range (``ValueError`` otherwise).
    Anchor strides are exact when the image size is a multiple of the coarsest stride.
    Metrics: :class:`DetectionMAP` under the name ``map`` (logs ``map``, ``map_50``, ``map_75``, ``mar_100``).
    """

    target_keys = ("boxes", "box_labels")

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        fpn_channels: int = 128,
        levels: Sequence[int] = (1, 2, 3),
        extra_levels: int = 1,
        score_thresh: float = 0.2,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        center_sampling_radius: float = 1.5,
        head_convs: int = 4,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes)
        levels, n = list(levels), len(self.in_channels)
        checks = [
            (
                bool(levels) and levels == sorted(set(levels)) and levels[0] >= 0 and levels[-1] < n,
                f"levels must be strictly increasing indices in [0, {n - 1}] (the encoder has {n} levels), "
                f"got {levels}",
            ),
            (
                fpn_channels >= 32 and fpn_channels % 32 == 0,
                f"fpn_channels must be a positive multiple of 32 (GroupNorm(32)), got {fpn_channels}",
            ),
            (extra_levels >= 0, f"extra_levels must be >= 0, got {extra_levels}"),
            (0.0 <= score_thresh < 1.0, f"score_thresh must be in [0, 1), got {score_thresh}"),
            (0.0 < nms_thresh <= 1.0, f"nms_thresh must be in (0, 1], got {nms_thresh}"),
            (detections_per_img >= 1, f"detections_per_img must be >= 1, got {detections_per_img}"),
            (topk_candidates >= 1, f"topk_candidates must be >= 1, got {topk_candidates}"),
            (center_sampling_radius > 0, f"center_sampling_radius must be > 0, got {center_sampling_radius}"),
            (head_convs >= 0, f"head_convs must be >= 0, got {head_convs}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"DetectionHead: {problem}")
        top = self.reductions[levels[-1]]
        strides = [self.reductions[i] for i in levels] + [top * 2**k for k in range(1, extra_levels + 1)]
        self.levels = levels
        self.strides = strides
        self.fcos = FCOS(
            PyramidFPN(self.in_channels, levels, fpn_channels, extra_levels),
            num_classes,
            anchor_generator=AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides)),
            head=FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs),
            center_sampling_radius=center_sampling_radius,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        regression = self.fcos.head.regression_head
        regression.bbox_reg = PositiveBoxRegression.replacing(regression.bbox_reg)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> DetectionOutputs:
        """FCOS head outputs and anchors for the FPN built on ``features``."""
        pyramid = self.fcos.backbone(features)
        head_outputs = self.fcos.head(pyramid)
        size = (int(image_size[0]), int(image_size[1]))
        batch = pyramid[0].shape[0]
        images = ImageList(pyramid[0].new_empty((batch, 0, *size)), [size] * batch)
        anchors = self.fcos.anchor_generator(images, pyramid)
        return DetectionOutputs(head_outputs, anchors, [p.shape[-2] * p.shape[-1] for p in pyramid], size)

    def targets(self, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "labels"}`` dicts from the batch, checked (valid boxes and labels)."""
        boxes, labels = self.target(batch, "boxes"), self.target(batch, "box_labels")
        if len(boxes) != len(labels):
            raise ValueError(f"DetectionHead: {len(boxes)} box tensors but {len(labels)} label tensors")
        targets = [
            {"boxes": b.reshape(-1, 4).float(), "labels": lab.reshape(-1).long()}
            for b, lab in zip(boxes, labels, strict=True)
        ]
        for i, t in enumerate(targets):
            if len(t["boxes"]) != len(t["labels"]):
                raise ValueError(
                    f"DetectionHead: image {i} has {len(t['boxes'])} boxes but {len(t['labels'])} labels"
                )
            if (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any():
                raise ValueError(
                    f"DetectionHead: image {i} has a box with non-positive width or height: {t['boxes']}"
                )
            if ((t["labels"] < 0) | (t["labels"] >= self.num_classes)).any():
                raise ValueError(
                    f"DetectionHead: image {i} has labels outside [0, {self.num_classes - 1}]: {t['labels'].tolist()}"
                )
        return targets

    def loss(self, outputs: DetectionOutputs, batch: dict[str, Any]) -> Tensor:
        """Sum of FCOS's classification, box regression (GIoU) and centerness losses."""
        losses = self.fcos.compute_loss(
            self.targets(batch), outputs.head_outputs, outputs.anchors, outputs.num_anchors_per_level
        )
        return losses["classification"] + losses["bbox_regression"] + losses["bbox_ctrness"]

    @property
    def default_loss_scale(self) -> float:
        """``1 / FRESH_FCOS_LOSS`` (about 0.37)."""
        return 1.0 / FRESH_FCOS_LOSS

    def build_metrics(self) -> MetricCollection:
        """COCO mAP (:class:`DetectionMAP`) under the name ``map``."""
        return MetricCollection({"map": DetectionMAP()})

    def update_metrics(
        self, metrics: MetricCollection, outputs: DetectionOutputs, batch: dict[str, Any]
    ) -> None:
        """Update ``metrics`` with the post-processed detections (the NMS needs a host sync)."""
        metrics.update(self.predict(outputs), self.targets(batch))

    @torch.no_grad()
    def predict(self, outputs: DetectionOutputs) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes": (n, 4) xyxy pixels, "scores": (n,), "labels": (n,)}`` after NMS."""
        counts = outputs.num_anchors_per_level
        split = {key: list(value.split(counts, dim=1)) for key, value in outputs.head_outputs.items()}
        anchors = [list(a.split(counts)) for a in outputs.anchors]
        return self.fcos.postprocess_detections(split, anchors, [outputs.image_size] * len(anchors))
