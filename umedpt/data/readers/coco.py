"""Object detection from COCO JSON annotation files, read with pycocotools."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umedpt.data.normalize import NormalizationSpec
from umedpt.data.problems import Problem
from umedpt.data.readers.base import FileDataset, Item, NonFinite
from umedpt.data.transforms import ResizeMode, TransformSpec

__all__ = ["CocoDetectionDataset"]


def _load_coco(file: Path) -> Any:
    from pycocotools.coco import COCO

    if not file.is_file():
        raise FileNotFoundError(f"COCO annotation file {file} not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(file))
    except Exception as err:  # json errors, pycocotools' assertion on the top-level type
        raise ValueError(f"{file}: not a COCO annotation file ({type(err).__name__}: {err})") from err
    for key in ("images", "categories"):
        if key not in coco.dataset:
            raise ValueError(f"{file}: no {key!r} list; a COCO file has 'images', 'annotations' and 'categories'")
    return coco


class CocoDetectionDataset(FileDataset):
    """Boxes and categories of a COCO ``instances`` JSON, one file per split.

    Every image of the file is a sample, also those without annotations (no boxes). Boxes
    ``[x, y, w, h]`` become ``xyxy`` pixels. Category ids map to contiguous labels ``0 .. K-1``:
    in the order of ``class_names`` (matched to category names) when given, else by increasing
    category id; :attr:`category_mapping` holds the mapping and the data checker prints it.
    Crowd annotations (``iscrowd: 1``) are left out unless ``include_crowd``.

    Args:
        annotations: the JSON file, with ``{split}`` in its path (e.g. ``coco/instances_{split}.json``).
        split: ``train``, ``val`` or ``test``.
        images: folder the ``file_name`` entries are relative to (``{split}`` allowed); default:
            the JSON's folder.
        class_names: category names in label order; None uses every category by increasing id.
        include_crowd: keep ``iscrowd`` annotations as ordinary boxes.
        image_size, transform, normalize, channels, resize, nonfinite: see
            :class:`~umedpt.data.readers.base.FileDataset`.
    """

    def __init__(
        self,
        annotations: str,
        split: str = "train",
        images: str | None = None,
        class_names: Sequence[str] | None = None,
        include_crowd: bool = False,
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        normalize: NormalizationSpec = "auto",
        channels: int = 3,
        resize: ResizeMode = "stretch",
        nonfinite: NonFinite = "error",
    ) -> None:
        super().__init__(split, "detection", image_size=image_size, transform=transform, normalize=normalize,
                         channels=channels, resize=resize, nonfinite=nonfinite)
        if "{split}" not in annotations:
            raise ValueError(
                f"CocoDetectionDataset: annotations {annotations!r} needs {{split}} in its path "
                "(one JSON per split, e.g. instances_{split}.json)"
            )
        file = Path(annotations.format(split=split))
        coco = _load_coco(file)
        categories = sorted(coco.dataset["categories"], key=lambda c: c["id"])
        if class_names is None:
            class_names = [str(c.get("name", c["id"])) for c in categories]
        by_name = {name: label for label, name in enumerate(class_names)}
        unknown = [c.get("name") for c in categories if c.get("name") not in by_name]
        if unknown:
            raise ValueError(f"{file}: categories {unknown} are not in class_names {list(class_names)}")
        self.set_classes(None, class_names)
        #: COCO category id -> contiguous label
        self.category_mapping: dict[int, int] = {int(c["id"]): by_name[c.get("name")] for c in categories}
        root = Path(images.format(split=split)) if images is not None else file.parent
        self.annotation_file = file
        self.items = [self._item(coco, image, root, file.name, include_crowd) for image in coco.dataset["images"]]
        known = {image["id"] for image in coco.dataset["images"]}
        orphans = sorted(set(coco.imgToAnns) - known)
        if orphans:
            self.notes = [
                Problem(str(file), "annotations", f"annotations refer to image ids {orphans[:5]} that are not "
                        "in 'images' and are not used", severity="warning")
            ]

    def _item(self, coco: Any, image: dict[str, Any], root: Path, name: str, include_crowd: bool) -> Item:
        size = (int(image["height"]), int(image["width"])) if "height" in image and "width" in image else None
        item = Item(image=str(root / image.get("file_name", "")), size=size, where=f"{name} image id {image['id']}")
        if not image.get("file_name"):
            item.invalid.append(("file_name", "the image record has no file_name"))
        boxes, labels, ids = [], [], []
        for ann in coco.imgToAnns.get(image["id"], []):
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            bbox, category = ann.get("bbox"), ann.get("category_id")
            if bbox is None or len(bbox) != 4:
                item.invalid.append(("bbox", f"annotation {ann.get('id')} has bbox {bbox!r}, expected [x, y, w, h]"))
            elif category not in self.category_mapping:
                item.invalid.append(
                    ("category_id", f"annotation {ann.get('id')} has category_id {category!r}, not in "
                     f"categories {sorted(self.category_mapping)}")
                )
            else:
                x, y, w, h = (float(v) for v in bbox)
                boxes.append((x, y, x + w, y + h))
                labels.append(self.category_mapping[category])
                ids.append(ann.get("id"))
        item.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        item.box_labels = np.asarray(labels, dtype=np.int64)
        item.box_ids = [f"annotation {i}" for i in ids]
        return item

    def describe(self) -> dict[str, Any]:
        """The category mapping: ``{category id: [label, name]}``."""
        return {
            "annotation_file": str(self.annotation_file),
            "category_mapping": {cid: [label, self.class_names[label]] for cid, label in self.category_mapping.items()},
        }
