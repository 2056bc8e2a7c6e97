"""Self-supervised kinds: tasks that learn from the image alone.

A task of these kinds takes any dataset whose cases hold ``image`` (labels, masks or boxes there
are ignored) and needs no ``num_classes``::

    tasks:
      - name: histology_mim
        kind: mim                 # masked image modelling (heads.ssl.MaskedImageHead)
        data: {class_path: umedpt.data.synthetic.SyntheticTaskDataset,
               init_args: {style: histology, family: grade}}
      - name: histology_feature
        kind: feature_mim         # masked feature reconstruction with an EMA teacher
        data: ...
"""

from __future__ import annotations

from umedpt.kinds.base import TaskKind, register_kind

__all__ = ["FeatureReconstruction", "MaskedImageModelling"]


@register_kind
class MaskedImageModelling(TaskKind):
    """Hidden squares of the image are predicted from the rest (SimMIM); metric ``l1`` (lower is better)."""

    name = "mim"
    default_head = "heads.ssl.MaskedImageHead"
    metric = "l1"
    image_only = True


@register_kind
class FeatureReconstruction(TaskKind):
    """An EMA teacher's features at hidden positions are predicted from the rest; metric
    ``distance`` (one minus the cosine similarity, lower is better)."""

    name = "feature_mim"
    default_head = "heads.ssl.FeatureReconstructionHead"
    metric = "distance"
    image_only = True
