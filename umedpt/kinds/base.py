"""What a task kind is, and the registry the library looks kinds up in.

A kind (``classification``, ``segmentation``, ...) says what a task's targets are and how the
library treats them: which head a task of that kind gets by default, which validation metric
stands for it, where its targets sit in a batch and how a linear probe evaluates it. Code that
needs such a fact asks the task's kind (``get_kind(task.kind)``) instead of comparing names.

A new kind is a :class:`TaskKind` subclass: decorated with :func:`register_kind` it is found by
its short name, and a task names it by class path without any registration::

    tasks:
      - name: bone_age
        kind: mypackage.kinds.Regression   # a TaskKind subclass
        num_classes: 1
        head: mypackage.heads.RegressionHead
        data: {class_path: mypackage.data.BoneAge}
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

__all__ = ["TaskKind", "get_kind", "kind_names", "register_kind", "same_kind"]


class TaskKind:
    """The facts about one task kind that the loop, the data module, the reports and probes use.

    Subclasses set the class attributes; instances carry no state.

    Attributes:
        name: short name used in task specs (``kind: classification``) and reports.
        default_head: class path of the head a task of this kind gets when it names none (a
            :class:`heads.base.TaskHead`).
        metric: the validation metric that stands for a task of this kind in summaries and
            learning curves (a key of the head's metrics, ``val/<task>/<metric>``).
        target_keys: keys of a case dict that hold this kind's targets.
        list_keys: target keys whose per-sample values differ in length: batches keep them as
            lists instead of stacking them (detection boxes).
        probe_metric: the metric a probe of a held-out task of this kind reports; ``None`` when
            probes do not support the kind (probes evaluate the built-in kinds only).
        dense: targets are per pixel (a probe then trains a decoder on the frozen encoder rather
            than a linear model on pooled features).
        count_unit: what the data checker's class balance counts per class (``samples``,
            ``positives``, ``pixels``, ``boxes``).
        annotation_fields: the fields of an IMAX manifest annotation of this kind
            (:class:`umedpt.data.imax.Annotation`); a kind with one field also accepts the bare
            value (``"xr_grade": 2`` for ``{"label": 2}``).
    """

    name: ClassVar[str] = ""
    default_head: ClassVar[str] = ""
    metric: ClassVar[str] = "loss"
    target_keys: ClassVar[tuple[str, ...]] = ()
    list_keys: ClassVar[tuple[str, ...]] = ()
    probe_metric: ClassVar[str | None] = None
    dense: ClassVar[bool] = False
    count_unit: ClassVar[str] = "samples"
    annotation_fields: ClassVar[tuple[str, ...]] = ()

    def case_targets(self, **values: Any) -> dict[str, Any]:
        """The target entries of one case dict from a sample's annotation values (NumPy arrays,
        numbers or tensors, by target key): what every dataset of this kind returns beside
        ``image``. This default makes each of :attr:`target_keys` a tensor."""
        missing = [key for key in self.target_keys if key not in values]
        if missing:
            raise KeyError(f"{self.name} case: missing target(s) {missing}; expected {list(self.target_keys)}")
        return {key: torch.as_tensor(values[key]) for key in self.target_keys}

    def target_problems(
        self,
        targets: Mapping[str, Any],
        num_classes: int,
        class_names: Sequence[str] = (),
        size: tuple[int, int] | None = None,
        what: str = "image",
        names: Sequence[str] | None = None,
    ) -> list[tuple[str, str]]:
        """``(field, message)`` for each problem of one sample's declared targets, found without
        reading pixels: labels out of range, a missing mask, degenerate boxes.

        Args:
            targets: the sample's declared targets by key (``label``, ``mask`` (a path),
                ``boxes``, ``box_labels``).
            num_classes: the task's class count; ``class_names`` name them in messages.
            size: ``(height, width)`` the boxes must lie in (``None``: not checked); ``what``
                names that size in messages, ``names`` the boxes (default ``box 0``, ...).
        """
        return []

    def class_counts(self, targets: Mapping[str, Any], num_classes: int) -> np.ndarray | None:
        """Per-class counts of one sample known without reading pixels (the data checker's class
        balance), or ``None`` (unknown before decoding, or targets that are not valid)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_REGISTRY: dict[str, TaskKind] = {}
#: instances of the kinds named by class path without registration, one per class
_UNREGISTERED: dict[type[TaskKind], TaskKind] = {}
_K = TypeVar("_K", bound=type[TaskKind])


def register_kind(cls: _K) -> _K:
    """Class decorator: make ``cls`` findable by its short name (``cls.name``)."""
    if not (isinstance(cls, type) and issubclass(cls, TaskKind)):
        raise TypeError(f"register_kind: {cls!r} is not a TaskKind subclass")
    if not cls.name:
        raise ValueError(f"register_kind: {cls.__qualname__} has no name")
    known = _REGISTRY.get(cls.name)
    if known is not None and type(known) is not cls:
        raise ValueError(
            f"register_kind: kind {cls.name!r} is already {type(known).__module__}.{type(known).__qualname__}"
        )
    _REGISTRY[cls.name] = cls()
    return cls


def kind_names() -> list[str]:
    """Short names of the registered kinds, in registration order (the built-in ones first)."""
    return list(_REGISTRY)


def get_kind(kind: str | TaskKind | type[TaskKind]) -> TaskKind:
    """The :class:`TaskKind` of a short name (``"segmentation"``), a class path
    (``"mypackage.kinds.Regression"``), a subclass or an instance.

    Raises:
        ValueError: an unknown short name (the message lists the registered ones).
        ImportError: a class path that does not import.
        TypeError: a class path that names something other than a TaskKind subclass.
    """
    if isinstance(kind, TaskKind):
        return kind
    if isinstance(kind, type) and issubclass(kind, TaskKind):
        return _instance(kind)
    if not isinstance(kind, str):
        raise TypeError(f"a task kind is a name or a class path, got {kind!r}")
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    if "." not in kind:
        raise ValueError(
            f"unknown task kind {kind!r}; expected one of {kind_names()} or the class path of a "
            "umedpt.kinds.TaskKind subclass"
        )
    module_name, _, attr = kind.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"task kind {kind!r}: cannot import module {module_name!r}: {err}") from err
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, TaskKind)):
        raise TypeError(f"task kind {kind!r} is not a umedpt.kinds.TaskKind subclass (got {cls!r})")
    return _instance(cls)


def same_kind(a: str | TaskKind | type[TaskKind], b: str | TaskKind | type[TaskKind]) -> bool:
    """Whether ``a`` and ``b`` name the same kind (a short name and its class path do; a name
    that does not resolve is the same only as the identical name)."""
    if a == b:
        return True
    try:
        return type(get_kind(a)) is type(get_kind(b))
    except (ValueError, ImportError, TypeError):
        return False


def _instance(cls: type[TaskKind]) -> TaskKind:
    """The registered instance of ``cls``, or the one instance of an unregistered class."""
    known = _REGISTRY.get(cls.name)
    if known is not None and type(known) is cls:
        return known
    return _UNREGISTERED.setdefault(cls, cls())
