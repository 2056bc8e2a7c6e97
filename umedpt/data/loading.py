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

from umedpt.kinds import BUILTIN_KINDS, get_kind

#: keys whose per-sample values have different lengths and are kept as lists (the kinds' list_keys)
LIST_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for name in BUILTIN_KINDS for k in get_kind(name).list_keys))


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


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from ``keys`` (mixed by NumPy's SeedSequence, the same on every
    Python version and platform): the one way the data side derives its random streams."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


class ResumablePosition:
    """Epoch / pass / skip bookkeeping of a sampler that a run resumed mid-epoch continues.

    A subclass calls :meth:`_next_pass` at the start of each ``__iter__`` (it returns how many
    items of the pass to leave out) and reads ``self.epoch`` and ``self._passes``.
    :class:`ResumableDataLoader` stores ``(epoch, current_pass, batches served)`` in checkpoints
    and gives them back through :meth:`resume_at`.
    """

    epoch: int = 0
    _passes: int = 0
    _skip: int = 0  # items to leave out of the next pass (a pass resumed part-way)
    _resumed_epoch: int | None = None

    @property
    def current_pass(self) -> int:
        """Index of the pass being served in this epoch (-1 before the first)."""
        return self._passes - 1

    def set_epoch(self, epoch: int) -> None:
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == epoch:  # positioned by resume_at already
            return
        self.epoch, self._passes, self._skip = epoch, 0, 0

    def resume_at(self, epoch: int, pass_index: int, skip: int) -> None:
        """Make the next pass pass ``pass_index`` of ``epoch`` without its first ``skip`` items.

        The following :meth:`set_epoch` call with the same epoch (Lightning makes it before the
        resumed epoch's first batch) keeps this position.
        """
        self.epoch, self._passes, self._skip = epoch, pass_index, skip
        self._resumed_epoch = epoch

    def _next_pass(self) -> int:
        """Start a pass: the number of its items to skip (then 0 again)."""
        skip, self._skip = self._skip, 0
        self._passes += 1
        return skip


class EpochShuffleSampler(ResumablePosition, Sampler[int]):
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

    def __iter__(self) -> Iterator[int]:
        generator = seeded_generator(self.seed, self.epoch, self._passes)
        skip = self._next_pass()
        return iter(torch.randperm(self.num_samples, generator=generator)[skip:].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader that can continue an epoch part-way.

    Its sampler gives the position: a :class:`ResumablePosition` sampler, of indices
    (:class:`EpochShuffleSampler`) or of whole batches with ``batch_size=None`` (the MLLM stage's).

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
        self._resumed_served = 0  # batches a resumed pass has served before the checkpoint

    def __iter__(self) -> Iterator[Any]:
        self.served, self._resumed_served = self._resumed_served, 0
        return _Served(super().__iter__(), self)

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not isinstance(sampler, ResumablePosition):
            return {}
        return {"epoch": sampler.epoch, "pass": sampler.current_pass, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if isinstance(sampler, ResumablePosition) and state and state["pass"] >= 0:
            # a sampler of indices skips batches x batch size; one of whole batches (batch_size None) batches
            sampler.resume_at(state["epoch"], state["pass"], state["batches"] * int(self.batch_size or 1))
            self._resumed_served = state["batches"]


class _Served:
    """Iterator of a :class:`ResumableDataLoader` that counts the batches it yields."""

    def __init__(self, iterator: Iterator[Any], loader: ResumableDataLoader) -> None:
        self.iterator, self.loader = iterator, loader

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
    return sorted(torch.randperm(num_tasks, generator=seeded_generator(seed, epoch, index))[:k].tolist())


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
        self._start_index = 0  # the step within the epoch a resumed run continues from

    def __iter__(self) -> TaskSubsetLoader:
        iterator = _SubsetCycle(self.flattened, self._limits, self.tasks_per_step, self.seed)
        iter(iterator)
        iterator._idx, self._start_index = self._start_index, 0
        self._iterator = iterator
        return self

    def _state_dicts(self) -> list[dict[str, Any]]:
        # the per-task loaders' positions, then the step within the epoch (the next subset draw);
        # after the epoch's last step the next draw is the next epoch's first: 0, not the length
        # (resumed at the length, the epoch would end at once and the run skip an epoch's draws)
        iterator = self._iterator
        index = iterator._idx if isinstance(iterator, _SubsetCycle) and iterator._idx < len(iterator) else 0
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
