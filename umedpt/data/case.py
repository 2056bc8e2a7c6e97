"""The one path from a sample's stored pixels to a case: scale to [0, 1], set the channels,
resize and augment together with every mask and box set, standardise, make tensors.

Every file reader (:class:`~umedpt.data.readers.base.FileDataset`), the IMAX manifests
(:class:`~umedpt.data.imax.cases.CaseBuilder`) and the synthetic worlds
(:class:`~umedpt.data.synthetic.SyntheticTaskDataset`, rendered at the training size, so
without a resize) build their cases with :class:`CasePipeline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from umedpt.data.normalize import ImageMeta, Normalization, NormalizationSpec
from umedpt.data.transforms import MASK_FILL, CaseTransform, ResizeMode, TransformSpec

__all__ = ["Case", "CasePipeline"]


@dataclass
class Case:
    """A sample ready for the heads: the standardised (C, H, W) image and its spatial targets.

    Attributes:
        image: float32 tensor (C, H, W).
        masks: name -> int64 (H, W) class-index mask (``ignore_index`` where there is no label).
        boxes: name -> ``(boxes, labels)``: float32 (n, 4) ``xyxy`` pixels and int64 (n,).
    """

    image: Tensor
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class CasePipeline:
    """Stored pixels -> :class:`Case`, the same steps for every source of cases.

    1. scale to [0, 1] (:meth:`Normalization.to_unit`: range, window, percentile, ...);
    2. drop alpha; colour to luminance for 1-channel tasks;
    3. resize and (training only) augment the image with all its masks and box sets in one draw
       (:class:`~umedpt.data.transforms.CaseTransform`, one per stored channel count: grey images
       are augmented as grey and repeated to ``channels`` afterwards);
    4. standardise (``(x - mean) / std``) and make a tensor.

    Args:
        normalize: a :class:`~umedpt.data.normalize.Normalization` or its spec.
        channels: channels of the output (1 or 3).
        image_size: side of the square output; None keeps each image's size.
        transform: augmentation preset or list (see :mod:`umedpt.data.transforms`).
        resize: ``stretch`` or ``letterbox``.
        train: apply the random augmentations.
        boxes: the cases carry boxes.
        ignore_index: mask value of pixels without a label (also where augmentation brings in
            pixels from outside the image).
    """

    def __init__(
        self,
        normalize: NormalizationSpec | Normalization = "auto",
        channels: int = 3,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        resize: ResizeMode = "stretch",
        train: bool = False,
        boxes: bool = False,
        ignore_index: int = 255,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.normalization = normalize if isinstance(normalize, Normalization) else Normalization.from_spec(normalize)
        self.channels = channels
        self.ignore_index = ignore_index
        self.transforms = {
            c: CaseTransform(transform, image_size, train=train, boxes=boxes, resize=resize, channels=c) for c in (1, 3)
        }

    @property
    def random(self) -> bool:
        """Whether a case is drawn at random (training augmentation)."""
        return self.transforms[3].random

    def unit(self, image: np.ndarray, meta: ImageMeta | None = None) -> np.ndarray:
        """The stored image in [0, 1], (H, W, 1) or (H, W, 3): steps 1 and 2."""
        image = self.normalization.to_unit(image, meta)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 4:
            image = image[..., :3]
        if self.channels == 1 and image.shape[-1] == 3:
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
        return image

    def __call__(
        self,
        image: np.ndarray,
        meta: ImageMeta | None = None,
        masks: Mapping[str, np.ndarray] | None = None,
        boxes: Mapping[str, tuple[Any, Any]] | None = None,
        seed: int | None = None,
    ) -> Case:
        """The case of a stored image (any dtype, (H, W) or (H, W, C)) with its class-index masks
        (at the image's size) and box sets (``xyxy`` pixels; clipped to the image).

        ``seed`` fixes the augmentation draw; without one it is drawn from torch's generator
        (so DataLoader workers and ``seed_everything`` make runs reproducible).
        """
        masks, boxes = dict(masks or {}), dict(boxes or {})
        unit = self.unit(image, meta)
        h, w = unit.shape[:2]
        transform = self.transforms[unit.shape[-1]]
        box_sets = [
            (np.clip(np.asarray(b, dtype=np.float32).reshape(-1, 4), 0, [w, h, w, h]).astype(np.float32),
             np.asarray(labels, dtype=np.int64).reshape(-1))
            for b, labels in boxes.values()
        ]  # fmt: skip
        if transform.pipeline is None:  # nothing to resize or draw (e.g. scenes rendered at size)
            out, out_boxes = unit, box_sets
            resized = {name: np.asarray(m).astype(np.int64) for name, m in masks.items()}
        else:
            # "no label" travels as MASK_FILL, which is also what padding and geometric transforms bring in
            stored_masks = [np.where(m == self.ignore_index, MASK_FILL, m).astype(np.uint16) for m in masks.values()]
            if seed is None and transform.random:
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
            out, out_masks, out_boxes = transform.apply(unit, stored_masks, box_sets, seed)
            resized = {name: np.where(m == MASK_FILL, self.ignore_index, m).astype(np.int64)
                       for name, m in zip(masks, out_masks, strict=True)}  # fmt: skip
        if out.shape[-1] != self.channels:
            out = np.repeat(out, self.channels, axis=-1)
        out = self.normalization.standardize(out)
        tensor = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        return Case(tensor, resized, dict(zip(boxes, out_boxes, strict=True)))
