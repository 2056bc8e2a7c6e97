"""Batching helpers shared by all task datasets: collation and a resumable shuffling sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler, default_collate

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
    new permutation.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"EpochShuffleSampler: num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._passes = 0

    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes the three numbers the same way on every Python version and platform
        state = np.random.SeedSequence([self.seed, self.epoch, self._passes]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        self._passes += 1
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
