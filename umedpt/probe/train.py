"""Supervised runs on a training subset: head probes, fine-tuning and the scratch baseline.

All three train the task's head (``Task.build_head``, the same heads as pretraining) on top of
an encoder for a fixed :class:`TrainBudget` and report the head's metrics on the test split:

- head probe (segmentation, detection, plug-in kinds): the encoder is frozen, only the head learns;
- fine-tuning: encoder and head learn, starting from the given encoder;
- scratch baseline: fine-tuning of a randomly initialised encoder on 100% of the training split.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Subset

from heads.base import TaskHead
from umedpt.data.loading import collate_cases
from umedpt.device import batch_to_device, flush_denormal
from umedpt.encoder import SwinEncoder
from umedpt.optim import warmup_cosine, warmup_length
from umedpt.tasks import Task


@dataclass
class TrainBudget:
    """Optimisation budget of one supervised run.

    Args:
        steps: optimizer steps (AdamW, linear warmup then cosine decay to 1% of the peak).
        batch_size: images per step (the whole subset when it is smaller).
        lr: peak learning rate of the head.
        encoder_lr: peak learning rate of the encoder when it learns. Transformers trained from
            a random init need it well below the head's: at the same rate the features of a
            small Swin collapse to a constant before the head picks them up.
        weight_decay: AdamW weight decay.
        warmup: warmup steps as a fraction of ``steps``.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.encoder_lr < 0:
            raise ValueError(f"TrainBudget: steps, batch_size and lr must be positive, got {self}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"TrainBudget: warmup is a fraction of the steps in [0, 1), got {self.warmup}")


def _batches(loader: DataLoader, steps: int) -> Iterator[dict[str, Any]]:
    """``steps`` batches, cycling through ``loader`` (reshuffled each pass)."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train_and_test(
    encoder: SwinEncoder,
    task: Task,
    train: Dataset,
    indices: Sequence[int] | np.ndarray,
    test: Dataset,
    budget: TrainBudget,
    freeze_encoder: bool,
    seed: int,
    head_defaults: dict[str, Any] | None = None,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``task``'s head (and the encoder unless frozen) on ``train[indices]``; test metrics.

    ``encoder`` itself is never modified (a copy learns).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    torch.manual_seed(seed)
    encoder = copy.deepcopy(encoder).to(device)
    head = task.build_head(encoder.out_channels, encoder.reductions, head_defaults).to(device)
    encoder.train(not freeze_encoder).requires_grad_(not freeze_encoder)
    groups = [{"params": list(head.parameters()), "lr": budget.lr}]
    if not freeze_encoder:
        groups.append({"params": list(encoder.parameters()), "lr": budget.encoder_lr})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=budget.lr, weight_decay=budget.weight_decay)
    scheduler = LambdaLR(optimizer, warmup_cosine(warmup_length(budget.warmup, budget.steps), budget.steps, 0.01))
    loader = DataLoader(
        Subset(train, [int(i) for i in indices]),
        batch_size=min(budget.batch_size, len(indices)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=collate_cases,
    )
    frozen = torch.no_grad() if freeze_encoder else nullcontext()
    with flush_denormal(device):
        for batch in tqdm(
            _batches(loader, budget.steps), total=budget.steps, desc=desc, disable=not progress
        ):
            batch = batch_to_device(batch, device)
            image = batch["image"]
            with frozen:
                features = encoder(image)
            loss = head.loss(head(features, tuple(image.shape[-2:])), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
    return test_metrics(encoder, head, test, budget.batch_size, num_workers, device)


@torch.inference_mode()
def test_metrics(
    encoder: SwinEncoder,
    head: TaskHead,
    test: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """The head's metrics (``head.build_metrics()``) over ``test``."""
    encoder.eval()
    head.eval()
    metrics = head.build_metrics().to(device)
    for batch in DataLoader(test, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_cases):
        batch = batch_to_device(batch, device)
        image = batch["image"]
        head.update_metrics(metrics, head(encoder(image), tuple(image.shape[-2:])), batch)
    return {k: float(v) for k, v in metrics.compute().items() if v.numel() == 1}
