"""Image-centric multi-annotation (IMAX) manifests: one image, the annotations of many tasks.

A manifest lists images; each image carries the annotations of any number of tasks (class,
multi-label findings, mask file, boxes) and optional free text. From one manifest
:class:`ImageCentricDataModule` builds every task: image-centric batches (each image with all of
its annotations, for :class:`umedpt.image_centric.ImageCentricModule`) or, with
``sampling="task"``, one loader per task over the images annotated for it (the decentralised,
DMAX-style mix). The format is described in ``docs/imax.md``; in short, a JSON-lines record is::

    {"image": "images/0001.png", "split": "train", "id": "0001", "text": "free text",
     "annotations": {
        "grade":   {"label": 2},                       # classification: index or class name
        "objects": {"labels": [0, 3]},                 # multi-label: the positive classes
        "seg":     {"mask": "masks/0001.png"},         # segmentation: class-index mask file
        "det":     {"boxes": [[4, 5, 20, 30]], "box_labels": [1]},   # xyxy pixels
        "grade2":  {"label": 1, "pseudo": true, "score": 0.97}}}     # a pseudo label

Paths are relative to the manifest's directory (or absolute). A CSV manifest has the columns
``image``, ``split``, ``id``, ``text`` and one column per task whose cell holds the annotation
as JSON (an empty cell: no annotation). A classification, multi-label or segmentation
annotation may also be written in short form: ``2``, ``[0, 3]``, ``"masks/0001.png"``.
A task without an annotation on an image does not count in that image's loss.

:func:`write_synthetic_world` renders a fully annotated synthetic world to files, and
:func:`imax_view` / :func:`dmax_view` cut label-budget-matched image-centric and decentralised
manifests out of it (``python -m umedpt.data.imax --help``).

The package's modules: ``manifest`` (schema, reading and writing), ``cases`` (records as
tensors, datasets, collate), ``datamodule`` (:class:`ImageCentricDataModule`) and ``world``
(synthetic worlds and views); every name is importable from ``umedpt.data.imax``.
"""

from umedpt.data.imax.cases import (
    CaseBuilder,
    ImageCentricDataset,
    ManifestTaskDataset,
    collate_image_centric,
)
from umedpt.data.imax.datamodule import ImageCentricDataModule
from umedpt.data.imax.manifest import (
    FLAG_KEYS,
    KIND_FIELDS,
    SPLITS,
    Annotation,
    ImageRecord,
    ManifestError,
    annotation_counts,
    read_manifest,
    write_manifest,
)
from umedpt.data.imax.world import (
    DEFAULT_FAMILIES,
    dmax_view,
    imax_view,
    main,
    synthetic_tasks,
    write_synthetic_world,
)

__all__ = [
    "DEFAULT_FAMILIES",
    "FLAG_KEYS",
    "KIND_FIELDS",
    "SPLITS",
    "Annotation",
    "CaseBuilder",
    "ImageCentricDataModule",
    "ImageCentricDataset",
    "ImageRecord",
    "ManifestError",
    "ManifestTaskDataset",
    "annotation_counts",
    "collate_image_centric",
    "dmax_view",
    "imax_view",
    "main",
    "read_manifest",
    "synthetic_tasks",
    "write_manifest",
    "write_synthetic_world",
]
