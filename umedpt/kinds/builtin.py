"""The four built-in kinds: classification, multi-label classification, segmentation, detection."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from umedpt.kinds.base import TaskKind, class_index, register_kind

__all__ = ["BOX_TOLERANCE", "Classification", "Detection", "MultiLabel", "Segmentation"]

def _number(value: str) -> float:
    """A table cell as a number (NaN when it is none: the label check reports it)."""
    try:
        return float(value)
    except ValueError:
        return float("nan")


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
    linear_probe = True
    annotation_fields = ("label",)
    label_columns = (1, 1)

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

    def parse_annotation(
        self, values: Mapping[str, Any], num_classes: int | None = None, class_names: Sequence[str] = ()
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """``label``: a class index or name."""
        label, problem = class_index(values.get("label"), num_classes, class_names)
        return {"label": label}, [("label", problem)] if problem else []

    def annotation_targets(
        self, values: Mapping[str, Any] | None, num_classes: int, size: tuple[int, int], ignore_index: int = 255
    ) -> dict[str, Any]:
        """``label`` as a long scalar tensor (0 when missing)."""
        return {"label": torch.tensor(values["label"] if values is not None else 0, dtype=torch.long)}

    def annotation_from_targets(self, targets: Mapping[str, Any], decimals: int | None = None) -> dict[str, Any]:
        """``{"label": index}``."""
        return {"label": int(targets["label"])}

    def confident(self, head: Any, outputs: Any, threshold: float) -> list[tuple[dict[str, Any], float] | None]:
        """The most probable class, when its probability reaches ``threshold``."""
        score, label = head.predict(outputs).float().cpu().max(dim=1)
        return [
            ({"label": int(c)}, float(s)) if s >= threshold else None for c, s in zip(label, score, strict=True)
        ]

    def table_class_names(self, columns: Sequence[str], cells: Sequence[str], separator: str = ";") -> list[str]:
        """Integer labels: ``"0" .. max``; names: sorted."""
        if cells and all(v.lstrip("-").isdigit() for v in cells):
            return [str(i) for i in range(max(int(v) for v in cells) + 1)]
        return sorted(set(cells))

    def table_label(
        self, cells: Sequence[str], class_names: Sequence[str], separator: str = ";"
    ) -> tuple[Any, str | None]:
        """One cell: a class name or an integer class index."""
        (value,) = cells
        if value in class_names:
            return list(class_names).index(value), None
        try:
            return int(value), None
        except ValueError:
            return None, f"{value!r} is neither a class index nor a class name {list(class_names)[:10]}"

    def array_label(self, row: np.ndarray) -> Any:
        """The class index in the row's one column."""
        return int(row[0])

    def array_num_classes(self, arrays: Sequence[np.ndarray]) -> int:
        """The largest class index + 1."""
        return int(max(int(a.max()) for a in arrays)) + 1


@register_kind
class MultiLabel(TaskKind):
    """Any number of classes per image: ``label`` is a 0/1 vector (float ``(B, K)`` in a batch)."""

    name = "multilabel"
    default_head = "heads.classification.MultiLabelHead"
    metric = "auroc"
    target_keys = ("label",)
    probe_metric = "auroc"
    linear_probe = True
    annotation_fields = ("labels",)
    count_unit = "positives"
    label_columns = (1, None)

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

    def parse_annotation(
        self, values: Mapping[str, Any], num_classes: int | None = None, class_names: Sequence[str] = ()
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """``labels``: a list of the positive classes (indices or names)."""
        labels = values.get("labels")
        if not isinstance(labels, list):
            return dict(values), [("labels", f"expected a list of positive classes, got {labels!r}")]
        parsed = [class_index(v, num_classes, class_names) for v in labels]
        problems = [(f"labels[{i}]", problem) for i, (_, problem) in enumerate(parsed) if problem]
        return {"labels": [v for v, _ in parsed]}, problems

    def annotation_targets(
        self, values: Mapping[str, Any] | None, num_classes: int, size: tuple[int, int], ignore_index: int = 255
    ) -> dict[str, Any]:
        """``label``: a float 0/1 vector with ones at the positive classes (none when missing)."""
        label = torch.zeros(num_classes)
        if values is not None:
            label[values["labels"]] = 1.0
        return {"label": label}

    def annotation_from_targets(self, targets: Mapping[str, Any], decimals: int | None = None) -> dict[str, Any]:
        """``{"labels": [positive class indices]}``."""
        return {"labels": np.flatnonzero(np.asarray(targets["label"]) >= 0.5).tolist()}

    def confident(self, head: Any, outputs: Any, threshold: float) -> list[tuple[dict[str, Any], float] | None]:
        """Every class decided at 0.5, when each of them is at least ``threshold`` sure (the
        score is the least sure class's)."""
        probs = head.predict(outputs).float().cpu()
        score = torch.maximum(probs, 1 - probs).min(dim=1).values
        return [
            ({"label": (p >= 0.5).float()}, float(s)) if s >= threshold else None
            for p, s in zip(probs, score, strict=True)
        ]

    def table_class_names(self, columns: Sequence[str], cells: Sequence[str], separator: str = ";") -> list[str]:
        """Several 0/1 columns: the column names; one column: the sorted names found in it."""
        if len(columns) > 1:
            return list(columns)
        return sorted({v.strip() for value in cells for v in value.split(separator) if v.strip()})

    def table_label(
        self, cells: Sequence[str], class_names: Sequence[str], separator: str = ";"
    ) -> tuple[Any, str | None]:
        """Several cells: one 0/1 value per class (checked as the label is); one cell: the
        positive class names joined by ``separator`` (empty: none)."""
        if len(cells) > 1:
            return np.array([_number(c) for c in cells], dtype=np.float32), None
        names = [v.strip() for v in cells[0].split(separator) if v.strip()]
        label = np.isin(class_names, names).astype(np.float32)
        unknown = [n for n in names if n not in class_names]
        return label, f"unknown class names {unknown}; known: {list(class_names)[:10]}" if unknown else None

    def array_label(self, row: np.ndarray) -> Any:
        """The row as a float32 0/1 vector."""
        return row.astype(np.float32)

    def array_num_classes(self, arrays: Sequence[np.ndarray]) -> int:
        """The number of columns."""
        return int(arrays[0].reshape(len(arrays[0]), -1).shape[1])


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
    file_fields = ("mask",)
    count_unit = "pixels"

    def case_targets(self, *, mask: Any, **_: Any) -> dict[str, Any]:
        """``mask`` as an int64 (H, W) tensor of class indices."""
        return {"mask": torch.as_tensor(mask, dtype=torch.int64)}

    def target_problems(self, targets: Mapping[str, Any], *_: Any, **__: Any) -> list[tuple[str, str]]:
        """The sample has a mask (its values are checked once it is read)."""
        return [("mask", "no mask for this image")] if targets.get("mask") is None else []

    def parse_annotation(
        self, values: Mapping[str, Any], num_classes: int | None = None, class_names: Sequence[str] = ()
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """``mask``: the path of a class-index mask file."""
        mask = values.get("mask")
        if not isinstance(mask, str) or not mask:
            return dict(values), [("mask", f"expected a mask file path, got {mask!r}")]
        return {"mask": mask}, []

    def annotation_targets(
        self, values: Mapping[str, Any] | None, num_classes: int, size: tuple[int, int], ignore_index: int = 255
    ) -> dict[str, Any]:
        """``mask`` (the decoded file, integer class indices or ``ignore_index``) as an int64
        tensor; all ``ignore_index`` when missing."""
        if values is None:
            return {"mask": torch.full(size, ignore_index, dtype=torch.long)}
        mask = np.asarray(values["mask"])
        if mask.shape != tuple(size):
            raise ValueError(f"the mask has shape {mask.shape}, the image is {tuple(size)}")
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"the mask holds {mask.dtype}, expected integer class indices")
        bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
        if bad.any():
            raise ValueError(
                f"the mask has values {np.unique(mask[bad])[:5].tolist()} outside "
                f"[0, {num_classes - 1}] and != ignore_index {ignore_index}"
            )
        return {"mask": torch.from_numpy(mask.astype(np.int64))}

    def annotation_from_targets(self, targets: Mapping[str, Any], decimals: int | None = None) -> dict[str, Any]:
        """``{"mask": array}``: uint8 class indices (uint16 from 256 classes on) for the writer."""
        mask = np.asarray(targets["mask"])
        return {"mask": mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)}

    def resize_targets(
        self, targets: Mapping[str, Any], from_size: tuple[int, int], to_size: tuple[int, int]
    ) -> dict[str, Any]:
        """The mask resized by nearest neighbour."""
        if tuple(from_size) == tuple(to_size):
            return dict(targets)
        mask = np.asarray(targets["mask"]).astype(np.int32)
        resized = cv2.resize(mask, (to_size[1], to_size[0]), interpolation=cv2.INTER_NEAREST)
        return {**targets, "mask": torch.from_numpy(resized.astype(np.int64))}

    def confident(self, head: Any, outputs: Any, threshold: float) -> list[tuple[dict[str, Any], float] | None]:
        """The most probable class of each pixel that is at least ``threshold`` sure
        (``ignore_index`` elsewhere), for an image with at least one such pixel; the score is
        the mean probability over them."""
        score, label = outputs.float().softmax(dim=1).max(dim=1)
        sure = score >= threshold
        label[~sure] = head.ignore_index
        count = sure.flatten(1).sum(dim=1)
        mean = (score * sure).flatten(1).sum(dim=1) / count.clamp_min(1)
        return [
            ({"mask": m.cpu()}, float(s)) if n > 0 else None for m, s, n in zip(label, mean, count, strict=True)
        ]


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

    def parse_annotation(
        self, values: Mapping[str, Any], num_classes: int | None = None, class_names: Sequence[str] = ()
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """``boxes``: ``[[x1, y1, x2, y2], ...]`` numbers with ``0 <= x1 < x2`` and ``0 <= y1 <
        y2``; ``box_labels``: a class index or name per box."""
        boxes, labels = values.get("boxes"), values.get("box_labels")
        if not isinstance(boxes, list) or not isinstance(labels, list):
            return dict(values), [("", "detection needs both 'boxes' and 'box_labels' lists")]
        if len(boxes) != len(labels):
            return dict(values), [("box_labels", f"{len(labels)} labels for {len(boxes)} boxes")]
        for i, box in enumerate(boxes):
            numbers = isinstance(box, list) and len(box) == 4
            numbers = numbers and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box
            )
            if not numbers:
                return dict(values), [(f"boxes[{i}]", f"expected [x1, y1, x2, y2] numbers, got {box!r}")]
            if box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
                return dict(values), [(f"boxes[{i}]", f"needs 0 <= x1 < x2 and 0 <= y1 < y2, got {box}")]
        parsed = [class_index(v, num_classes, class_names) for v in labels]
        problems = [(f"box_labels[{i}]", problem) for i, (_, problem) in enumerate(parsed) if problem]
        return {"boxes": boxes, "box_labels": [v for v, _ in parsed]}, problems

    def annotation_targets(
        self, values: Mapping[str, Any] | None, num_classes: int, size: tuple[int, int], ignore_index: int = 255
    ) -> dict[str, Any]:
        """``boxes`` float32 (n, 4) and ``box_labels`` int64 (n,); none when missing.

        Raises:
            ValueError: a box reaches beyond the image.
        """
        values = values or {"boxes": [], "box_labels": []}
        targets = self.case_targets(**values)
        boxes = targets["boxes"]
        h, w = size
        if ((boxes[:, 2] > w) | (boxes[:, 3] > h)).any():
            raise ValueError(f"a box reaches beyond the {w}x{h} image: {boxes.tolist()}")
        return targets

    def annotation_from_targets(self, targets: Mapping[str, Any], decimals: int | None = None) -> dict[str, Any]:
        """``{"boxes": [[x1, y1, x2, y2], ...], "box_labels": [...]}``."""
        boxes = torch.as_tensor(targets["boxes"]).reshape(-1, 4)
        if decimals is not None:
            boxes = boxes.double().round(decimals=decimals)
        return {"boxes": boxes.tolist(), "box_labels": torch.as_tensor(targets["box_labels"]).reshape(-1).tolist()}

    def resize_targets(
        self, targets: Mapping[str, Any], from_size: tuple[int, int], to_size: tuple[int, int]
    ) -> dict[str, Any]:
        """The boxes scaled with the image."""
        boxes = torch.as_tensor(targets["boxes"])
        scale = torch.tensor([to_size[1] / from_size[1], to_size[0] / from_size[0]] * 2, dtype=boxes.dtype)
        return {**targets, "boxes": boxes * scale}

    def confident(self, head: Any, outputs: Any, threshold: float) -> list[tuple[dict[str, Any], float] | None]:
        """The boxes scored at least ``threshold``, for an image with at least one (the score is
        the lowest kept box's)."""
        kept: list[tuple[dict[str, Any], float] | None] = []
        for det in head.predict(outputs):
            keep = det["scores"] >= threshold
            if bool(keep.any()):
                targets = {"boxes": det["boxes"][keep].cpu(), "box_labels": det["labels"][keep].cpu()}
                kept.append((targets, float(det["scores"][keep].min())))
            else:
                kept.append(None)
        return kept
