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

__all__ = ["TaskKind", "class_index", "get_kind", "kind_names", "register_kind", "same_kind"]


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
        probe_metric: the metric a probe of a held-out task of this kind reports (``None``: the
            kind's :attr:`metric`).
        linear_probe: a logistic regression on the frozen encoder's pooled features evaluates
            the kind (classification, multi-label); probes of the other kinds train the task's
            head on the frozen encoder instead.
        dense: targets are per pixel.
        count_unit: what the data checker's class balance counts per class (``samples``,
            ``positives``, ``pixels``, ``boxes``).
        annotation_fields: the fields of an IMAX manifest annotation of this kind
            (:class:`umedpt.data.imax.Annotation`); a kind with one field also accepts the bare
            value (``"xr_grade": 2`` for ``{"label": 2}``).
        file_fields: the annotation fields that name a file (a segmentation mask): a manifest
            reader decodes them before :meth:`annotation_targets`, a writer saves them.
        image_only: the kind learns from the image alone (self-supervised): any dataset whose
            cases hold ``image`` serves its tasks, whatever else they hold, and its tasks need
            no ``num_classes``.
        label_columns: ``(fewest, most)`` label columns of the kind's table form (a CSV of
            image paths and labels, an array of label rows; ``most`` ``None``: any number), or
            ``None`` when the kind has none; see :meth:`table_label` and :meth:`array_label`.

    The annotation methods (:meth:`parse_annotation`, :meth:`annotation_targets`,
    :meth:`annotation_from_targets`, :meth:`resize_targets`) let IMAX manifests, the synthetic
    world writer and pseudo-labelling handle a kind; :meth:`confident` lets
    ``umedpt pseudo-label`` choose its confident predictions. A kind that leaves them out is
    trained and evaluated like any other but cannot be written to or read from a manifest.
    """

    name: ClassVar[str] = ""
    default_head: ClassVar[str] = ""
    metric: ClassVar[str] = "loss"
    target_keys: ClassVar[tuple[str, ...]] = ()
    list_keys: ClassVar[tuple[str, ...]] = ()
    probe_metric: ClassVar[str | None] = None
    linear_probe: ClassVar[bool] = False
    dense: ClassVar[bool] = False
    count_unit: ClassVar[str] = "samples"
    annotation_fields: ClassVar[tuple[str, ...]] = ()
    file_fields: ClassVar[tuple[str, ...]] = ()
    label_columns: ClassVar[tuple[int, int | None] | None] = None
    image_only: ClassVar[bool] = False

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

    def parse_annotation(
        self, values: Mapping[str, Any], num_classes: int | None = None, class_names: Sequence[str] = ()
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Check one manifest annotation's :attr:`annotation_fields` (as written in the file) and
        put them in normal form (class names become indices).

        Args:
            values: the annotation's fields of this kind.
            num_classes, class_names: the task's classes; ``None`` when the manifest is read
                without its tasks (class names then stay names).

        Returns:
            The normalised values and ``(field, message)`` for each problem (``field`` such as
            ``labels[2]``; empty for the annotation as a whole).
        """
        return dict(values), []

    def annotation_targets(
        self, values: Mapping[str, Any] | None, num_classes: int, size: tuple[int, int], ignore_index: int = 255
    ) -> dict[str, Any]:
        """The case targets (tensors, by target key) of a parsed annotation whose
        :attr:`file_fields` hold the decoded arrays, at the image's ``(height, width)`` ``size``;
        for ``values=None`` (the image has no annotation of the task) placeholders that the loss
        leaves out (class 0, no positives, an all-``ignore_index`` mask, no boxes).

        Raises:
            ValueError: the values do not fit the image or the classes (the message says how).
        """
        raise NotImplementedError(f"task kind {self.name!r} has no manifest annotation form")

    def annotation_from_targets(self, targets: Mapping[str, Any], decimals: int | None = None) -> dict[str, Any]:
        """The annotation fields of a sample's case targets: the inverse of
        :meth:`annotation_targets`; file fields stay arrays for the writer to save, coordinates
        are rounded to ``decimals`` places when given."""
        raise NotImplementedError(f"task kind {self.name!r} has no manifest annotation form")

    def resize_targets(
        self, targets: Mapping[str, Any], from_size: tuple[int, int], to_size: tuple[int, int]
    ) -> dict[str, Any]:
        """The targets of an image resized from ``from_size`` to ``to_size`` (``(height,
        width)``): image-level targets stay as they are (this default)."""
        return dict(targets)

    def confident(self, head: Any, outputs: Any, threshold: float) -> list[tuple[dict[str, Any], float] | None]:
        """Per image of a batch, ``(targets, score)`` of the head's prediction when its confidence
        reaches ``threshold``, else ``None``: how pseudo-labelling chooses labels of this kind.

        Args:
            head: the task's head (:class:`heads.base.TaskHead`); ``outputs`` its raw outputs.
        """
        raise NotImplementedError(f"task kind {self.name!r} does not choose pseudo labels")

    def table_class_names(self, columns: Sequence[str], cells: Sequence[str], separator: str = ";") -> list[str]:
        """The class names of a table whose label ``columns`` were not given names: inferred
        from ``cells``, the values of the first label column in every row."""
        raise NotImplementedError(f"task kind {self.name!r} has no table form")

    def table_label(
        self, cells: Sequence[str], class_names: Sequence[str], separator: str = ";"
    ) -> tuple[Any, str | None]:
        """``(label, problem)`` of one table row from its label ``cells`` (strings, one per label
        column): the label as :meth:`case_targets` takes it and ``None``, or a placeholder and a
        message saying what is wrong."""
        raise NotImplementedError(f"task kind {self.name!r} has no table form")

    def array_label(self, row: np.ndarray) -> Any:
        """The label of one row of a numeric label array (as MedMNIST stores labels)."""
        raise NotImplementedError(f"task kind {self.name!r} has no table form")

    def array_num_classes(self, arrays: Sequence[np.ndarray]) -> int:
        """The class count of numeric label arrays ``(N, columns)`` (all splits)."""
        raise NotImplementedError(f"task kind {self.name!r} has no table form")

    @property
    def probed_metric(self) -> str:
        """The metric a probe reports: :attr:`probe_metric`, else :attr:`metric`."""
        return self.probe_metric or self.metric

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def class_index(
    value: Any, num_classes: int | None = None, class_names: Sequence[str] = ()
) -> tuple[int | str, str | None]:
    """``(index, None)`` for a class given as an index or a name in ``class_names``, else
    ``(value, message)``; without ``num_classes`` (no task known) names stay names."""
    if isinstance(value, str):
        if num_classes is None:
            return value, None
        if not class_names or value not in class_names:
            return value, f"unknown class name {value!r} (class_names: {list(class_names)})"
        return list(class_names).index(value), None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return value, f"expected a class index or name, got {value!r}"
    if value < 0 or (num_classes is not None and value >= num_classes):
        limit = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        return value, f"class {value} is outside {limit}"
    return int(value), None


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
