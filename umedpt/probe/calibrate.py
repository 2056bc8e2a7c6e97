"""TD-Calib: self-supervised steps on a downstream task's own training images before probing.

A pretrained encoder meets a downstream distribution it has not seen (another scanner, stain or
contrast). Calibration continues self-supervised training (``mim`` and ``feature_mim`` by
default) on the downstream training images, without their labels, for a fixed number of steps;
the probe then extracts features from (or fine-tunes) the calibrated copy. The encoder given is
not changed.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from umedpt.data.loading import collate_cases, seeded_generator
from umedpt.encoder import SwinEncoder
from umedpt.kinds import SSL_KINDS, get_kind
from umedpt.probe.encoders import ProbeError


@dataclass
class Calibration:
    """Budget of TD-Calib, the probe option ``calibrate``.

    Args:
        steps: optimizer steps on the downstream training images.
        kinds: the self-supervised task kinds trained together (each step trains all of them on
            the same batch, each with its own mask).
        batch_size: images per step.
        lr: peak learning rate of the encoder (the SSL heads learn at 3x it); linear warmup over
            10% of the steps, then cosine decay.
        head_args: per kind, arguments of its head (e.g. ``{mim: {mask_patch_size: 8}}``).
        grad_clip_norm: gradient norm clipping per step (``None``: none).
        encoders: the encoders of the probe run to calibrate (``None``: every one); each
            calibrated copy is probed as ``<name>+calib`` beside its original.
        seed: seed of the batches, masks and heads.
    """

    steps: int = 200
    kinds: list[str] = field(default_factory=lambda: list(SSL_KINDS))
    batch_size: int = 32
    lr: float = 1e-4
    head_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    grad_clip_norm: float | None = 1.0
    encoders: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ProbeError(f"calibrate.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ProbeError(f"calibrate.batch_size must be >= 1, got {self.batch_size}")
        if not self.kinds:
            raise ProbeError("calibrate.kinds: give at least one self-supervised kind")
        for kind in self.kinds:
            try:
                image_only = get_kind(kind).image_only
            except (ValueError, ImportError, TypeError) as err:
                raise ProbeError(f"calibrate.kinds: {err}") from err
            if not image_only:
                raise ProbeError(f"calibrate.kinds: {kind!r} is not a self-supervised (image-only) kind")


def calibrate(
    encoder: SwinEncoder, dataset: Dataset, calibration: Calibration, device: str = "cpu"
) -> tuple[SwinEncoder, dict[str, Any]]:
    """A copy of ``encoder`` after ``calibration.steps`` self-supervised steps on ``dataset``'s
    images, and a record of the run (each kind's first and last loss, the images seen)."""
    from umedpt.module import MultiTaskModule
    from umedpt.tasks import Task

    torch.manual_seed(calibration.seed)
    tasks = [
        Task(name=f"calibrate_{kind}", kind=kind, head_args=dict(calibration.head_args.get(kind, {})))
        for kind in calibration.kinds
    ]
    model = MultiTaskModule(
        tasks=tasks, encoder=copy.deepcopy(encoder), lr=calibration.lr, head_lr_factor=3.0, warmup_steps=0.1,
        grad_clip_norm=calibration.grad_clip_norm, export_encoder=False,
    ).to(device)
    optimizer, scheduler = model.build_optimizer(calibration.steps)
    batch_size = min(calibration.batch_size, len(dataset))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_cases,
        generator=seeded_generator(calibration.seed),
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    model.train()
    first: dict[str, float] = {}
    losses: dict[str, torch.Tensor] = {}
    for _ in range(calibration.steps):
        images = {"image": next(batches)["image"].to(device)}
        optimizer.zero_grad(set_to_none=True)
        losses = model.accumulate({task.name: images for task in tasks})
        if calibration.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], calibration.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        model.after_optimizer_step()
        first = first or {name: float(value) for name, value in losses.items()}
    record = {
        "steps": calibration.steps,
        "images": calibration.steps * batch_size,
        "loss_first_last": {name: [first[name], float(losses[name])] for name in first},
    }
    return model.encoder.eval(), record
