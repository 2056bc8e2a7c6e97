"""Self-supervised heads: masked image modelling (pixels) and masked feature reconstruction.

Both learn from the image alone, so any dataset that returns ``image`` serves them (its labels
are ignored), and they train in the task-by-task loop like any supervised head: forward,
backward, graph freed, one optimizer step for all tasks.

- :class:`MaskedImageHead` (kind ``mim``), after SimMIM: square patches of the image are hidden
  by replacing their patch embeddings with a learned mask token (``SwinEncoder(x, mask,
  mask_token)``), a 1x1 convolution and a PixelShuffle turn the last level back into pixels, and
  the loss is the L1 distance on the hidden pixels only.
- :class:`FeatureReconstructionHead` (kind ``feature_mim``), after UMD's feature-level
  reconstruction: the masked student predicts, at the hidden positions, the features that a
  teacher (an exponential moving average of the encoder, no gradients) computes from the whole
  image; the loss is one minus their cosine similarity.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from heads.base import INIT_STD, TaskHead

__all__ = [
    "FeatureOutputs", "FeatureReconstructionHead", "MaskedImageHead", "MaskedOutputs", "random_patch_mask",
    "upsample_mask",
]


def random_patch_mask(
    batch: int,
    grid: tuple[int, int],
    cell: int,
    ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean ``(batch, rows, cols)`` mask over a token grid, ``True`` where a token is hidden.

    The grid is cut into square mask patches of ``cell`` x ``cell`` tokens (the last row and
    column of patches may be cut off by the grid's edge); in each image exactly
    ``round(ratio * patches)`` of them, drawn at random, are hidden.
    """
    rows, cols = grid
    if cell < 1:
        raise ValueError(f"random_patch_mask: cell must be >= 1 token, got {cell}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"random_patch_mask: ratio must be in (0, 1), got {ratio}")
    patch_rows, patch_cols = -(-rows // cell), -(-cols // cell)
    count = patch_rows * patch_cols
    hidden = min(count - 1, max(1, round(ratio * count)))
    order = torch.rand(batch, count, generator=generator, device=generator.device if generator else device)
    ranks = order.argsort(dim=1).argsort(dim=1)
    mask = (ranks < hidden).view(batch, patch_rows, patch_cols)
    return upsample_mask(mask, cell, grid).to(device)


def upsample_mask(mask: Tensor, factor: int, size: tuple[int, int]) -> Tensor:
    """``mask`` (B, h, w) with each cell repeated ``factor`` x ``factor`` times, cut to ``size``."""
    mask = mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return mask[:, : size[0], : size[1]]


class _MaskingHead(TaskHead):
    """What both masked heads share: the mask token, the mask draw and the loss metric."""

    target_keys = ()
    shares_features = False
    #: name of the metric that averages the head's loss over an evaluation
    metric_name = "loss"

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int = 1,
        mask_patch_size: int = 8,
        mask_ratio: float = 0.6,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes)
        patch = self.reductions[0]
        if mask_patch_size < patch or mask_patch_size % patch:
            raise ValueError(
                f"{type(self).__name__}: mask_patch_size must be a multiple of the encoder's patch size "
                f"{patch} px, got {mask_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"{type(self).__name__}: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        # the learned embedding of a hidden patch, substituted after the patch embedding
        self.mask_token = nn.Parameter(torch.zeros(self.in_channels[0]))
        nn.init.trunc_normal_(self.mask_token, std=INIT_STD)

    def draw_mask(self, image: Tensor) -> Tensor:
        """The hidden tokens of a batch: random in training; in evaluation the same draw for
        every batch (a fixed generator), so validation losses are comparable across epochs."""
        patch = self.reductions[0]
        grid = (-(-image.shape[-2] // patch), -(-image.shape[-1] // patch))
        generator = None if self.training else torch.Generator().manual_seed(0)
        return random_patch_mask(
            image.shape[0], grid, self.mask_patch_size // patch, self.mask_ratio, image.device, generator
        )

    def build_metrics(self) -> MetricCollection:
        """The mean of the (unscaled) loss over the evaluated batches."""
        return MetricCollection({self.metric_name: MeanMetric()})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, Any]) -> None:
        """Add the batch's loss, weighted by its number of images."""
        metrics[self.metric_name].update(self.loss(outputs, batch).detach(), weight=batch["image"].shape[0])


@dataclass
class MaskedOutputs:
    """What :meth:`MaskedImageHead.forward_image` returns.

    Attributes:
        reconstruction: predicted pixels ``(B, C, H, W)`` (normalised per mask patch when the
            head's ``normalize_target`` is on).
        pixel_mask: float ``(B, 1, H, W)``, 1 on the hidden pixels.
    """

    reconstruction: Tensor
    pixel_mask: Tensor


class MaskedImageHead(_MaskingHead):
    """Masked image modelling: hide square patches, predict their pixels (SimMIM).

    Args:
        in_channels, reductions, num_classes: as every head (``num_classes`` is unused).
        mask_patch_size: side of a hidden square in pixels, a multiple of the encoder's patch
            size (SimMIM uses 32 at 192 px; 8 suits 64 px images).
        mask_ratio: fraction of the squares hidden in each image.
        image_channels: channels of the predicted image (a 1-channel batch is compared with
            its channel repeated).
        normalize_target: predict each mask patch's pixels normalised to zero mean and unit
            variance over the patch (as MAE's normalised-pixel loss); a fresh head (predicting
            about 0) then has a loss of about ``sqrt(2 / pi)`` on every image.
        level: the pyramid level the decoder reads (default the last).

    The loss is the mean absolute error over the hidden pixels and the channels.
    Metrics: ``l1``, the same mean over the evaluated images.
    """

    metric_name = "l1"

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int = 1,
        mask_patch_size: int = 8,
        mask_ratio: float = 0.6,
        image_channels: int = 3,
        normalize_target: bool = True,
        level: int = -1,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes, mask_patch_size, mask_ratio)
        if image_channels < 1:
            raise ValueError(f"MaskedImageHead: image_channels must be >= 1, got {image_channels}")
        if not -len(self.in_channels) <= level < len(self.in_channels):
            raise ValueError(f"MaskedImageHead: level must index the {len(self.in_channels)} encoder levels, got {level}")
        self.level = level
        self.image_channels = image_channels
        self.normalize_target = normalize_target
        stride = self.reductions[level]
        self.decoder = nn.Sequential(
            nn.Conv2d(self.in_channels[level], stride * stride * image_channels, kernel_size=1),
            nn.PixelShuffle(stride),
        )
        nn.init.trunc_normal_(self.decoder[0].weight, std=INIT_STD)
        nn.init.zeros_(self.decoder[0].bias)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Predicted pixels ``(B, image_channels, H, W)`` from the feature pyramid."""
        pixels = self.decoder(features[self.level])
        return pixels[..., : image_size[0], : image_size[1]]

    def forward_image(self, encode: Callable[..., list[Tensor]], image: Tensor) -> MaskedOutputs:
        """Hide random squares of ``image``, encode it and predict every pixel."""
        mask = self.draw_mask(image)
        features = encode(image, mask=mask, mask_token=self.mask_token)
        size = tuple(image.shape[-2:])
        pixel_mask = upsample_mask(mask, self.reductions[0], size)[:, None].to(image.dtype)
        return MaskedOutputs(self(features, size), pixel_mask)

    def target_pixels(self, image: Tensor) -> Tensor:
        """What the head predicts for ``image``: its pixels, normalised per mask patch if asked."""
        if image.shape[1] == 1 and self.image_channels > 1:
            image = image.expand(-1, self.image_channels, -1, -1)
        elif image.shape[1] != self.image_channels:
            raise ValueError(
                f"MaskedImageHead: images have {image.shape[1]} channels, the head predicts {self.image_channels}"
            )
        if not self.normalize_target:
            return image
        size = self.mask_patch_size
        height, width = image.shape[-2:]
        if height % size or width % size:
            raise ValueError(
                f"MaskedImageHead: normalize_target needs images whose sides are multiples of "
                f"mask_patch_size={size}, got {height} x {width}"
            )
        b, c = image.shape[:2]
        patches = image.reshape(b, c, height // size, size, width // size, size)
        mean = patches.mean(dim=(1, 3, 5), keepdim=True)
        var = patches.var(dim=(1, 3, 5), keepdim=True, unbiased=False)
        return ((patches - mean) / (var + 1e-6).sqrt()).reshape(b, c, height, width)

    def loss(self, outputs: MaskedOutputs, batch: dict[str, Any]) -> Tensor:
        """Mean absolute error over the hidden pixels (and channels)."""
        target = self.target_pixels(self.target(batch, "image").to(outputs.reconstruction.dtype))
        error = (outputs.reconstruction - target).abs() * outputs.pixel_mask
        hidden = outputs.pixel_mask.sum() * target.shape[1]
        return error.sum() / hidden.clamp_min(1.0)

    @property
    def default_loss_scale(self) -> float:
        """``sqrt(pi / 2)`` with normalised targets (the fresh loss of unit-variance targets), else 1."""
        return math.sqrt(math.pi / 2) if self.normalize_target else 1.0

    @torch.no_grad()
    def predict(self, outputs: MaskedOutputs) -> Tensor:
        """The predicted pixels."""
        return outputs.reconstruction


@dataclass
class FeatureOutputs:
    """What :meth:`FeatureReconstructionHead.forward_image` returns.

    Attributes:
        prediction: the student's predicted features ``(B, D, h, w)`` at the head's level.
        target: the teacher's features there, normalised over channels (no gradient).
        mask: boolean ``(B, h, w)``, ``True`` where the student's input was hidden.
    """

    prediction: Tensor
    target: Tensor
    mask: Tensor


class FeatureReconstructionHead(_MaskingHead):
    """Masked feature reconstruction: predict an EMA teacher's features where the input is hidden.

    Args:
        in_channels, reductions, num_classes: as every head (``num_classes`` is unused).
        mask_patch_size, mask_ratio: as :class:`MaskedImageHead`.
        level: the pyramid level whose features are predicted; ``None`` picks the finest level
            whose stride is at least ``mask_patch_size`` (so each of its positions is wholly
            hidden or wholly seen). Its stride must divide ``mask_patch_size`` or be a multiple
            of it.
        momentum: the teacher's EMA momentum per optimizer step (``teacher = momentum *
            teacher + (1 - momentum) * encoder``).

    The teacher is a copy of the shared encoder taken when the head joins the model
    (:meth:`attach`, before training starts); it has no gradients, always computes its targets
    in evaluation mode (no stochastic depth) and is saved in checkpoints with the head. A
    position of the level counts as hidden when all of its input tokens were hidden. The loss is ``1 - cos(prediction, target)`` averaged over the
    hidden positions (about 1 for a fresh head). Metrics: ``distance``, that mean.
    """

    metric_name = "distance"

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int = 1,
        mask_patch_size: int = 8,
        mask_ratio: float = 0.6,
        level: int | None = None,
        momentum: float = 0.996,
    ) -> None:
        super().__init__(in_channels, reductions, num_classes, mask_patch_size, mask_ratio)
        if level is None:
            level = next(
                (i for i, r in enumerate(self.reductions) if r >= mask_patch_size), len(self.reductions) - 1
            )
        if not 0 <= level < len(self.in_channels):
            raise ValueError(
                f"FeatureReconstructionHead: level must be in [0, {len(self.in_channels) - 1}], got {level}"
            )
        stride = self.reductions[level]
        if stride % mask_patch_size and mask_patch_size % stride:
            raise ValueError(
                f"FeatureReconstructionHead: the stride {stride} of level {level} and mask_patch_size "
                f"{mask_patch_size} must divide one another"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"FeatureReconstructionHead: momentum must be in [0, 1), got {momentum}")
        self.level = level
        self.momentum = momentum
        channels = self.in_channels[level]
        self.predictor = nn.Conv2d(channels, channels, kernel_size=1)
        self.teacher: nn.Module | None = None

    def attach(self, encoder: nn.Module) -> None:
        """Take a copy of ``encoder`` as the teacher (no gradients)."""
        teacher = copy.deepcopy(encoder)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise RuntimeError(
                "FeatureReconstructionHead has no teacher: call attach(encoder) first "
                "(MultiTaskModule does it for its heads)"
            )
        return self.teacher

    def level_mask(self, mask: Tensor) -> Tensor:
        """The token mask ``(B, rows, cols)`` at the head's level: ``True`` where every token of a
        position is hidden."""
        cell = self.reductions[self.level] // self.reductions[0]
        b, rows, cols = mask.shape
        pad_r, pad_c = (-rows) % cell, (-cols) % cell
        if pad_r or pad_c:
            mask = F.pad(mask, (0, pad_c, 0, pad_r), value=False)
        grid = mask.view(b, mask.shape[1] // cell, cell, mask.shape[2] // cell, cell)
        return grid.all(dim=4).all(dim=2)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """The predicted features ``(B, D, h, w)`` at the head's level."""
        return self.predictor(features[self.level])

    def forward_image(self, encode: Callable[..., list[Tensor]], image: Tensor) -> FeatureOutputs:
        """The teacher's features of the whole image and the student's prediction from the masked one."""
        teacher = self._teacher()
        mode = teacher.training
        # the teacher always runs in evaluation mode (no stochastic depth); it is put back
        # afterwards so that it follows the module's mode like every other submodule
        teacher.eval()
        try:
            with torch.no_grad():
                target = teacher(image)[self.level]
        finally:
            teacher.train(mode)
        target = F.layer_norm(target.movedim(1, -1), target.shape[1:2]).movedim(-1, 1)
        mask = self.draw_mask(image)
        features = encode(image, mask=mask, mask_token=self.mask_token)
        prediction = self(features, tuple(image.shape[-2:]))
        level = self.level_mask(mask)[:, : prediction.shape[-2], : prediction.shape[-1]]
        return FeatureOutputs(prediction, target, level)

    def loss(self, outputs: FeatureOutputs, batch: dict[str, Any]) -> Tensor:
        """``1 - cos`` between predicted and teacher features, over the hidden positions."""
        distance = 1.0 - F.cosine_similarity(outputs.prediction, outputs.target.to(outputs.prediction.dtype), dim=1)
        weight = outputs.mask.to(distance.dtype)
        return (distance * weight).sum() / weight.sum().clamp_min(1.0)

    @property
    def default_loss_scale(self) -> float:
        """1: a fresh head's cosine distance is about 1."""
        return 1.0

    @torch.no_grad()
    def after_step(self, encoder: nn.Module) -> None:
        """Move the teacher toward the encoder: ``t <- m t + (1 - m) e`` for every weight."""
        teacher = self._teacher()
        student = dict(encoder.named_parameters())
        pairs = [(t, student[name]) for name, t in teacher.named_parameters()]
        if pairs:
            torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], 1.0 - self.momentum)

    @torch.no_grad()
    def predict(self, outputs: FeatureOutputs) -> Tensor:
        """The predicted features."""
        return outputs.prediction
