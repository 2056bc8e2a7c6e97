"""One task over one synthetic world: :class:`SyntheticTaskDataset`."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from umedpt.data.case import CasePipeline
from umedpt.data.synthetic.labels import (
    LABEL_FAMILIES,
    MAX_SIZE,
    MIN_SIZE,
    SPLIT_OFFSETS,
    STYLES,
    Scene,
    _check_choice,
    _check_int,
    class_names,
)
from umedpt.data.synthetic.render import render_scene
from umedpt.kinds import get_kind

#: the images' standardisation, ``(x - 0.5) / 0.25``, as the file readers' default

#: scenes kept by datasets built with ``cache=True``, keyed by ``(style, seed, index, size)``
_SCENE_CACHE: dict[tuple[str, int, int, int], Scene] = {}


class SyntheticTaskDataset(Dataset):
    """One task over one synthetic world.

    Items are case dicts: ``image`` float32 (C, H, W) normalised as ``(x - 0.5) / 0.25``, plus
    ``label`` (int for classification families, float32 (K,) for ``objects``), ``mask``
    (int64 (H, W), segmentation) or ``boxes`` float32 (n, 4) xyxy and ``box_labels`` int64 (n,)
    (detection). All families of a world share the same images for the same split and seed.

    Args:
        style: one of ``STYLES``.
        family: one of ``LABEL_FAMILIES``.
        split: ``"train"``, ``"val"`` or ``"test"``; splits use disjoint scene indices.
        num_samples: number of scenes, 1 to 2**28, or a mapping from split to that number
            (e.g. ``{"train": 10000, "val": 1000, "test": 2000}``).
        image_size: image side in pixels, ``MIN_SIZE`` to ``MAX_SIZE``.
        seed: non-negative world seed.
        channels: 3 for RGB or 1 for the luminance.
        cache: keep rendered scenes in memory, shared by all datasets of the process that show
            the same world (about 80 KB per scene at 64 px, 1 MB at 224 px): epochs after the
            first cost no rendering. Each DataLoader worker process holds its own cache.
    """

    def __init__(
        self,
        style: str,
        family: str,
        split: str = "train",
        num_samples: int | dict[str, int] = 512,
        image_size: int = 224,
        seed: int = 0,
        channels: int = 3,
        cache: bool = False,
    ) -> None:
        _check_choice("style", style, STYLES)
        _check_choice("family", family, LABEL_FAMILIES)
        _check_choice("split", split, SPLIT_OFFSETS)
        _check_choice("channels", channels, (1, 3))
        self.style, self.family, self.split = style, family, split
        if isinstance(num_samples, dict):
            if split not in num_samples:
                raise ValueError(f"num_samples has no entry for split {split!r}: {num_samples!r}")
            num_samples = num_samples[split]
        self.num_samples = _check_int("num_samples", num_samples, 1, SPLIT_OFFSETS["val"])
        self.image_size = _check_int("image_size", image_size, MIN_SIZE, MAX_SIZE)
        self.seed = _check_int("seed", seed, 0)
        self.channels = channels
        self.cache = bool(cache)
        self.kind = LABEL_FAMILIES[family]
        self.task_kind = get_kind(self.kind)
        #: the case path of every reader: unit-range scenes standardised (no resize, no augmentation)
        self.pipeline = CasePipeline("unit", channels, image_size=None, boxes="boxes" in self.task_kind.target_keys)
        self.class_names = class_names(style, family)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, i: int) -> Scene:
        """The full :class:`Scene` behind item ``i``."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {i!r} of type {type(i).__name__}")
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index must be in [0, {self.num_samples}), got {i}")
        key = (self.style, self.seed, SPLIT_OFFSETS[self.split] + int(i), self.image_size)
        if not self.cache:
            return render_scene(*key)
        if key not in _SCENE_CACHE:
            _SCENE_CACHE[key] = render_scene(*key)
        return _SCENE_CACHE[key]

    def stored(self, i: int) -> dict[str, Any]:
        """Item ``i`` as ``umedpt data optimize`` stores it: ``image`` float32 (H, W, C) in [0, 1]
        and the family's targets (``label``, ``mask`` or ``boxes`` + ``box_labels``)."""
        scene = self.scene(i)
        keys = self.task_kind.target_keys
        out: dict[str, Any] = {"image": self.pipeline.unit(scene.image)}
        if "mask" in keys:
            out["mask"] = scene.mask
        if "boxes" in keys:
            out["boxes"], out["box_labels"] = scene.boxes, scene.box_labels
        label = scene.labels.get(self.family)
        if label is not None:
            out["label"] = label
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        """The case dict of item ``i`` (see the class docstring)."""
        scene = self.scene(i)
        # rendered at the training size in [0, 1]: the readers' path without a resize
        keys = self.task_kind.target_keys
        masks = {"mask": scene.mask} if "mask" in keys else None
        boxes = {"boxes": (scene.boxes, scene.box_labels)} if "boxes" in keys else None
        case = self.pipeline(scene.image, masks=masks, boxes=boxes)
        targets = self.task_kind.case_targets(
            label=scene.labels.get(self.family),
            mask=case.masks.get("mask"),
            boxes=case.boxes["boxes"][0] if boxes else None,
            box_labels=case.boxes["boxes"][1] if boxes else None,
        )
        return {"image": case.image, **targets}
