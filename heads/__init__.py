"""Task heads: one shared encoder pyramid in, task outputs, loss and metrics out.

``DEFAULT_HEADS`` maps a task kind to the class path of its default head (what a task spec or a
LightningCLI ``class_path`` names).
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

DEFAULT_HEADS: dict[str, str] = {
    "classification": "heads.classification.ClassificationHead",
    "multilabel": "heads.classification.MultiLabelHead",
    "segmentation": "heads.segmentation.SegmentationHead",
    "detection": "heads.detection.DetectionHead",
}
