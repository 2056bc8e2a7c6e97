"""The four built-in kinds: classification, multi-label classification, segmentation, detection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from umedpt.kinds.base import TaskKind, register_kind

__all__ = ["BOX_TOLERANCE", "Classification", "Detection", "MultiLabel", "Segmentation"]

#: boxes may exceed the image by this many pixels (rounding in annotation tools); they are clipped
BOX_TOLERANCE = 1.0


@register_kind
class Classification(TaskKind):
    """One class per image: ``label`` is a class index (long ``(B,)`` in a batch)."""

    name = "classification"
    default_head = "heads.classification.ClassificationHead"
    metric = "auroc"
    target_keys = ("label",)
    probe_metric = "accuracy"
    annotation_fields = ("label",)

    def case_targets(self, *, label: Any, **_: Any) -> dict[str, Any]:
        """``label`` as a Python int (collated to a long tensor)."""
        return {"label": int(label)}

    def target_problems(self, targets: Mapping[str, Any], num_classes: int, *_: Any, **__: Any) -> list[tuple[str, str]]:
        """The label is an integer class index in ``0 .. num_classes - 1``."""
        label = targets.get("label")
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            return [("label", f"{label!r} is not a class index")]
        if not 0 <= label < num_classes:
            return [("label", f"{label} is out of range 0..{num_classes - 1}")]
        return []

    def class_counts(self, targets: Mapping[str, Any], num_classes: int) -> np.ndarray | None:
        """1 for the sample's class (``None`` for an invalid label)."""
        if self.target_problems(targets, num_classes):
            return None
        return np.bincount([int(targets["label"])], minlength=num_classes)


@register_kind
class MultiLabel(TaskKind):
    """Any number of classes per image: ``label`` is a 0/1 vector (float ``(B, K)`` in a batch)."""

    name = "multilabel"
    default_head = "heads.classification.MultiLabelHead"
    metric = "auroc"
    target_keys = ("label",)
    probe_metric = "auroc"
    annotation_fields = ("labels",)
    count_unit = "positives"

    def case_targets(self, *, label: Any, **_: Any) -> dict[str, Any]:
        """``label`` as a float32 0/1 vector."""
        return {"label": torch.as_tensor(label, dtype=torch.float32)}

    def target_problems(
        self, targets: Mapping[str, Any], num_classes: int, class_names: Sequence[str] = (), *_: Any, **__: Any
    ) -> list[tuple[str, str]]:
        """The label is a vector of ``num_classes`` values, each 0 or 1."""
        vector = np.asarray(targets.get("label"))
        if vector.shape != (num_classes,):
            return [("label", f"has shape {vector.shape}, expected ({num_classes},)")]
        names = list(class_names) or [str(k) for k in range(num_classes)]
        bad = {names[k]: float(vector[k]) for k in np.flatnonzero(~np.isin(vector, (0, 1)))}
        return [("label", f"multi-label values must be 0 or 1, got {bad}")] if bad else []

    def class_counts(self, targets: Mapping[str, Any], num_classes: int) -> np.ndarray | None:
        """1 for each positive class (``None`` for an invalid label)."""
        if self.target_problems(targets, num_classes):
            return None
        return np.asarray(targets["label"], dtype=np.int64)


@register_kind
class Segmentation(TaskKind):
    """A class per pixel: ``mask`` holds class indices (long ``(B, H, W)``, ``ignore_index`` allowed)."""

    name = "segmentation"
    default_head = "heads.segmentation.SegmentationHead"
    metric = "dice"
    target_keys = ("mask",)
    probe_metric = "dice"
    dense = True
    annotation_fields = ("mask",)
    count_unit = "pixels"

    def case_targets(self, *, mask: Any, **_: Any) -> dict[str, Any]:
        """``mask`` as an int64 (H, W) tensor of class indices."""
        return {"mask": torch.as_tensor(mask, dtype=torch.int64)}

    def target_problems(self, targets: Mapping[str, Any], *_: Any, **__: Any) -> list[tuple[str, str]]:
        """The sample has a mask (its values are checked once it is read)."""
        return [("mask", "no mask for this image")] if targets.get("mask") is None else []


@register_kind
class Detection(TaskKind):
    """Boxes with a class each: per image ``boxes`` (n, 4) ``xyxy`` in pixels and ``box_labels`` (n,)."""

    name = "detection"
    default_head = "heads.detection.DetectionHead"
    metric = "map_50"
    target_keys = ("boxes", "box_labels")
    list_keys = ("boxes", "box_labels")
    count_unit = "boxes"
    annotation_fields = ("boxes", "box_labels")

    def case_targets(self, *, boxes: Any, box_labels: Any, **_: Any) -> dict[str, Any]:
        """``boxes`` as float32 (n, 4) and ``box_labels`` as int64 (n,)."""
        return {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.as_tensor(box_labels, dtype=torch.int64).reshape(-1),
        }

    def target_problems(
        self,
        targets: Mapping[str, Any],
        num_classes: int,
        class_names: Sequence[str] = (),
        size: tuple[int, int] | None = None,
        what: str = "image",
        names: Sequence[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Every box finite, with positive width and height, inside ``size`` (give or take
        :data:`BOX_TOLERANCE` pixels), and its label a class index."""
        boxes = np.asarray(targets.get("boxes"), dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(targets.get("box_labels")).reshape(-1)
        names = list(names or [f"box {k}" for k in range(len(boxes))])
        problems = []
        for box, label, name in zip(boxes, labels, names, strict=True):
            if not np.isfinite(box).all():
                problems.append(("boxes", f"{name} has non-finite coordinates {box.tolist()}"))
            elif box[2] <= box[0] or box[3] <= box[1]:
                problems.append(("boxes", f"{name} is degenerate (xyxy {box.tolist()}: zero or negative size)"))
            elif size is not None and (
                min(box[0], box[1]) < -BOX_TOLERANCE or box[2] > size[1] + BOX_TOLERANCE or box[3] > size[0] + BOX_TOLERANCE
            ):
                problems.append(("boxes", f"{name} (xyxy {box.tolist()}) lies outside the {what} ({size[0]}x{size[1]})"))
            if not 0 <= int(label) < num_classes:
                problems.append(("box_labels", f"{name} has label {int(label)}, out of range 0..{num_classes - 1}"))
        return problems

    def class_counts(self, targets: Mapping[str, Any], num_classes: int) -> np.ndarray:
        """Boxes per class (labels outside the classes are not counted)."""
        labels = np.asarray(targets["box_labels"], dtype=np.int64).reshape(-1)
        return np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
