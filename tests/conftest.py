"""Shared fixtures: a tiny Swin encoder and random batches of every task kind."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from umedpt.tasks import Task  # noqa: E402

TINY_ENCODER: dict[str, Any] = {
    "name": "swin_tiny_patch4_window7_224",
    "img_size": 64,
    "model_kwargs": {
        "embed_dim": 16,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 4, 8],
        "window_size": 4,
        "drop_path_rate": 0.0,
    },
}
HEAD_ARGS: dict[str, dict[str, Any]] = {
    "segmentation": {"decoder_channels": 32},
    "detection": {"fpn_channels": 32},
}


def synthetic_task(name: str, style: str, family: str, kind: str, num_classes: int, **kw: Any) -> Task:
    """A task over the embedded synthetic data with small heads."""
    return Task(
        name=name,
        kind=kind,
        num_classes=num_classes,
        data={
            "class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
            "init_args": {"style": style, "family": family},
        },
        head_args=dict(HEAD_ARGS.get(kind, {})),
        **kw,
    )


def mixed_tasks(batch_size: int = 4) -> list[Task]:
    """Four tasks, one of each kind, over three synthetic worlds."""
    return [
        synthetic_task("xr_grade", "radiograph", "grade", "classification", 3, batch_size=batch_size),
        synthetic_task("fl_objects", "fluorescence", "objects", "multilabel", 4, batch_size=batch_size),
        synthetic_task("ct_seg", "ct", "segmentation", "segmentation", 5, batch_size=batch_size),
        synthetic_task("xr_det", "radiograph", "detection", "detection", 4, batch_size=batch_size),
    ]


def random_batch(task: Task, batch_size: int = 2, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A random batch in the format of ``task.kind`` (boxes inside the image, one empty image)."""
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {"image": torch.randn(batch_size, 3, size, size, generator=g)}
    c = task.num_classes
    if task.kind == "classification":
        batch["label"] = torch.randint(0, c, (batch_size,), generator=g)
    elif task.kind == "multilabel":
        batch["label"] = torch.randint(0, 2, (batch_size, c), generator=g).float()
    elif task.kind == "segmentation":
        batch["mask"] = torch.randint(0, c, (batch_size, size, size), generator=g)
    else:
        boxes, labels = [], []
        for i in range(batch_size):
            n = 0 if i == batch_size - 1 else 3
            xy = torch.rand(n, 2, generator=g) * size * 0.6
            wh = 6 + torch.rand(n, 2, generator=g) * size * 0.3
            boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], dim=1))
            labels.append(torch.randint(0, c, (n,), generator=g))
        batch["boxes"], batch["box_labels"] = boxes, labels
    return batch


@pytest.fixture
def tasks() -> list[Task]:
    return mixed_tasks()


@pytest.fixture
def batch(tasks: list[Task]) -> dict[str, dict[str, Any]]:
    return {t.name: random_batch(t, seed=i) for i, t in enumerate(tasks)}


def fit_config(
    path: Path, steps: int, encoder: dict[str, Any], tasks: list[dict[str, Any]], data: dict[str, Any], **model: Any
) -> Path:
    """Write a ``lightning fit`` config for a short CPU run (validation at the end) to ``path``."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps, "max_epochs": -1,
            "log_every_n_steps": 10, "enable_model_summary": False, "enable_progress_bar": False,
            "val_check_interval": steps, "check_val_every_n_epoch": None,
            "default_root_dir": str(path.parent / "runs"),
        },
        "model": {"encoder": {"class_path": "umedpt.SwinEncoder", "init_args": encoder}, **model, "tasks": tasks},
        "data": data,
    }
    path.write_text(yaml.safe_dump(config))
    return path
