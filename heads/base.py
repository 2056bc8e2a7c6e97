"""The contract every task head follows.

A head turns the shared encoder's feature pyramid into task outputs, owns the task's loss
and its metrics. Batches are dictionaries (collated by :func:`umedpt.data.loading.collate_cases`;
each task kind's target keys are in :mod:`umedpt.kinds`):

``image``       float tensor (B, C, H, W)
``label``       classification: long (B,); multi-label: float (B, K) of 0/1
``mask``        segmentation: long (B, H, W) of class indices (``ignore_index`` allowed)
``boxes``       detection: list of B float tensors (n_i, 4), ``xyxy`` in pixels
``box_labels``  detection: list of B long tensors (n_i,)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torchmetrics import MetricCollection

#: standard deviation of the truncated normal initial weights of the heads' output layers, as in
#: timm's classifiers (a zero-initialised output layer passes no gradient back until it has grown)
INIT_STD: float = 0.02


class TaskHead(nn.Module, ABC):
    """Base class of task heads.

    Args:
        in_channels: channels of each pyramid level of the encoder (strides ascending).
        reductions: stride of each pyramid level relative to the input image.
        num_classes: number of classes of the task.
    """

    #: which batch keys the head reads as targets
    target_keys: tuple[str, ...] = ()
    #: the head's outputs come from the plain encoder features of the image, which heads of
    #: other tasks on the same image may share (image-centric steps); ``False`` for heads that
    #: encode the image in their own way (:meth:`forward_image`)
    shares_features: bool = True

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(in_channels) != len(reductions):
            raise ValueError(
                f"{type(self).__name__}: in_channels {list(in_channels)} and reductions "
                f"{list(reductions)} must have one entry per pyramid level"
            )
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        self.in_channels = list(in_channels)
        self.reductions = list(reductions)
        self.num_classes = num_classes

    def target(self, batch: dict[str, Any], key: str) -> Any:
        """``batch[key]``, or a ``KeyError`` naming the head, the missing key and the keys present."""
        if key not in batch:
            raise KeyError(
                f"{type(self).__name__}: the batch has no target {key!r} (keys present: {sorted(batch)}); "
                f"this head reads {list(self.target_keys)}"
            )
        return batch[key]

    def attach(self, encoder: nn.Module) -> None:
        """Called once with the shared encoder when the head joins a model: a head that needs the
        encoder itself (an EMA teacher copy of it) takes it here. This default does nothing."""

    def forward_image(self, encode: Callable[..., list[Tensor]], image: Tensor) -> Any:
        """Raw outputs for a batch of images, given ``encode`` (the shared encoder's forward:
        ``encode(image, **kwargs)`` gives the feature pyramid). This default is
        ``self(encode(image), image_size)``; self-supervised heads override it to encode a masked
        image (:attr:`shares_features` is then ``False``)."""
        return self(encode(image), tuple(image.shape[-2:]))

    def after_step(self, encoder: nn.Module) -> None:
        """Called after every optimizer step with the shared encoder (an EMA teacher follows it
        here). This default does nothing."""

    @abstractmethod
    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Any:
        """Raw outputs (logits, mask logits, detection head outputs) for a feature pyramid."""

    @abstractmethod
    def loss(self, outputs: Any, batch: dict[str, Any]) -> Tensor:
        """Unscaled scalar loss of ``outputs`` against the targets in ``batch``."""

    @property
    @abstractmethod
    def default_loss_scale(self) -> float:
        """Factor that brings the loss of a freshly initialised head to about 1."""

    @abstractmethod
    def build_metrics(self) -> MetricCollection:
        """A fresh metric collection for this task (cloned per split by the module)."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, Any]) -> None:
        """Accumulate one batch into ``metrics`` (on device, no host sync)."""

    @abstractmethod
    def predict(self, outputs: Any) -> Any:
        """Post-processed predictions: probabilities, label masks or detections."""
