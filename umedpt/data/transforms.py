"""Albumentations pipelines that move image, mask and boxes together, with presets per modality.

A reader builds one :class:`CaseTransform` per dataset. It works on images already scaled to
[0, 1] (see :mod:`umedpt.data.normalize`): first the resize to ``image_size`` (``stretch`` to a
square, or ``letterbox``: keep the aspect ratio and pad), then, for the training split only, the
random augmentations of the chosen preset. Validation and test pipelines are deterministic.

Presets (``transform:`` of a reader in YAML):

==============  ==================================================================================
``none``        no augmentation (resize only)
``xray``        small affine (scale 0.9-1.1, shift 5%, rotation +-10 deg), brightness/contrast,
                gamma, faint noise; no flips (laterality matters in radiographs)
``ct``          CT or MR slice: affine (scale 0.85-1.15, rotation +-15 deg), horizontal flip,
                mild brightness/contrast, faint noise
``mr``          as ``ct`` with stronger contrast and gamma changes (MR intensities are relative)
``microscopy``  all flips and 90-degree rotations, brightness/contrast, gamma, noise
``histology``   all flips and 90-degree rotations, stain jitter (hue/saturation/value), contrast
``dermoscopy``  flips, any rotation, mild zoom, colour jitter
``photo``       horizontal flip, small affine, colour jitter
==============  ==================================================================================

Colour jitter is replaced by brightness/contrast for 1-channel images. A list of
``{name: <albumentations class>, <its arguments>}`` mappings is a custom augmentation pipeline.
Regions that geometric transforms bring in from outside the image get the mask label
``ignore_index``; boxes are clipped to the image and dropped when less than a quarter stays visible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np

__all__ = ["MASK_FILL", "PRESETS", "CaseTransform", "TransformSpec", "augmentations"]

#: mask value used inside the pipeline for "no label" (mapped back to the task's ``ignore_index``)
MASK_FILL = 65535
#: a preset name, a list of ``{name: ..., **kwargs}`` albumentations specs, or None (no augmentation)
TransformSpec = str | Sequence[Mapping[str, Any]] | None
ResizeMode = Literal["stretch", "letterbox"]


def _affine(scale: float, shift: float, rotate: float, p: float = 0.7) -> A.Affine:
    return A.Affine(
        scale=(1 - scale, 1 + scale),
        translate_percent=(-shift, shift),
        rotate=(-rotate, rotate),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=MASK_FILL,
        p=p,
    )


def _contrast(amount: float, p: float = 0.5) -> A.RandomBrightnessContrast:
    return A.RandomBrightnessContrast(brightness_limit=amount, contrast_limit=amount, p=p)


def _noise(p: float = 0.2) -> A.GaussNoise:
    return A.GaussNoise(std_range=(0.01, 0.03), p=p)


def _colour(channels: int, hsv: bool) -> A.BasicTransform:
    if channels == 1:
        return _contrast(0.15)
    if hsv:
        return A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=8, p=0.5)
    return A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5)


def _flips_and_rot90() -> list[A.BasicTransform]:
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]


#: preset name -> function of the image's channel count returning the training augmentations
PRESETS: dict[str, Callable[[int], list[A.BasicTransform]]] = {
    "none": lambda channels: [],
    "xray": lambda channels: [
        _affine(0.1, 0.05, 10), _contrast(0.2), A.RandomGamma(gamma_limit=(80, 120), p=0.3), _noise()
    ],
    "ct": lambda channels: [_affine(0.15, 0.05, 15), A.HorizontalFlip(p=0.5), _contrast(0.1, p=0.3), _noise()],
    "mr": lambda channels: [
        _affine(0.15, 0.05, 15), A.HorizontalFlip(p=0.5), _contrast(0.25),
        A.RandomGamma(gamma_limit=(70, 150), p=0.5), _noise(),
    ],
    "microscopy": lambda channels: [
        *_flips_and_rot90(), _contrast(0.2), A.RandomGamma(gamma_limit=(80, 125), p=0.3), _noise(0.3)
    ],
    "histology": lambda channels: [*_flips_and_rot90(), _colour(channels, hsv=True), _contrast(0.1, p=0.3)],
    "dermoscopy": lambda channels: [
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), _affine(0.1, 0.0, 180), _colour(channels, hsv=False)
    ],
    "photo": lambda channels: [A.HorizontalFlip(p=0.5), _affine(0.1, 0.05, 10), _colour(channels, hsv=False)],
}


def augmentations(spec: TransformSpec, channels: int = 3) -> list[A.BasicTransform]:
    """The random training augmentations of ``spec`` (a preset name, a list of specs, or None)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"transform: unknown preset {spec!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[spec](channels)
    built = []
    for i, item in enumerate(spec):
        if not isinstance(item, Mapping) or "name" not in item:
            raise ValueError(f"transform[{i}]: expected a mapping with 'name' (an albumentations class), got {item!r}")
        kwargs = {k: v for k, v in item.items() if k != "name"}
        cls = getattr(A, str(item["name"]), None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise ValueError(f"transform[{i}]: {item['name']!r} is not an albumentations transform")
        try:
            built.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"transform[{i}] {item['name']}: {err}") from err
    return built


def _resize(image_size: int | None, mode: ResizeMode) -> list[A.BasicTransform]:
    if image_size is None:
        return []
    if mode == "stretch":
        return [A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)]
    if mode == "letterbox":
        return [
            A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
            A.PadIfNeeded(
                image_size, image_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=MASK_FILL
            ),
        ]
    raise ValueError(f"resize: expected 'stretch' or 'letterbox', got {mode!r}")


class CaseTransform:
    """Resize plus (training only) augmentations, applied to an image and its mask or boxes.

    Args:
        spec: a preset name of :data:`PRESETS`, a list of ``{name: ..., **kwargs}`` specs, or None.
        image_size: side of the square output; None keeps each image's size.
        train: apply the random augmentations (otherwise the pipeline is deterministic).
        boxes: the samples carry ``xyxy`` pixel boxes (detection).
        resize: ``stretch`` (to a square) or ``letterbox`` (keep aspect ratio, pad with 0).
        channels: channels of the images (1 replaces colour jitter by brightness/contrast).
    """

    def __init__(
        self,
        spec: TransformSpec = "none",
        image_size: int | None = 224,
        train: bool = False,
        boxes: bool = False,
        resize: ResizeMode = "stretch",
        channels: int = 3,
    ) -> None:
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None, got {image_size}")
        random = augmentations(spec, channels)  # validates spec for every split
        self.train = train
        self.boxes = boxes
        self.random = bool(random) and train
        # the owner of a box says which box set (task) it belongs to when several move together
        bbox_params = (
            A.BboxParams(
                format="pascal_voc", label_fields=["box_labels", "box_owner"], clip=True, min_visibility=0.25,
                filter_invalid_bboxes=True,
            )
            if boxes
            else None
        )
        steps = [*_resize(image_size, resize), *(random if train else [])]
        #: None when there is nothing to do (no resize, no augmentation)
        self.pipeline = A.Compose(steps, bbox_params=bbox_params, seed=0) if steps else None

    def _reseed(self, seed: int) -> None:
        """Give the pipeline and each transform its own stream derived from ``seed``.

        ``Compose.set_random_seed`` gives every transform the same seed, so their draws would be
        equal (e.g. both flips applied together or not at all).
        """
        self.pipeline.set_random_seed(seed)
        streams = np.random.SeedSequence(seed).generate_state(len(self.pipeline.transforms))
        for transform, stream in zip(self.pipeline.transforms, streams, strict=True):
            transform.set_random_seed(int(stream))

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        box_labels: np.ndarray | None = None,
        seed: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Transform an (H, W, C) float image in [0, 1] with its uint16 mask and/or boxes.

        ``seed`` fixes the random draw of this call (readers pass one drawn from torch's
        generator, so DataLoader workers and ``seed_everything`` make runs reproducible).
        Returns the keys given (``image``, ``mask``, ``boxes``, ``box_labels``).
        """
        masks = [mask] if mask is not None else []
        box_sets = [(boxes, box_labels)] if boxes is not None else []
        image, masks, box_sets = self.apply(image, masks, box_sets, seed)
        result = {"image": image}
        if mask is not None:
            result["mask"] = masks[0]
        if boxes is not None:
            result["boxes"], result["box_labels"] = box_sets[0]
        return result

    def apply(
        self,
        image: np.ndarray,
        masks: Sequence[np.ndarray] = (),
        box_sets: Sequence[tuple[np.ndarray, np.ndarray]] = (),
        seed: int | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
        """Transform an image with any number of masks and box sets in one draw (every mask and
        box set moves with the image, e.g. the targets of all the tasks annotated on it).

        Masks are uint16 (:data:`MASK_FILL` for "no label"); a box set is ``(boxes, labels)``,
        ``xyxy`` pixels. Returns the image, the masks and the box sets in the order given.
        """
        if self.random and seed is not None:
            self._reseed(seed)
        data: dict[str, Any] = {"image": image}
        if masks:
            data["masks"] = list(masks)
        if self.boxes and not box_sets:  # a pipeline built for boxes needs its label fields
            data.update(bboxes=np.zeros((0, 4), np.float32), box_labels=np.zeros(0, np.int64),
                        box_owner=np.zeros(0, np.int64))  # fmt: skip
        elif box_sets:
            data["bboxes"] = np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1, 4) for b, _ in box_sets])
            data["box_labels"] = np.concatenate([np.asarray(lab, dtype=np.int64).reshape(-1) for _, lab in box_sets])
            data["box_owner"] = np.concatenate(
                [np.full(len(np.asarray(lab).reshape(-1)), k, dtype=np.int64) for k, (_, lab) in enumerate(box_sets)]
            )
        out = self.pipeline(**data) if self.pipeline is not None else data
        out_masks = [np.asarray(m) for m in out["masks"]] if masks else []
        out_boxes = []
        if box_sets:
            kept = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["box_labels"], dtype=np.int64).reshape(-1)
            owner = np.asarray(out["box_owner"], dtype=np.int64).reshape(-1)
            out_boxes = [(kept[owner == k], labels[owner == k]) for k in range(len(box_sets))]
        return out["image"], out_masks, out_boxes
