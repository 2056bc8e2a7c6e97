"""Task heads: one shared encoder pyramid in, task outputs, loss and metrics out.

``DEFAULT_HEADS`` maps each built-in task kind to the class path of its default head (what a task
spec or a LightningCLI ``class_path`` names); the kinds themselves (:mod:`umedpt.kinds`) hold it.
"""

from heads.base import TaskHead
from heads.classification import ClassificationHead, MultiLabelHead
from heads.detection import DetectionHead, DetectionMAP, DetectionOutputs
from heads.segmentation import SegmentationHead

__all__ = [
    "DEFAULT_HEADS",
    "ClassificationHead",
    "DetectionHead",
    "DetectionMAP",
    "DetectionOutputs",
    "MultiLabelHead",
    "SegmentationHead",
    "TaskHead",
]


def __getattr__(name: str) -> object:
    # read from the kinds when asked (umedpt.kinds imports umedpt, which imports these heads)
    if name == "DEFAULT_HEADS":
        from umedpt.kinds import BUILTIN_KINDS, get_kind

        return {kind: get_kind(kind).default_head for kind in BUILTIN_KINDS}
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
