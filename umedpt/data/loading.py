"""Batching helpers shared by all task datasets: collation, a resumable shuffling sampler and
the training loader that serves a random subset of the tasks per step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities._pytree import tree_unflatten
from torch.utils.data import DataLoader, Sampler, default_collate

#: keys whose per-sample values have different lengths and are kept as lists
LIST_KEYS: tuple[str, ...] = ("boxes", "box_labels")


def collate_cases(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate case dicts: stack fixed-size entries, keep detection targets as lists."""
    if not cases:
        raise ValueError("collate_cases: empty batch")
    keys = set(cases[0])
    for i, case in enumerate(cases[1:], start=1):
        if set(case) != keys:
            raise ValueError(
                f"collate_cases: sample {i} has keys {sorted(case)}, sample 0 has {sorted(keys)}"
            )
    batch = {k: [case[k] for case in cases] for k in keys if k in LIST_KEYS}
    batch.update(default_collate([{k: v for k, v in case.items() if k not in LIST_KEYS} for case in cases]))
    return batch


class EpochShuffleSampler(Sampler[int]):
    """Random permutation that depends only on ``(seed, epoch, pass)``.

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed from a
    checkpoint at an epoch boundary sees exactly the same order as an uninterrupted run.
    Within an epoch each new pass (a shorter task cycled by ``max_size_cycle``) draws a
    new permutation. :meth:`resume_at` continues a pass part-way (a run resumed mid-epoch).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"EpochShuffleSampler: num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._passes = 0
        self._skip = 0  # indices to leave out of the next pass (a pass resumed part-way)
        self._resumed_epoch: int | None = None

    @property
    def current_pass(self) -> int:
        """Index of the pass being served in this epoch (-1 before the first)."""
        return self._passes - 1

    def set_epoch(self, epoch: int) -> None:
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == epoch:  # positioned by resume_at already
            return
        self.epoch = epoch
        self._passes = 0
        self._skip = 0

    def resume_at(self, epoch: int, pass_index: int, skip: int) -> None:
        """Make the next pass pass ``pass_index`` of ``epoch`` without its first ``skip`` indices.

        The following :meth:`set_epoch` call with the same epoch (Lightning makes it before the
        resumed epoch's first batch) keeps this position.
        """
        self.epoch, self._passes, self._skip = epoch, pass_index, skip
        self._resumed_epoch = epoch

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        # SeedSequence mixes the three numbers the same way on every Python version and platform
        state = np.random.SeedSequence([self.seed, self.epoch, self._passes]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        self._passes += 1
        return iter(torch.randperm(self.num_samples, generator=generator)[skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader that can continue an epoch part-way.

    Its sampler gives the position: :class:`EpochShuffleSampler` (indices) or any sampler with
    ``epoch``, ``current_pass`` and ``resume_at(epoch, pass, skip)`` (e.g. the MLLM stage's
    sampler of whole batches, used with ``batch_size=None``).

    It counts the batches it has served in the current pass; Lightning stores
    :meth:`state_dict` in every checkpoint and hands it back through :meth:`load_state_dict`
    when a fit resumes, so a run resumed from a checkpoint written mid-epoch (every N steps)
    trains on exactly the batches the uninterrupted run would have. With any other sampler
    (e.g. Lightning's distributed sampler wrapper) the state is ignored and the resumed epoch
    starts its data order again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0

    def __iter__(self) -> Iterator[Any]:
        self.served = 0
        return _Served(super().__iter__(), self)

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not callable(getattr(sampler, "resume_at", None)):
            return {}
        return {"epoch": sampler.epoch, "pass": sampler.current_pass, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if callable(getattr(sampler, "resume_at", None)) and state and state["pass"] >= 0:
            # a sampler of indices skips batches x batch size; one of whole batches (batch_size None) batches
            sampler.resume_at(state["epoch"], state["pass"], state["batches"] * int(self.batch_size or 1))
            self._resume_served = state["batches"]


class _Served:
    """Iterator of a :class:`ResumableDataLoader` that counts the batches it yields."""

    def __init__(self, iterator: Iterator[Any], loader: ResumableDataLoader) -> None:
        self.iterator, self.loader = iterator, loader
        # a resumed pass has already served the batches it skips
        loader.served = loader.__dict__.pop("_resume_served", 0)

    def __iter__(self) -> _Served:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader.served += 1
        return batch


def task_subset(num_tasks: int, k: int, seed: int, epoch: int, index: int) -> list[int]:
    """Indices (ascending) of the ``k`` of ``num_tasks`` tasks trained by batch ``index`` of ``epoch``.

    Depends only on its arguments, so a run resumed at an epoch boundary draws the same subsets.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    return sorted(torch.randperm(num_tasks, generator=generator)[:k].tolist())


class TaskSubsetLoader(CombinedLoader):
    """Training batches of ``k`` tasks drawn at random per step, ``{task: batch}``, from one loader per task.

    Only the drawn tasks' loaders advance, so a step loads the batches it trains and no others
    (with every task's batch loaded, one task per step of 17 spent most of its data time on
    batches it threw away). Like ``CombinedLoader(mode="max_size_cycle")`` otherwise: Lightning
    prepares every task's DataLoader (distributed samplers, epochs), an epoch lasts as many
    steps as the longest task has batches, a task whose loader runs out starts it again. Every
    process draws the same subsets (they depend on ``seed``, the epoch and the step within it),
    as distributed training needs: each rank then runs the same tasks' backward passes.

    Args:
        loaders: one training DataLoader per task, in task order.
        tasks_per_step: how many tasks each batch holds (1 .. number of tasks).
        seed: seed of the subset draws.
    """

    def __init__(self, loaders: dict[str, Any], tasks_per_step: int, seed: int = 0) -> None:
        if not 1 <= tasks_per_step <= len(loaders):
            raise ValueError(
                f"TaskSubsetLoader: tasks_per_step must be in 1..{len(loaders)} (the number of tasks), "
                f"got {tasks_per_step}"
            )
        super().__init__(loaders, mode="max_size_cycle")
        self.tasks_per_step = tasks_per_step
        self.seed = seed

    def __iter__(self) -> TaskSubsetLoader:
        iterator = _SubsetCycle(self.flattened, self._limits, self.tasks_per_step, self.seed)
        iter(iterator)
        iterator._idx = self.__dict__.pop("_start_index", 0)  # a run resumed mid-epoch
        self._iterator = iterator
        return self

    def _state_dicts(self) -> list[dict[str, Any]]:
        # the per-task loaders' positions, then the step within the epoch (the next subset draw)
        index = self._iterator._idx if isinstance(self._iterator, _SubsetCycle) else 0
        return [*super()._state_dicts(), {"task_subset_index": index}]

    def _load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        if states and "task_subset_index" in states[-1]:
            self._start_index = int(states[-1]["task_subset_index"])
            states = states[:-1]
        super()._load_state_dicts(states)

    def __next__(self) -> tuple[dict[str, Any], int, int]:
        assert self._iterator is not None, "call iter() first"
        out, index, loader_index = next(self._iterator)
        batch = tree_unflatten(out, self._spec)
        return {name: value for name, value in batch.items() if value is not None}, index, loader_index


class _SubsetCycle:
    """Iterator of :class:`TaskSubsetLoader`: ``([batch or None per loader], index, 0)``."""

    def __init__(self, iterables: list[Any], limits: list[int | float] | None, k: int, seed: int) -> None:
        self.iterables = iterables
        self.limits = limits
        self.k = k
        self.seed = seed
        self.iterators: list[Iterator[Any]] = []
        self.epoch: int | None = None
        self._idx = 0

    def __iter__(self) -> _SubsetCycle:
        self.iterators = [iter(iterable) for iterable in self.iterables]
        self.epoch = None
        self._idx = 0
        return self

    def __next__(self) -> tuple[list[Any], int, int]:
        if self._idx >= len(self):
            raise StopIteration
        if self.epoch is None:
            # Lightning sets the samplers' epoch before the epoch's first batch (after iter())
            sampler = getattr(self.iterables[0], "sampler", None)
            self.epoch = int(getattr(sampler, "epoch", 0))
        out: list[Any] = [None] * len(self.iterables)
        for i in task_subset(len(self.iterables), self.k, self.seed, self.epoch, self._idx):
            try:
                out[i] = next(self.iterators[i])
            except StopIteration:
                self.iterators[i] = iter(self.iterables[i])
                out[i] = next(self.iterators[i])
        index = self._idx
        self._idx += 1
        return out, index, 0

    def __len__(self) -> int:
        lengths = [len(iterable) for iterable in self.iterables]
        if self.limits is not None:
            lengths = [min(length, limit) for length, limit in zip(lengths, self.limits, strict=True)]
        return int(max(lengths))

    def reset(self) -> None:
        self.iterators = []
        self._idx = 0
