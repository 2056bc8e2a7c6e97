"""umedpt: multi-task pretraining of biomedical imaging foundation models."""

from umedpt.encoder import SwinEncoder
from umedpt.io import load_encoder, save_encoder
from umedpt.module import MultiTaskModule
from umedpt.tasks import Task

__version__ = "0.1.0"

__all__ = ["MultiTaskModule", "SwinEncoder", "Task", "__version__", "load_encoder", "save_encoder"]
