"""Frozen-encoder features: one batched pass over a dataset for several encoders, cached on disk.

A cache entry is keyed by the encoder's weights hash, the dataset spec (class path, resolved
arguments, split, length) and the feature transform (``FEATURES``), so the features of one
encoder and split are extracted once and reused by every fraction, seed and later run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from umedpt.data.loading import collate_cases
from umedpt.encoder import SwinEncoder
from umedpt.probe.encoders import ProbeError

#: the feature transform: ``SwinEncoder.embed`` (mean of the last normalised level), float32
FEATURES = "embed-mean-last-level/float32/v1"


@dataclass
class Features:
    """Embeddings of one dataset split and the labels of its items."""

    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64 class indices or (N, K) float32 multi-hot labels


def cache_key(weights: str, data_spec: Mapping[str, Any]) -> str:
    """Hex key of the features of the encoder with weights hash ``weights`` on ``data_spec``."""
    blob = json.dumps(
        {"encoder": weights, "data": data_spec, "features": FEATURES}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class FeatureCache:
    """Feature files ``<key>.npz`` (+ ``<key>.json`` describing them) in ``directory``.

    ``directory=None`` keeps nothing. ``hits`` and ``misses`` count the lookups.
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def load(self, key: str) -> Features | None:
        """The cached features of ``key``, or ``None``."""
        path = self.directory / f"{key}.npz" if self.directory else None
        if path is None or not path.is_file():
            self.misses += 1
            return None
        with np.load(path, allow_pickle=False) as data:
            features = Features(data["x"], data["y"])
        self.hits += 1
        return features

    def save(self, key: str, features: Features, description: Mapping[str, Any]) -> None:
        """Store ``features`` under ``key`` (written to a temporary file, then renamed)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{key}.{os.getpid()}.npz"
        np.savez(tmp, x=features.x, y=features.y)
        os.replace(tmp, self.directory / f"{key}.npz")
        (self.directory / f"{key}.json").write_text(json.dumps(description, indent=2, default=str) + "\n")


def check_channels(encoders: Mapping[str, SwinEncoder], task_name: str, channels: int) -> None:
    """Raise :class:`ProbeError` when an encoder cannot take the task's ``channels``-channel images."""
    for name, encoder in encoders.items():
        if channels != encoder.in_chans and not (channels == 1 and encoder.in_chans == 3):
            raise ProbeError(
                f"encoder {name!r} takes {encoder.in_chans}-channel images but task {task_name!r} gives "
                f"{channels}-channel images; set the dataset's channels or probe an encoder built for them"
            )


def _labels(batch: Mapping[str, Any], task_name: str) -> np.ndarray:
    if "label" not in batch:
        raise ProbeError(
            f"task {task_name!r}: dataset items have no 'label' (keys: {sorted(batch)}); "
            "linear probes need classification or multi-label items"
        )
    return torch.as_tensor(batch["label"]).numpy()


@torch.inference_mode()
def extract(
    encoders: Mapping[str, SwinEncoder],
    dataset: Dataset,
    task_name: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Features]:
    """Embed every item of ``dataset`` with every encoder in ONE pass over the data."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_cases)
    xs: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    ys: list[np.ndarray] = []
    names = ", ".join(encoders)
    with tqdm(
        total=len(dataset), desc=f"features {task_name} [{names}]", unit="img", disable=not progress
    ) as bar:
        for batch in loader:
            images = batch["image"].to(device)
            for name, encoder in encoders.items():
                xs[name].append(encoder.embed(images).float().cpu().numpy())
            ys.append(_labels(batch, task_name))
            bar.update(images.shape[0])
    y = np.concatenate(ys)
    return {name: Features(np.concatenate(parts), y) for name, parts in xs.items()}


def cached_features(
    encoders: Mapping[str, SwinEncoder],
    hashes: Mapping[str, str],
    dataset: Dataset,
    data_spec: Mapping[str, Any],
    task_name: str,
    cache: FeatureCache,
    **extract_kwargs: Any,
) -> dict[str, Features]:
    """Features of every encoder on ``dataset``: from ``cache``, else extracted (in one pass) and stored."""
    keys = {name: cache_key(hashes[name], data_spec) for name in encoders}
    found: dict[str, Features | None] = {name: cache.load(key) for name, key in keys.items()}
    missing = {name: encoders[name] for name, features in found.items() if features is None}
    if missing:
        for name, features in extract(missing, dataset, task_name, **extract_kwargs).items():
            cache.save(keys[name], features, {"encoder": name, "weights": hashes[name], "data": data_spec})
            found[name] = features
    return {name: features for name, features in found.items() if features is not None}
