"""The four built-in kinds: classification, multi-label classification, segmentation, detection."""

from __future__ import annotations

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


@register_kind
class MultiLabel(TaskKind):
    """Any number of classes per image: ``label`` is a 0/1 vector (float ``(B, K)`` in a batch)."""

    name = "multilabel"
    default_head = "heads.classification.MultiLabelHead"
    metric = "auroc"
    target_keys = ("label",)
    probe_metric = "auroc"


@register_kind
class Segmentation(TaskKind):
    """A class per pixel: ``mask`` holds class indices (long ``(B, H, W)``, ``ignore_index`` allowed)."""

    name = "segmentation"
    default_head = "heads.segmentation.SegmentationHead"
    metric = "dice"
    target_keys = ("mask",)
    probe_metric = "dice"
    dense = True


@register_kind
class Detection(TaskKind):
    """Boxes with a class each: per image ``boxes`` (n, 4) ``xyxy`` in pixels and ``box_labels`` (n,)."""

    name = "detection"
    default_head = "heads.detection.DetectionHead"
    metric = "map_50"
    target_keys = ("boxes", "box_labels")
    list_keys = ("boxes", "box_labels")
    dense = True
