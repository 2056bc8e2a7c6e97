"""Image-level heads: multi-class (softmax) and multi-label (sigmoid) classification.

Both pool the last (coarsest) pyramid level globally, apply LayerNorm, optional dropout and a
Linear layer. The Linear layer starts at zero, so a fresh head predicts the uniform distribution
and its loss is exactly ``ln C`` (multi-class) or ``ln 2`` (multi-label): ``default_loss_scale``
turns that into 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAUROC,
    MultilabelF1Score,
)

from heads.base import TaskHead

__all__ = ["ClassificationHead", "MultiLabelHead"]


class _PooledLinearHead(TaskHead):
    """Global average pool of the last level -> LayerNorm -> Dropout -> zero-initialised Linear."""

    target_keys = ("label",)

    def __init__(
        self, in_channels: Sequence[int], reductions: Sequence[int], num_classes: int, dropout: float
    ) -> None:
        super().__init__(in_channels, reductions, num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        width = self.in_channels[-1]
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Logits (B, num_classes) from the globally pooled last pyramid level."""
        pooled = features[-1].mean(dim=(2, 3))
        return self.fc(self.dropout(self.norm(pooled)))

    def update_metrics(self, metrics: MetricCollection, outputs: Tensor, batch: dict[str, Any]) -> None:
        """Update ``metrics`` with the predicted probabilities and the integer labels."""
        metrics.update(self.predict(outputs.detach()), self.target(batch, "label").long())


class ClassificationHead(_PooledLinearHead):
    """Multi-class classification: one label in ``batch["label"]`` (long, (B,)) per image.

    Args:
        in_channels: channels of each pyramid level of the encoder (strides ascending).
        reductions: stride of each pyramid level relative to the input image.
        num_classes: number of classes, at least 2.
        dropout: dropout probability before the Linear layer.
        label_smoothing: label smoothing of the cross-entropy, in [0, 1).

    The loss is cross-entropy; ``default_loss_scale`` is ``1 / ln C`` (a fresh head gives
    exactly ``ln C``). Metrics: ``accuracy`` (micro), macro ``f1`` and macro ``auroc``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes, dropout)
        if num_classes < 2:
            raise ValueError(
                f"ClassificationHead: num_classes must be >= 2, got {num_classes} "
                "(use MultiLabelHead for independent binary labels)"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ClassificationHead: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def loss(self, outputs: Tensor, batch: dict[str, Any]) -> Tensor:
        """Cross-entropy (with label smoothing) of the logits against ``batch["label"]``."""
        target = self.target(batch, "label").long()
        return F.cross_entropy(outputs, target, label_smoothing=self.label_smoothing)

    @property
    def default_loss_scale(self) -> float:
        """``1 / ln C``: the cross-entropy of the uniform prediction is ``ln C``."""
        return 1.0 / math.log(self.num_classes)

    def build_metrics(self) -> MetricCollection:
        """Accuracy (micro), macro F1 and macro AUROC over the classes."""
        c = self.num_classes
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes=c, average="micro"),
                "f1": MulticlassF1Score(num_classes=c, average="macro"),
                "auroc": MulticlassAUROC(num_classes=c, average="macro"),
            }
        )

    def predict(self, outputs: Tensor) -> Tensor:
        """Class probabilities (B, C) (softmax of the logits)."""
        return outputs.softmax(dim=-1)


class MultiLabelHead(_PooledLinearHead):
    """Multi-label classification: ``batch["label"]`` holds K independent 0/1 labels (float, (B, K)).

    Args:
        in_channels: channels of each pyramid level of the encoder (strides ascending).
        reductions: stride of each pyramid level relative to the input image.
        num_classes: number of labels K, at least 2.
        dropout: dropout probability before the Linear layer.
        pos_weight: optional weight of the positive term per label (K values > 0), as in
            ``BCEWithLogitsLoss``; use it for rare labels.

    The loss is binary cross-entropy with logits averaged over images and labels;
    ``default_loss_scale`` is ``1 / ln 2`` (exact for a fresh head without ``pos_weight``).
    Metrics: macro ``auroc`` and macro ``f1`` at threshold 0.5.
    """

    pos_weight: Tensor | None

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
        pos_weight: list[float] | None = None,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes, dropout)
        if num_classes < 2:
            raise ValueError(
                f"MultiLabelHead: num_classes must be >= 2, got {num_classes} "
                "(use ClassificationHead with 2 classes for a single binary label)"
            )
        if pos_weight is not None and (len(pos_weight) != num_classes or min(pos_weight) <= 0):
            raise ValueError(
                f"MultiLabelHead: pos_weight must hold num_classes={num_classes} values > 0, got {pos_weight}"
            )
        weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight)

    def loss(self, outputs: Tensor, batch: dict[str, Any]) -> Tensor:
        """Binary cross-entropy with logits against ``batch["label"]`` (mean over images and labels)."""
        target = self.target(batch, "label").to(outputs.dtype)
        return F.binary_cross_entropy_with_logits(outputs, target, pos_weight=self.pos_weight)

    @property
    def default_loss_scale(self) -> float:
        """``1 / ln 2``: the binary cross-entropy of probability 0.5 is ``ln 2``."""
        return 1.0 / math.log(2.0)

    def build_metrics(self) -> MetricCollection:
        """Macro AUROC and macro F1 (threshold 0.5) over the labels."""
        k = self.num_classes
        return MetricCollection(
            {
                "auroc": MultilabelAUROC(num_labels=k, average="macro"),
                "f1": MultilabelF1Score(num_labels=k, threshold=0.5, average="macro"),
            }
        )

    def predict(self, outputs: Tensor) -> Tensor:
        """Label probabilities (B, K) (sigmoid of the logits)."""
        return outputs.sigmoid()
