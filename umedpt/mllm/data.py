"""Instruction data: JSONL records, image loading, one-dataset batches and the data module.

A record is one JSON object per line::

    {"image": "img/0001.png", "task": "vqa", "instruction": "is there a nodule?", "answer": "yes",
     "dataset": "my-vqa", "id": "optional unique id", "query": "optional template argument"}

``image`` is a path (relative to ``image_root`` or absolute), a ``synthetic://`` URI (see
:mod:`umedpt.mllm.synthetic`) or ``null`` for text-only tasks. Every dataset has one task. When a
record has a ``query`` and its dataset a template pool, training draws a new instruction from the
pool for every sample (``instruction`` is used as it is for evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from umedpt.data.loading import ResumablePosition
from umedpt.data.synthetic import SPLIT_OFFSETS, render_scene
from umedpt.mllm.jsonl import read_jsonl
from umedpt.mllm.prompts import fill_template

REQUIRED_KEYS: tuple[str, ...] = ("image", "task", "instruction", "answer", "dataset")
SYNTHETIC_SCHEME = "synthetic://"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, checked: required keys, string fields, one task per dataset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {path} does not exist")
    records, task_of = [], {}
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"{where}: missing keys {missing} (a record needs {list(REQUIRED_KEYS)})")
        if not all(isinstance(record[k], str) for k in REQUIRED_KEYS[1:]) or not record["task"]:
            raise ValueError(f"{where}: task, instruction, answer and dataset must be strings")
        if task_of.setdefault(record["dataset"], record["task"]) != record["task"]:
            raise ValueError(
                f"{where}: dataset {record['dataset']!r} mixes tasks {task_of[record['dataset']]!r} and "
                f"{record['task']!r}; give each task its own dataset name"
            )
        record.setdefault("id", f"{path.stem}/{line_no}")
        records.append(record)
    if not records:
        raise ValueError(f"instruction file {path} holds no records")
    return records


def load_image(ref: str, size: int, root: str | Path | None = None) -> Tensor:
    """A (3, size, size) float image normalised as ``(x - 0.5) / 0.25`` (as the synthetic worlds)."""
    if ref.startswith(SYNTHETIC_SCHEME):
        url = urlparse(ref)
        split, index = url.path.strip("/").split("/")
        query = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
        rendered = query.get("size", size)
        image = render_scene(
            url.netloc, query.get("seed", 0), SPLIT_OFFSETS[split] + int(index), rendered
        ).image
    else:
        path = Path(ref) if root is None or Path(ref).is_absolute() else Path(root) / ref
        raw = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_COLOR)
        if raw is None:
            raise FileNotFoundError(f"image {path} does not exist or cannot be read")
        scale = 65535.0 if raw.dtype == np.uint16 else 255.0
        image = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB).astype(np.float32) / scale
    if image.shape[:2] != (size, size):
        shrink = min(image.shape[:2]) >= 2 * size
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(((image - 0.5) * 4.0).transpose(2, 0, 1)))


class InstructionDataset(Dataset):
    """Instruction records with their images; ``dataset[[i, j, ...]]`` returns a list of samples.

    A sample is ``{"image": (3, S, S) tensor or None, "task", "instruction", "answer", "dataset", "id"}``.

    Args:
        records: records as read by :func:`read_records`.
        image_size: side S of the loaded images.
        image_root: directory of relative image paths.
        templates: template pools per dataset name (with ``{}`` for the record's ``query``).
        resample_instructions: draw a new instruction from the pool for each sample (training).
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        image_size: int = 128,
        image_root: str | Path | None = None,
        templates: dict[str, list[str]] | None = None,
        resample_instructions: bool = False,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.image_root = image_root
        self.templates = dict(templates or {})
        self.resample_instructions = resample_instructions

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> dict[str, Any]:
        """Sample ``index`` with its image loaded."""
        record = self.records[index]
        instruction = record["instruction"]
        pool = self.templates.get(record["dataset"])
        if self.resample_instructions and pool and "query" in record:
            instruction = fill_template(pool[int(torch.randint(len(pool), ()))], record["query"])
        image = record["image"]
        return {
            "image": None if image is None else load_image(image, self.image_size, self.image_root),
            "task": record["task"],
            "instruction": instruction,
            "answer": record["answer"],
            "dataset": record["dataset"],
            "id": str(record["id"]),
        }

    def __getitem__(self, index: int | list[int]) -> dict[str, Any] | list[dict[str, Any]]:
        return [self.sample(i) for i in index] if isinstance(index, list) else self.sample(index)


def collate_instructions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One batch of one dataset: ``image`` (B, 3, S, S) or ``None``, ``task``/``dataset`` strings, lists."""
    tasks, datasets = {s["task"] for s in samples}, {s["dataset"] for s in samples}
    if len(tasks) != 1 or len(datasets) != 1:
        raise ValueError(f"collate_instructions: a batch must hold one dataset, got {sorted(datasets)}")
    images = [s["image"] for s in samples]
    if any(i is None for i in images) and not all(i is None for i in images):
        raise ValueError(
            f"collate_instructions: dataset {datasets.pop()!r} mixes samples with and without images"
        )
    return {
        "image": None if images[0] is None else torch.stack(images),
        "task": tasks.pop(),
        "dataset": datasets.pop(),
        "instruction": [s["instruction"] for s in samples],
        "answer": [s["answer"] for s in samples],
        "id": [s["id"] for s in samples],
    }


class DatasetBatchSampler(ResumablePosition, Sampler[list[int]]):
    """Batches of indices from one dataset each.

    Without ``shuffle`` the datasets are served in order of appearance, in consecutive chunks.
    With ``shuffle`` every batch picks a dataset at random with probability proportional to its
    ratio (default: its number of records), then its next ``batch_size`` records of a per-dataset
    permutation (a new permutation when one runs out). The order depends only on
    ``(seed, epoch)``; Lightning calls :meth:`set_epoch`.

    Args:
        datasets: the dataset name of each record.
        batch_size: records per batch (a smaller dataset gives batches of its size).
        shuffle: random order with ratios (training) or sequential (evaluation).
        ratios: sampling ratio per dataset name; names not listed get 1.0. ``None``: sizes.
        num_batches: batches per epoch when shuffling (default: records / batch_size, rounded up).
        seed: seed of the random order.
    """

    def __init__(
        self,
        datasets: Sequence[str],
        batch_size: int,
        shuffle: bool = False,
        ratios: dict[str, float] | None = None,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"DatasetBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.groups: dict[str, list[int]] = {}
        for i, name in enumerate(datasets):
            self.groups.setdefault(name, []).append(i)
        unknown = sorted(set(ratios or {}) - set(self.groups))
        if unknown:
            raise ValueError(f"DatasetBatchSampler: sampling ratios name unknown datasets {unknown}")
        self.weights = torch.tensor(
            [len(ix) if ratios is None else float(ratios.get(n, 1.0)) for n, ix in self.groups.items()],
            dtype=torch.float64,
        )
        if (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError(f"DatasetBatchSampler: ratios must be >= 0 with a positive sum, got {ratios}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_batches = num_batches or math.ceil(len(datasets) / batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        skip = self._next_pass()  # every pass of an epoch serves the same batches
        for i, batch in enumerate(self._batches()):
            if i >= skip:
                yield batch

    def _batches(self) -> Iterator[list[int]]:
        if not self.shuffle:
            for indices in self.groups.values():
                for start in range(0, len(indices), self.batch_size):
                    yield indices[start : start + self.batch_size]
            return
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        streams: dict[int, list[int]] = {}
        names = list(self.groups)
        picks = torch.multinomial(self.weights, self.num_batches, replacement=True, generator=generator)
        for g in picks.tolist():
            indices = self.groups[names[g]]
            take = min(self.batch_size, len(indices))
            stream = streams.setdefault(g, [])
            if len(stream) < take:
                stream += [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            yield stream[:take]
            del stream[:take]

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_batches
        return sum(math.ceil(len(ix) / self.batch_size) for ix in self.groups.values())
