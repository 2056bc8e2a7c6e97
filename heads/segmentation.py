"""Semantic segmentation head: an smp decoder on the encoder pyramid, cross-entropy + Dice loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Literal

import torch.nn.functional as F
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from heads.base import INIT_STD, TaskHead

__all__ = ["SegmentationHead", "pad_to_pyramid"]

DECODERS: tuple[str, ...] = ("fpn", "unet")


def pad_to_pyramid(features: Sequence[Tensor]) -> list[Tensor]:
    """Zero-pad (bottom/right) each level to exactly twice the size of the next coarser one.

    Swin rounds odd sizes up at every patch merging (e.g. 25, 13, 7, 4 for a 100 px image), while
    smp's FPN decoder upsamples by exactly 2. Padding level ``i`` to ``coarsest * 2**(n-1-i)``
    makes the sizes consistent; the padded border lies beyond the image and is cropped afterwards.
    """
    h, w = features[-1].shape[-2:]
    n = len(features)
    return [
        F.pad(f, (0, w * 2 ** (n - 1 - i) - f.shape[-1], 0, h * 2 ** (n - 1 - i) - f.shape[-2]))
        for i, f in enumerate(features)
    ]


class SegmentationHead(TaskHead):
    """Per-pixel classification of ``batch["mask"]`` (long, (B, H, W), ``ignore_index`` allowed).

    Args:
        in_channels: channels of each pyramid level of the encoder (strides ascending).
        reductions: stride of each pyramid level relative to the input image.
        num_classes: number of classes including background, at least 2.
        decoder: ``"fpn"``: smp's ``FPNDecoder`` (GroupNorm) on the last four levels, which must
            have strides doubling from level to level; ``"unet"``: smp's ``UnetDecoder`` with
            affine InstanceNorm (never BatchNorm) on all levels.
        decoder_channels: width of the decoder (a multiple of 32 for ``"fpn"``: GroupNorm(32)).
        ignore_index: mask value excluded from the loss and the metrics (not a class index).
        dice_weight: weight of the multi-class Dice loss.
        ce_weight: weight of the cross-entropy.

    The decoder output (stride of its finest level, 4 for Swin) goes through a 1x1 convolution
    with small random weights (std ``INIT_STD``, bias 0) and is upsampled bilinearly to
    ``image_size``. The loss is ``ce_weight * CE + dice_weight * Dice`` (both ignore
    ``ignore_index``). A fresh head predicts about the uniform distribution: CE = ``ln C`` and,
    for balanced masks, Dice = ``1 - 1/C``, so
    ``default_loss_scale = 1 / (ce_weight * ln C + dice_weight * (1 - 1/C))``.
    Metrics: macro ``dice`` (F1 over pixels) and macro ``iou`` (Jaccard); classes absent from both
    the masks and the predictions are left out of the average (torchmetrics' macro rule).
    """

    target_keys = ("mask",)

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        decoder: Literal["fpn", "unet"] = "fpn",
        decoder_channels: int = 128,
        ignore_index: int = 255,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes)
        name = type(self).__name__
        if num_classes < 2:
            raise ValueError(f"{name}: num_classes must be >= 2 (background + classes), got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"{name}: ignore_index={ignore_index} collides with a class index (num_classes={num_classes})"
            )
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(
                f"{name}: dice_weight and ce_weight must be >= 0 and not both 0, got {dice_weight}, {ce_weight}"
            )
        if decoder_channels < 1:
            raise ValueError(f"{name}: decoder_channels must be >= 1, got {decoder_channels}")
        if decoder == "fpn":
            self._check_fpn(decoder_channels)
            self.decoder = FPNDecoder(
                self.in_channels[-4:],
                encoder_depth=3,
                pyramid_channels=decoder_channels,
                segmentation_channels=decoder_channels,
                dropout=0.0,
            )
        elif decoder == "unet":
            if len(self.in_channels) < 2:
                raise ValueError(
                    f"{name}: decoder 'unet' needs >= 2 pyramid levels, got {len(self.in_channels)}"
                )
            # smp drops the first (full-resolution) entry, so the finest level is passed twice.
            blocks = len(self.in_channels) - 1
            self.decoder = UnetDecoder(
                [self.in_channels[0], *self.in_channels],
                [decoder_channels] * blocks,
                n_blocks=blocks,
                use_norm={"type": "instancenorm", "affine": True},
            )
        else:
            raise ValueError(f"{name}: decoder must be one of {list(DECODERS)}, got {decoder!r}")
        self.decoder_type = decoder
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)
        # small random start (a zero-initialised classifier passes no gradient to the decoder and
        # encoder until it has grown: measured 0.23 vs 0.53 Dice after 300 steps, docs/learning.md)
        nn.init.trunc_normal_(self.classifier.weight, std=INIT_STD)
        nn.init.zeros_(self.classifier.bias)
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.dice_loss = DiceLoss(mode="multiclass", ignore_index=ignore_index)

    def _check_fpn(self, decoder_channels: int) -> None:
        name = type(self).__name__
        if len(self.in_channels) < 4:
            raise ValueError(f"{name}: decoder 'fpn' needs >= 4 pyramid levels, got {len(self.in_channels)}")
        if decoder_channels % 32:
            raise ValueError(
                f"{name}: decoder 'fpn' needs decoder_channels divisible by 32 (GroupNorm(32)), "
                f"got {decoder_channels}"
            )
        last = self.reductions[-4:]
        if any(fine * 2 != coarse for fine, coarse in pairwise(last)):
            raise ValueError(f"{name}: decoder 'fpn' needs the last four strides to double, got {last}")

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Mask logits (B, num_classes, H, W) at ``image_size``."""
        if self.decoder_type == "fpn":
            h, w = features[-4].shape[-2:]
            x = self.decoder(pad_to_pyramid(features[-4:]))[..., :h, :w]
        else:
            x = self.decoder([features[0], *features])
        return F.interpolate(self.classifier(x), size=tuple(image_size), mode="bilinear", align_corners=False)

    def loss(self, outputs: Tensor, batch: dict[str, Any]) -> Tensor:
        """``ce_weight * CE + dice_weight * Dice`` over the pixels whose mask is not ``ignore_index``."""
        mask = self.target(batch, "mask").long()
        valid = (mask != self.ignore_index).sum().clamp_min(1)
        ce = F.cross_entropy(outputs, mask, ignore_index=self.ignore_index, reduction="sum") / valid
        return self.ce_weight * ce + self.dice_weight * self.dice_loss(outputs, mask)

    @property
    def default_loss_scale(self) -> float:
        """``1 / (ce_weight * ln C + dice_weight * (1 - 1/C))``: the loss of a fresh head on balanced masks."""
        c = self.num_classes
        return 1.0 / (self.ce_weight * math.log(c) + self.dice_weight * (1.0 - 1.0 / c))

    def build_metrics(self) -> MetricCollection:
        """Macro Dice (pixel F1) and macro IoU, both skipping ``ignore_index`` pixels."""
        c, ignore = self.num_classes, self.ignore_index
        return MetricCollection(
            {
                "dice": MulticlassF1Score(num_classes=c, average="macro", ignore_index=ignore),
                "iou": MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=ignore),
            }
        )

    def update_metrics(self, metrics: MetricCollection, outputs: Tensor, batch: dict[str, Any]) -> None:
        """Update ``metrics`` with the predicted label mask."""
        metrics.update(self.predict(outputs), self.target(batch, "mask").long())

    def predict(self, outputs: Tensor) -> Tensor:
        """Label mask (B, H, W): the arg-max class of every pixel."""
        return outputs.argmax(dim=1)
