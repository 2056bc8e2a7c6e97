"""Task kinds as plug-ins: what each kind of task means, asked instead of comparing names.

``get_kind("segmentation").metric`` is ``"dice"``; a kind of your own is a
:class:`TaskKind` subclass named by class path in a task spec (see :mod:`umedpt.kinds.base`).
"""

from umedpt.kinds.base import TaskKind, get_kind, kind_names, register_kind, same_kind
from umedpt.kinds.builtin import Classification, Detection, MultiLabel, Segmentation
from umedpt.kinds.ssl import FeatureReconstruction, MaskedImageModelling

__all__ = [
    "BUILTIN_KINDS",
    "Classification",
    "Detection",
    "FeatureReconstruction",
    "MaskedImageModelling",
    "MultiLabel",
    "SSL_KINDS",
    "Segmentation",
    "TaskKind",
    "get_kind",
    "kind_names",
    "register_kind",
    "same_kind",
]

#: short names of the built-in kinds
BUILTIN_KINDS: tuple[str, ...] = tuple(k.name for k in (Classification, MultiLabel, Segmentation, Detection))
#: short names of the built-in self-supervised kinds (image only)
SSL_KINDS: tuple[str, ...] = tuple(k.name for k in (MaskedImageModelling, FeatureReconstruction))
