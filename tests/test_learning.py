"""Guards against training that runs but does not learn: collapse of the detection head and overfitting.

Both tests train with the quick recipe's optimisation settings (``configs/umedpt.yaml`` +
``configs/quick.yaml``: learning rates, head learning-rate factor, clipping, schedule, head
defaults, encoder), so a change to the recipe that breaks learning fails here, in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from heads.detection import DetectionHead
from umedpt import MultiTaskModule, SwinEncoder
from umedpt.data import MultiTaskDataModule
from umedpt.data.loading import collate_cases
from umedpt.tasks import Task
from umedpt.testing import quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


def quick_model_config() -> dict[str, Any]:
    merged = OmegaConf.merge(
        OmegaConf.load(ROOT / "configs" / "umedpt.yaml"), OmegaConf.load(ROOT / "configs" / "quick.yaml")
    )
    return OmegaConf.to_container(merged.model, resolve=True)


def fit_one_task(task: Task, num_samples: int, steps: int) -> tuple[MultiTaskModule, Any]:
    """Train ``task`` (``num_samples`` training images) with the quick recipe's settings.

    Returns the model in eval mode and the task's training dataset.
    """
    cfg = quick_model_config()
    kwargs = {k: v for k, v in cfg.items() if k not in ("tasks", "encoder")}
    kwargs.update(export_encoder=False, tasks_per_step=None)
    torch.manual_seed(0)
    model = MultiTaskModule(tasks=[task], encoder=SwinEncoder(**cfg["encoder"]["init_args"]), **kwargs)
    data = MultiTaskDataModule(
        tasks=[task],
        num_workers=0,
        dataset_defaults={"image_size": 64, "num_samples": num_samples, "cache": True},
    )
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(model, datamodule=data)
    return model.eval(), data.datasets["train"][task.name]


def synthetic(style: str, family: str, kind: str, num_classes: int, batch_size: int) -> Task:
    return Task(
        name=f"{style}_{family}",
        kind=kind,
        num_classes=num_classes,
        batch_size=batch_size,
        data={
            "class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
            "init_args": {"style": style, "family": family},
        },
    )


def test_fcos_regression_branch_cannot_die() -> None:
    """torchvision's FCOS clamps box regression with a ReLU: once its inputs are negative everywhere,
    boxes have zero area and no gradient reaches the branch again. The head's branch stays alive."""
    features = [
        torch.randn(2, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32], strict=True)
    ]
    batch = {"boxes": [torch.tensor([[8.0, 8.0, 30.0, 24.0]])] * 2, "box_labels": [torch.tensor([1])] * 2}
    grads = {}
    for positive in (False, True):
        torch.manual_seed(0)
        head = DetectionHead([16, 32, 64, 128], [4, 8, 16, 32], num_classes=4, fpn_channels=32)
        regression_head = head.fcos.head.regression_head
        if not positive:  # torchvision's plain convolution (ReLU only), as a reference
            plain = torch.nn.Conv2d(32, 4, 3, padding=1)
            plain.load_state_dict(regression_head.bbox_reg.state_dict())
            regression_head.bbox_reg = plain
        reg = regression_head.bbox_reg
        with torch.no_grad():
            reg.bias.fill_(-3.0)  # every pre-activation negative: where the ReLU branch died
        out = head(features, (64, 64))
        head.loss(out, batch).backward()
        grads[positive] = (out.head_outputs["bbox_regression"], reg.weight.grad.abs().sum())
    dead_boxes, dead_grad = grads[False]
    assert (dead_boxes == 0).all() and dead_grad == 0  # the failure this head guards against
    boxes, grad = grads[True]
    assert (boxes > 0).all() and grad > 0


def test_detection_does_not_collapse_under_the_quick_recipe() -> None:
    """A brief fit of the quick recipe's detection head gives boxes of real size and several classes."""
    task = synthetic("radiograph", "detection", "detection", 4, batch_size=16)
    model, dataset = fit_one_task(task, num_samples=96, steps=150)
    head = model.heads[task.name]
    head.fcos.score_thresh = 0.05  # see what the head predicts, not only its confident boxes
    batch = collate_cases([dataset[i] for i in range(32)])
    with torch.no_grad():
        predictions = head.predict(model.forward_task(task.name, batch["image"]))
    boxes = torch.cat([p["boxes"] for p in predictions])
    labels = torch.cat([p["labels"] for p in predictions])
    assert len(boxes) >= 32, f"only {len(boxes)} boxes above score 0.05 on 32 training images"
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    degenerate = float(((widths < 1) | (heights < 1)).float().mean())
    assert degenerate < 0.05, f"{degenerate:.0%} of the predicted boxes are narrower than one pixel"
    true = torch.cat(batch["boxes"])
    true_side = ((true[:, 2] - true[:, 0]) * (true[:, 3] - true[:, 1])).sqrt().median()
    side = (widths * heights).sqrt().median()
    assert true_side / 3 < side < true_side * 3, f"median box side {side:.1f} px, objects {true_side:.1f} px"
    assert len(labels.unique()) >= 2, f"every box has class {labels.unique().tolist()}"


def test_a_classification_task_overfits_32_images() -> None:
    """The standard sanity check: the quick recipe's encoder and head memorise 32 images."""
    task = synthetic("radiograph", "grade", "classification", 3, batch_size=16)
    model, dataset = fit_one_task(task, num_samples=32, steps=200)
    batch = collate_cases([dataset[i] for i in range(32)])
    with torch.no_grad():
        logits = model.forward_task(task.name, batch["image"])
    accuracy = float((logits.argmax(1) == batch["label"]).float().mean())
    assert accuracy >= 0.95, f"train accuracy {accuracy:.2f} on 32 images after 200 steps"
