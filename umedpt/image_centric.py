"""Image-centric training step: one encoder pass per image batch, the heads' losses summed.

When several tasks annotate the same images (an IMAX manifest), the per-task loop of
:class:`~umedpt.module.MultiTaskModule` would encode the same batch once per task.
:class:`ImageCentricModule` groups the tasks whose batches hold the same image tensor (as
:func:`umedpt.data.imax.collate_image_centric` produces), runs the encoder ONCE per group, adds the
heads' losses and runs one backward per group. Tasks with their own images (decentralised data)
form groups of one, i.e. the per-task loop. Samples without a task's annotation
(``present=False``) are left out of that task's loss; pseudo labels (``pseudo=True``) are
weighted by ``pseudo_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning import LightningModule
from torch import Tensor

from umedpt.data.imax import FLAG_KEYS
from umedpt.module import MultiTaskModule

__all__ = ["ImageCentricModule", "select_samples"]


def _rows(value: Any, index: Sequence[int]) -> Any:
    """Rows ``index`` of a tensor (dim 0) or list; anything else unchanged."""
    if torch.is_tensor(value) and value.dim() > 0:
        return value[torch.as_tensor(index, dtype=torch.long, device=value.device)]
    if isinstance(value, list):
        return [value[i] for i in index]
    return value


def select_samples(task_batch: dict[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """The samples ``index`` of a task batch (tensors indexed along dim 0, lists picked)."""
    return {key: _rows(value, index) for key, value in task_batch.items()}


def _flags(task_batch: dict[str, Any], size: int) -> tuple[Tensor, Tensor]:
    """``present`` and ``pseudo`` as CPU bool tensors (all present / none pseudo when absent)."""
    present = task_batch.get("present")
    pseudo = task_batch.get("pseudo")
    present = torch.ones(size, dtype=torch.bool) if present is None else present.cpu().bool()
    pseudo = torch.zeros(size, dtype=torch.bool) if pseudo is None else pseudo.cpu().bool()
    return present, pseudo


class ImageCentricModule(MultiTaskModule):
    """:class:`~umedpt.module.MultiTaskModule` with the image-centric step and pseudo-label weights.

    Args:
        pseudo_weight: loss weight of pseudo-labelled samples relative to real ones, one value
            for all tasks or per task name (tasks not named: 1.0). A task's loss on a batch is
            ``(n_real * L_real + pseudo_weight * n_pseudo * L_pseudo) / (n_real + n_pseudo)``,
            where ``L_real`` / ``L_pseudo`` are the head's loss on the real / pseudo samples.
        step_mode: ``"image_centric"``: tasks sharing an image batch share one encoder pass and
            one backward; ``"per_task"``: the per-task loop of MultiTaskModule (each task
            encodes its own annotated images).
        **kwargs: the arguments of :class:`~umedpt.module.MultiTaskModule` (``tasks``,
            ``encoder``, ``lr`` ...).
    """

    def __init__(
        self,
        pseudo_weight: float | dict[str, float] = 0.5,
        step_mode: Literal["image_centric", "per_task"] = "image_centric",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if step_mode not in ("image_centric", "per_task"):
            raise ValueError(f"step_mode must be 'image_centric' or 'per_task', got {step_mode!r}")
        weights = (
            pseudo_weight if isinstance(pseudo_weight, dict) else dict.fromkeys(self.tasks, pseudo_weight)
        )
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"pseudo_weight names unknown tasks {unknown}; tasks: {self.task_names}")
        bad = {name: w for name, w in weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"pseudo_weight must be >= 0, got {bad}")
        self.pseudo_weights = {name: float(weights.get(name, 1.0)) for name in self.tasks}
        self.save_hyperparameters({**self.hparams, "pseudo_weight": pseudo_weight, "step_mode": step_mode})

    # ------------------------------------------------------------------ losses
    def head_loss(
        self, task_name: str, features: list[Tensor], image_size: Sequence[int], task_batch: dict[str, Any]
    ) -> Tensor:
        """Scaled loss of one task's head on encoder ``features`` of the batch's images.

        Samples with ``present=False`` are left out; real and pseudo samples are weighted as
        described in the class docstring. With no sample left the loss is a zero attached to
        the head's parameters (so backward and DDP still see the head).
        """
        head = self.heads[task_name]
        present, pseudo = _flags(task_batch, features[0].shape[0])
        count = int(present.sum())
        total: Tensor | None = None
        for keep, weight in ((present & ~pseudo, 1.0), (present & pseudo, self.pseudo_weights[task_name])):
            n = int(keep.sum())
            if n == 0 or weight == 0:
                continue
            feats, batch = features, task_batch
            if n < len(keep):
                index = keep.nonzero().flatten().tolist()
                targets = {key: value for key, value in task_batch.items() if key != "image"}
                feats, batch = [_rows(f, index) for f in features], select_samples(targets, index)
            loss = head.loss(head(feats, tuple(image_size)), batch) * (weight * n / count)
            total = loss if total is None else total + loss
        if total is None:
            return self.zero_loss(task_name)
        return self.loss_scales[task_name] * total

    def task_loss(self, task_name: str, task_batch: dict[str, Any]) -> Tensor:
        """Scaled loss of one task, encoding only the images annotated for it (a head that
        encodes the image its own way, such as a masked-image head, takes every image)."""
        if not self.heads[task_name].shares_features:
            return super().task_loss(task_name, task_batch)
        present, _ = _flags(task_batch, task_batch["image"].shape[0])
        if not bool(present.any()):
            return self.zero_loss(task_name)
        if not bool(present.all()):
            task_batch = select_samples(task_batch, present.nonzero().flatten().tolist())
        image = task_batch["image"]
        return self.head_loss(task_name, self.encode(image), image.shape[-2:], task_batch)

    # ------------------------------------------------------------------ the step
    def image_groups(self, batch: dict[str, dict[str, Any]]) -> list[list[str]]:
        """Active tasks grouped by the image tensor their batches hold, in configuration order."""
        groups: dict[int, list[str]] = {}
        for name in self.active_tasks(batch):
            groups.setdefault(id(batch[name]["image"]), []).append(name)
        return list(groups.values())

    keep_on_host = FLAG_KEYS
    # ImageCentricDataModule moves whole batches itself (shared images once, flags on the host);
    # the base hook keeps Lightning from warning that both the module and the data module define it
    transfer_batch_to_device = LightningModule.transfer_batch_to_device

    def step_groups(self, batch: dict[str, Any]) -> list[list[str]]:
        """``image_centric``: tasks grouped by shared images; ``per_task``: one task per group."""
        if self.hparams.step_mode == "per_task":
            return super().step_groups(batch)
        return self.image_groups(batch)

    def group_losses(self, group: list[str], batch: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
        """One encoder pass for the group's shared images, then every head's loss on it."""
        if len(group) == 1 or self.hparams.step_mode == "per_task":
            return super().group_losses(group, batch)
        image = batch[group[0]]["image"]
        # heads that encode the image their own way (a masked image) do not share the features
        shared = {name for name in group if self.heads[name].shares_features}
        features = self.encode(image) if shared else None
        return {
            name: self._finite_or_zero(
                name,
                self.head_loss(name, features, image.shape[-2:], batch[name])
                if name in shared
                else self.task_loss(name, batch[name]),
            )
            for name in group
        }
