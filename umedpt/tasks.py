"""Task specification: what one task is, which head learns it and where its data lives."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from heads.base import TaskHead
from umedpt.kinds import BUILTIN_KINDS, TaskKind, get_kind

#: short names of the built-in kinds (any registered kind or TaskKind class path is accepted)
TASK_KINDS: tuple[str, ...] = BUILTIN_KINDS
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass
class Task:
    """One supervised task of the multi-task mix.

    Args:
        name: unique task name (letters, digits, ``_`` and ``-``); used in logs and module keys.
        kind: ``classification``, ``multilabel``, ``segmentation``, ``detection``, or the class
            path of a :class:`umedpt.kinds.TaskKind` of your own.
        num_classes: number of classes (segmentation: including background); not needed by
            the image-only (self-supervised) kinds ``mim`` and ``feature_mim``.
        data: dataset spec ``{"class_path": ..., "init_args": {...}}``. The class is built once
            per split with an extra ``split=`` argument (``"train"``, ``"val"``, ``"test"``).
        class_names: optional names, one per class.
        head: class path of the head; ``None`` picks the default head of ``kind``.
        head_args: extra keyword arguments of the head.
        loss_scale: factor that normalises the loss to about 1 at initialisation;
            ``None`` uses the head's own (e.g. 1 / ln C for cross-entropy).
        weight: relative weight of this task: its loss is multiplied by it and, with AdamW
            moments per task (``moments: per_task``, whose normalisation would undo a loss
            weight), so is its AdamW direction in the step.
        lr_factor: the head's learning rate relative to the encoder's.
        batch_size: training batch size of this task.
        num_workers: DataLoader workers of this task; ``None`` uses the data module's default.
    """

    name: str
    kind: str
    num_classes: int | None = None
    data: dict[str, Any] | None = None
    class_names: list[str] | None = None
    head: str | None = None
    head_args: dict[str, Any] = field(default_factory=dict)
    loss_scale: float | None = None
    weight: float = 1.0
    lr_factor: float = 1.0
    batch_size: int = 16
    num_workers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"task name {self.name!r} is invalid: use letters, digits, '_' and '-', starting with a letter"
            )
        where = f"task {self.name!r}"
        try:
            kind = get_kind(self.kind)
        except (ValueError, ImportError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from err
        if self.num_classes is None:
            if not kind.image_only:
                raise ValueError(f"{where}: num_classes is required for kind {kind.name!r}")
            self.num_classes = 1  # an image-only kind has no classes; its head ignores the count
        if self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be >= 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{where}: {len(self.class_names)} class_names given for num_classes={self.num_classes}"
            )
        for attr in ("weight", "lr_factor"):
            if getattr(self, attr) < 0:
                raise ValueError(f"{where}: {attr} must be >= 0, got {getattr(self, attr)}")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ValueError(f"{where}: loss_scale must be > 0, got {self.loss_scale}")
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"{where}: num_workers must be >= 0, got {self.num_workers}")
        if self.data is not None and "class_path" not in self.data:
            raise ValueError(
                f"{where}: data must be a mapping with 'class_path' (and optional 'init_args'), "
                f"got keys {sorted(self.data)}"
            )

    @property
    def task_kind(self) -> TaskKind:
        """The :class:`~umedpt.kinds.TaskKind` that ``kind`` names."""
        return get_kind(self.kind)

    @property
    def head_class_path(self) -> str:
        return self.head or self.task_kind.default_head

    def build_head(
        self, in_channels: Sequence[int], reductions: Sequence[int], defaults: dict[str, Any] | None = None
    ) -> TaskHead:
        """Instantiate this task's head for an encoder pyramid; ``head_args`` override ``defaults``."""
        cls = import_class(self.head_class_path, f"task {self.name!r}: head")
        if not (isinstance(cls, type) and issubclass(cls, TaskHead)):
            raise TypeError(f"task {self.name!r}: head {self.head_class_path!r} is not a heads.base.TaskHead")
        try:
            kwargs = {**(defaults or {}), **self.head_args}
            return cls(in_channels=in_channels, reductions=reductions, num_classes=self.num_classes, **kwargs)
        except TypeError as err:
            raise TypeError(f"task {self.name!r}: cannot build head {self.head_class_path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form (safe to store in checkpoints and YAML)."""
        return asdict(self)


def as_task(task: Task | dict[str, Any]) -> Task:
    """Accept a :class:`Task` or its mapping form (as stored in checkpoints)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, dict):
        return Task(**task)
    raise TypeError(f"expected a Task or a mapping, got {type(task).__name__}")


def check_unique(tasks: Sequence[Task]) -> None:
    """Raise when two tasks share a name or the list is empty."""
    if not tasks:
        raise ValueError("no tasks given: configure at least one task under model.tasks")
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise ValueError(f"task name {task.name!r} is used twice; task names must be unique")
        seen.add(task.name)


def import_class(path: str, what: str) -> Any:
    """Import ``package.module.Name``; errors name ``what`` and the path."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{what} {path!r} is not a class path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"{what} {path!r}: cannot import module {module_name!r}: {err}") from err
    if not hasattr(module, attr):
        raise ImportError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
