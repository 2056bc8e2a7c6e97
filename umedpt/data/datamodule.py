"""MultiTaskDataModule: one DataLoader per task, combined for training."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from umedpt.data.loading import EpochShuffleSampler, ResumableDataLoader, TaskSubsetLoader, collate_cases
from umedpt.data.problems import DataError
from umedpt.kinds import same_kind
from umedpt.tasks import Task, as_task, check_unique, import_class

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: dataset splits each Lightning stage needs
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


def resolved_data(task: Task, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``task.data`` (``class_path``, ``init_args``) with those of the ``defaults`` that its dataset
    class accepts and its own ``init_args`` do not set: how ``dataset_defaults`` reach a task.

    Raises:
        ValueError: the task has no data, or its class does not import.
    """
    if task.data is None:
        raise ValueError(f"task {task.name!r} has no data: set data.class_path (and init_args) in its spec")
    cls = import_class(task.data["class_path"], f"task {task.name!r}: data class")
    accepted = inspect.signature(cls).parameters
    init_args = {k: v for k, v in defaults.items() if k in accepted}
    init_args.update(task.data.get("init_args") or {})
    return {"class_path": task.data["class_path"], "init_args": init_args}


class TaskDataError(DataError):
    """A task's dataset cannot be built; the message names the task and the split.

    The error that stopped the dataset's constructor is chained as ``__cause__``.

    Args:
        task: the task's name.
        split: the split being built.
        message: what went wrong.
    """

    def __init__(self, task: str, split: str, message: str) -> None:
        super().__init__(f"task {task!r} ({split} split): {message}")
        self.task = task
        self.split = split


class MultiTaskDataModule(LightningDataModule):
    """Builds every task's datasets from its ``data`` spec and serves them per task.

    Training batches are ``{task_name: task_batch}`` dicts drawn with Lightning's
    ``CombinedLoader(mode="max_size_cycle")``: an epoch lasts as long as the longest task,
    shorter tasks cycle. With ``tasks_per_step`` each batch holds that many tasks drawn at random
    and only their loaders advance (:class:`~umedpt.data.loading.TaskSubsetLoader`). Validation,
    test and predict use one DataLoader per task, in task order.

    Args:
        tasks: the task list; the CLI links it from ``model.tasks``.
        num_workers: DataLoader worker processes per task (a task's own ``num_workers`` wins);
            training workers persist across epochs, evaluation workers start per evaluation.
        dataset_defaults: keyword arguments given to every task dataset whose constructor
            accepts them and whose spec does not set them (e.g. ``{"image_size": 64}``).
        eval_batch_size: batch size of validation/test/predict loaders; ``None`` uses each
            task's training batch size.
        pin_memory: pin host memory (useful on GPU).
        seed: seed of the training shuffles (each task gets its own stream) and of the task subsets.
        tasks_per_step: serve the batches of this many tasks, drawn at random, per training
            step (``None``: every task's batch in every step). The CLI sets it from
            ``model.tasks_per_step``, so that a step loads only the batches it trains.
        check: data check when a split is built, for datasets that support it (the file readers
            of :mod:`umedpt.data.readers`): ``quick`` checks the declarations (files exist, labels
            in range, boxes valid), ``full`` also decodes every sample, ``off`` skips it. A split
            with errors stops the run, naming the first ones; ``umedpt data check`` lists all.
    """

    def __init__(
        self,
        tasks: list[Task] | None = None,
        num_workers: int = 2,
        dataset_defaults: dict[str, Any] | None = None,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        check: Literal["quick", "full", "off"] = "quick",
        tasks_per_step: int | None = None,
    ) -> None:
        super().__init__()
        self.tasks = [as_task(t) for t in tasks or []]
        if num_workers < 0:
            raise ValueError(f"MultiTaskDataModule: num_workers must be >= 0, got {num_workers}")
        if tasks_per_step is not None and tasks_per_step < 1:
            raise ValueError(f"MultiTaskDataModule: tasks_per_step must be >= 1 or None, got {tasks_per_step}")
        self.tasks_per_step = tasks_per_step
        self.num_workers = num_workers
        self.dataset_defaults = dict(dataset_defaults or {})
        self.eval_batch_size = eval_batch_size
        self.pin_memory = pin_memory
        self.seed = seed
        if check not in ("quick", "full", "off"):
            raise ValueError(f"MultiTaskDataModule: check must be 'quick', 'full' or 'off', got {check!r}")
        self.check = check
        self.datasets: dict[str, dict[str, Dataset]] = {split: {} for split in SPLITS}

    def instantiate_dataset(self, task: Task, split: str) -> Dataset:
        """Instantiate ``task.data`` for ``split`` (with ``dataset_defaults``).

        Raises:
            TaskDataError: naming the task and split, chained to the constructor's error.
        """
        data = resolved_data(task, self.dataset_defaults)
        cls = import_class(data["class_path"], f"task {task.name!r}: data class")
        init_args = data["init_args"]
        try:
            return cls(split=split, **init_args)
        except (TypeError, ValueError, OSError, IndexError) as err:
            raise TaskDataError(task.name, split, str(err)) from err

    @staticmethod
    def spec_errors(task: Task, split: str, dataset: Dataset) -> list[str]:
        """What makes ``dataset`` unusable as the ``split`` of ``task`` (size, classes, kind)."""
        size = len(dataset)
        if size == 0:
            notes = getattr(dataset, "notes", None) or []  # file readers: what they skipped and why
            why = f"; {len(notes)} problem(s) found listing it: " + "; ".join(str(p) for p in notes[:3]) if notes else ""
            return [f"task {task.name!r}: the {split} split is empty{why}"]
        errors = []
        # an image-only (self-supervised) task takes the images of any dataset, whatever its labels
        if not task.task_kind.image_only:
            ds_classes = getattr(dataset, "num_classes", task.num_classes)
            if ds_classes != task.num_classes:
                errors.append(
                    f"task {task.name!r}: num_classes={task.num_classes} but its {split} dataset has {ds_classes} classes"
                )
            ds_kind = getattr(dataset, "kind", None)
            if ds_kind is not None and not same_kind(ds_kind, task.kind):
                errors.append(f"task {task.name!r}: kind={task.kind!r} but its {split} dataset is {ds_kind!r}")
        if split == "train" and size < task.batch_size:
            errors.append(
                f"task {task.name!r}: train split has {size} samples, fewer than batch_size={task.batch_size}"
            )
        return errors

    def build_dataset(self, task: Task, split: str) -> Dataset:
        """Instantiate ``task.data`` for ``split``, check it, with clear errors naming the task."""
        dataset = self.instantiate_dataset(task, split)
        errors = self.spec_errors(task, split, dataset)
        if errors:
            raise ValueError(errors[0])
        problems = getattr(dataset, "problems", None)
        if self.check != "off" and callable(problems):
            found = [p for p in problems(deep=self.check == "full") if p.severity == "error"]
            if found:
                first = "; ".join(str(p) for p in found[:3])
                raise ValueError(
                    f"task {task.name!r} ({split} split): {len(found)} data error(s), first: {first}. "
                    "`umedpt data check -c <config>` lists them all"
                )
        return dataset

    def setup(self, stage: str) -> None:
        check_unique(self.tasks)
        for split in STAGE_SPLITS[stage]:
            for task in self.tasks:
                if task.name not in self.datasets[split]:
                    self.datasets[split][task.name] = self.build_dataset(task, split)

    def _loader(self, task: Task, split: str, index: int) -> DataLoader:
        train = split == "train"
        dataset = self.datasets[split][task.name]
        workers = self.num_workers if task.num_workers is None else task.num_workers
        stream = self.seed * 1000 + index  # each task's own shuffle and worker-seed stream
        batch_size = task.batch_size if train else (self.eval_batch_size or task.batch_size)
        make_loader = getattr(dataset, "dataloader", None)
        if callable(make_loader):  # a streaming dataset brings its own loader (umedpt.data.streaming)
            return make_loader(batch_size=batch_size, num_workers=workers, collate_fn=collate_cases,
                               pin_memory=self.pin_memory, train=train, seed=stream)  # fmt: skip
        # training loaders remember their position: a fit resumed mid-epoch continues it exactly
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(dataset), seed=stream) if train else None,
            drop_last=train,
            num_workers=workers,
            persistent_workers=train and workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_cases,
            # the loader's own stream for its worker seeds: starting an iteration must not draw
            # from the global stream that stochastic depth uses (a resumed run starts its loaders
            # at another point of that stream than the uninterrupted run did)
            generator=torch.Generator().manual_seed(stream),
        )

    def train_dataloader(self) -> CombinedLoader:
        loaders = {t.name: self._loader(t, "train", i) for i, t in enumerate(self.tasks)}
        k = self.tasks_per_step
        if k is None or k >= len(loaders):
            return CombinedLoader(loaders, mode="max_size_cycle")
        return TaskSubsetLoader(loaders, tasks_per_step=k, seed=self.seed)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [self._loader(t, split, i) for i, t in enumerate(self.tasks)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
