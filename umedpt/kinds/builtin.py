"""The four built-in kinds: classification, multi-label classification, segmentation, detection."""

from __future__ import annotations

from typing import Any

import torch

from umedpt.kinds.base import TaskKind, register_kind

__all__ = ["Classification", "Detection", "MultiLabel", "Segmentation"]


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


@register_kind
class MultiLabel(TaskKind):
    """Any number of classes per image: ``label`` is a 0/1 vector (float ``(B, K)`` in a batch)."""

    name = "multilabel"
    default_head = "heads.classification.MultiLabelHead"
    metric = "auroc"
    target_keys = ("label",)
    probe_metric = "auroc"
    annotation_fields = ("labels",)

    def case_targets(self, *, label: Any, **_: Any) -> dict[str, Any]:
        """``label`` as a float32 0/1 vector."""
        return {"label": torch.as_tensor(label, dtype=torch.float32)}


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

    def case_targets(self, *, mask: Any, **_: Any) -> dict[str, Any]:
        """``mask`` as an int64 (H, W) tensor of class indices."""
        return {"mask": torch.as_tensor(mask, dtype=torch.int64)}


@register_kind
class Detection(TaskKind):
    """Boxes with a class each: per image ``boxes`` (n, 4) ``xyxy`` in pixels and ``box_labels`` (n,)."""

    name = "detection"
    default_head = "heads.detection.DetectionHead"
    metric = "map_50"
    target_keys = ("boxes", "box_labels")
    list_keys = ("boxes", "box_labels")
    dense = True
    annotation_fields = ("boxes", "box_labels")

    def case_targets(self, *, boxes: Any, box_labels: Any, **_: Any) -> dict[str, Any]:
        """``boxes`` as float32 (n, 4) and ``box_labels`` as int64 (n,)."""
        return {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.as_tensor(box_labels, dtype=torch.int64).reshape(-1),
        }
