"""MultiTaskModule: one shared encoder, one head per task, task-by-task gradient accumulation."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningModule
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from umedpt.data.loading import task_subset
from umedpt.device import HeldFlushDenormal, batch_to_device
from umedpt.encoder import BATCHNORM_REFUSED, SwinEncoder, find_batchnorm
from umedpt.io import CHECKPOINT_KEY, save_encoder
from umedpt.kinds import get_kind
from umedpt.optim import JACOBIAN_DTYPES, SUM, TaskwiseAdamW, build_aggregator, warmup_cosine, warmup_length
from umedpt.randomness import RNG_KEY, restore_rng_states, rng_states
from umedpt.reporting import metrics_by_task
from umedpt.tasks import Task, as_task, check_unique
from umedpt.weighting import COORDINATION_KEY, GradientCoordination, build_loss_weighting


class NonFiniteLossError(FloatingPointError):
    """A task produced a NaN or infinite loss."""


# MultiTaskModule overrides the hook on purpose (per-task transfer, see transfer_batch_to_device);
# Lightning warns about any such override when a DataModule is used.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`", category=UserWarning
)


class MultiTaskModule(LightningModule):
    """Multi-task pretraining of a shared encoder with task-by-task gradient accumulation.

    Each training step runs, for every active task: forward through the shared encoder and the
    task's head, backward, free the graph; then ONE optimizer step. Peak memory is that of one
    task. Under DDP the gradients are synchronised only during the last task's backward.

    Args:
        tasks: the task specs (:class:`umedpt.tasks.Task` or their mapping form).
        encoder: the shared encoder (a :class:`SwinEncoder` or its ``config`` mapping);
            ``None`` builds the default ``swin_tiny_patch4_window7_224``.
        head_defaults: per task kind, head keyword arguments for tasks whose ``head_args``
            do not set them, e.g. ``{"segmentation": {"decoder_channels": 64}}``.
        lr: peak learning rate of the encoder (heads use ``lr * head_lr_factor * task.lr_factor``).
        head_lr_factor: learning rate of every head relative to the encoder's (the quick recipe
            uses 3: a head sees only the steps of its own task, the encoder sees them all).
        weight_decay: AdamW weight decay (not applied to biases and 1-d parameters).
        warmup_steps: linear warmup in optimizer steps; a value < 1 is a fraction of all steps.
        min_lr_ratio: final learning rate of the cosine schedule relative to ``lr``.
        grad_clip_norm: clip the gradient norm to this value (``None``: no clipping).
        grad_clip_mode: ``"global"`` clips the norm of the step's summed gradient (all tasks
            together); ``"per_task"`` clips each task's gradient (shared encoder + its head) on
            its own before it is added to the others', so a task with large gradients cannot
            shrink the share of the step the other tasks get (costs one more copy of the
            encoder's gradients). The same with one task per step.
        moments: ``"shared"``: one AdamW over the step's summed gradient; its per-parameter
            second moment is dominated by the task with the largest gradients, so a task with
            smaller gradients moves the shared encoder less than alone. ``"per_task"``:
            :class:`~umedpt.optim.TaskwiseAdamW` keeps each task's own moments and sums the
            tasks' AdamW directions, so each task moves the encoder as far as alone (a step of
            ``T`` tasks is up to ``T`` times longer); gradients are then clipped per task, and
            the encoder's optimizer state is two buffers per task.
        aggregator: how the step combines the tasks' gradients of the shared encoder. ``"sum"``
            adds them up in ``.grad`` (no extra memory). Otherwise a TorchJD aggregator by class
            path (``"torchjd.aggregation.UPGrad"``, ``MGDA``, ``PCGrad``, ``CAGrad``, ...; a
            mapping with ``class_path`` and ``init_args``; or an instance): after each task's
            backward its encoder gradient is taken out of ``.grad`` into row ``t`` of a matrix J
            (tasks in the order they train; a group of tasks sharing one backward is one row), and
            the encoder's gradient for the step is ``aggregator(J)``. Heads keep their own task's
            gradient. Costs ``T x`` the encoder's size in float32; under DDP each task's backward
            synchronises. With ``grad_clip_mode: per_task`` each row (and its head) is clipped
            before aggregation; global clipping acts on the aggregated gradient.
        jacobian_dtype: the dtype J is kept and aggregated in. ``bfloat16`` / ``float16`` halve
            its memory. TorchJD's PCGrad accepts them (0.2% / 0.03% relative difference to
            float32 on a tiny model's task gradients), MGDA too but its min-norm solve moves
            8%; UPGrad and IMTL-G need float32 (their solvers refuse half precision: the step
            raises, naming the aggregator).
        jacobian_device: where J is kept and aggregated (``None``: the encoder's device;
            ``"cpu"``: host memory, so J costs no accelerator memory; the aggregated gradient
            is moved back). Both only matter with an aggregator other than ``"sum"``.
        coordination: the arguments of :class:`~umedpt.weighting.GradientCoordination`
            (``{alpha: 1.0}``; ``None``: off): the task whose loss falls fastest gets a smaller
            share of each step until the others catch up. The weight multiplies the task's
            gradient, or with ``moments: per_task`` its AdamW direction. Logged as
            ``train/<task>/weight``; the state is checkpointed.
        loss_weighting: a loss weighting of :mod:`umedpt.weighting` by name (``uncertainty``:
            Kendall et al.'s learned log-variances; ``dwa``: Liu et al.'s dynamic weight
            average; ``famo``: Liu et al.'s fast adaptive multitask optimisation) or class path,
            or ``{class_path: ..., init_args: {...}}`` (``None``: off).
            Its weights act like ``coordination``'s (the two are exclusive); logged and
            checkpointed the same way.
        tasks_per_step: train a random subset of this many tasks per step (``None``: all). A
            batch that holds no more tasks than this is trained whole: the CLI gives the value to
            :class:`~umedpt.data.MultiTaskDataModule`, which draws the subset and loads only those
            tasks' batches; a batch of every task is subsampled here.
        nonfinite: ``"raise"`` stops on a NaN/inf task loss naming the task and step;
            ``"skip"`` drops that task's batch with a warning (one host sync per task).
        export_encoder: write ``<log dir>/encoder/`` (safetensors + JSON) when fit ends.
        channels_last: keep convolution weights and input images in channels-last memory
            layout (Swin's feature maps already are). Same results; no speed-up measured on
            CPU (``benchmarks/precision_layout.py``), so it is off by default.
        compile_encoder: compile the encoder with ``torch.compile`` (in place: weights and
            checkpoints keep their names). Steps get faster after a long first compilation
            (see ``benchmarks/precision_layout.py``): worth it for long runs only.
        flush_denormal: flush subnormal floats to zero while fitting on CPU (x86 CPUs run
            10-100x slower on them; small detection-head updates produce them).
        seed: seed of the task subset sampling of batches that hold every task.
    """

    #: batch keys whose tensors stay on the host when a group's batches move to the device
    keep_on_host: tuple[str, ...] = ()
    #: weight of the moving average logged as ``train/<task>/loss_smooth``
    LOSS_EMA: float = 0.9

    def __init__(
        self,
        tasks: list[Task],
        encoder: SwinEncoder | dict[str, Any] | None = None,
        head_defaults: dict[str, dict[str, Any]] | None = None,
        lr: float = 2e-4,
        head_lr_factor: float = 1.0,
        weight_decay: float = 0.05,
        warmup_steps: float = 0.05,
        min_lr_ratio: float = 0.01,
        grad_clip_norm: float | None = 1.0,
        grad_clip_mode: Literal["global", "per_task"] = "global",
        moments: Literal["shared", "per_task"] = "shared",
        aggregator: str | dict[str, Any] = SUM,
        jacobian_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        jacobian_device: str | None = None,
        coordination: dict[str, Any] | None = None,
        loss_weighting: str | dict[str, Any] | None = None,
        tasks_per_step: int | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        export_encoder: bool = True,
        channels_last: bool = False,
        compile_encoder: bool = False,
        flush_denormal: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        task_list = [as_task(t) for t in tasks]
        check_unique(task_list)
        if isinstance(encoder, dict):
            encoder = SwinEncoder(**encoder)
        self.encoder = encoder if encoder is not None else SwinEncoder()
        bn = find_batchnorm(self.encoder)
        if bn and not getattr(self.encoder, "allow_batchnorm", False):  # the ablation's escape hatch
            raise ValueError(f"MultiTaskModule: the shared encoder contains BatchNorm layers {bn[:3]}: {BATCHNORM_REFUSED}")
        self.tasks: dict[str, Task] = {t.name: t for t in task_list}
        head_defaults = dict(head_defaults or {})
        for kind in head_defaults:
            try:
                get_kind(kind)
            except (ValueError, ImportError, TypeError) as err:
                raise type(err)(f"head_defaults: {err}") from err
        self.heads = nn.ModuleDict(
            {
                t.name: t.build_head(
                    self.encoder.out_channels, self.encoder.reductions, head_defaults.get(t.kind)
                )
                for t in task_list
            }
        )
        for head in self.heads.values():
            head.attach(self.encoder)  # e.g. an EMA teacher copies the encoder's initial weights
        self.loss_scales = {
            name: (t.loss_scale or self.heads[name].default_loss_scale) * t.weight
            for name, t in self.tasks.items()
        }
        if tasks_per_step is not None and not 1 <= tasks_per_step <= len(task_list):
            raise ValueError(f"tasks_per_step must be in 1..{len(task_list)}, got {tasks_per_step}")
        if not head_lr_factor > 0:
            raise ValueError(f"head_lr_factor must be > 0, got {head_lr_factor}")
        if grad_clip_mode not in ("global", "per_task"):
            raise ValueError(f"grad_clip_mode must be 'global' or 'per_task', got {grad_clip_mode!r}")
        if moments not in ("shared", "per_task"):
            raise ValueError(f"moments must be 'shared' or 'per_task', got {moments!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        # kept out of the module tree: an aggregator is not part of the model's weights
        object.__setattr__(self, "_aggregator", build_aggregator(aggregator))
        if jacobian_dtype not in JACOBIAN_DTYPES:
            raise ValueError(f"jacobian_dtype must be one of {sorted(JACOBIAN_DTYPES)}, got {jacobian_dtype!r}")
        #: dtype and device of the rows of J (``None``: each parameter's device)
        self._jacobian_dtype = JACOBIAN_DTYPES[jacobian_dtype]
        try:
            self._jacobian_device = torch.device(jacobian_device) if jacobian_device is not None else None
        except RuntimeError as err:
            raise ValueError(f"jacobian_device: {jacobian_device!r} is not a device (e.g. 'cpu', 'cuda:0')") from err
        if self._aggregator is not None and moments == "per_task":
            raise ValueError(
                "aggregator and moments='per_task' both decide how the tasks share the encoder's step; "
                "use one of them (configs/quick.yaml sets moments: per_task: add --model.moments shared)"
            )
        if coordination is not None and not isinstance(coordination, dict):
            raise TypeError(f"coordination: expected the arguments of GradientCoordination (a dict), got {coordination!r}")
        if coordination is not None and loss_weighting is not None:
            raise ValueError("coordination and loss_weighting both weigh the tasks' parts of the step; use one of them")
        #: task weights from the tasks' recent losses: GM-Coord or a loss weighting (``None``: every task weighs 1)
        self.coordination = (
            GradientCoordination(**coordination) if coordination is not None
            else build_loss_weighting(loss_weighting) if loss_weighting is not None else None
        )  # fmt: skip
        # a weighting whose weights depend on what they multiply (a loss or an AdamW direction)
        if callable(getattr(self.coordination, "set_moments", None)):
            self.coordination.set_moments(moments == "per_task")
        if not isinstance(aggregator, (str, dict)):  # a callable: recorded by its (class's) name
            named = aggregator if hasattr(aggregator, "__qualname__") else type(aggregator)
            aggregator = f"{named.__module__}.{named.__qualname__}"
        self.val_metrics = nn.ModuleDict({n: h.build_metrics() for n, h in self.heads.items()})
        self.test_metrics = nn.ModuleDict({n: h.build_metrics() for n, h in self.heads.items()})
        self.eval_losses = nn.ModuleDict({n: MeanMetric() for n in self.tasks})
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._encoder_compiled = False
        # (event, task names, loss values on the host, step) of finiteness checks in flight
        self._pending_checks: list[tuple[Any, list[str], Tensor, int]] = []
        #: detached scaled losses of the last training step per task (read by LearningCurves)
        self.last_losses: dict[str, Tensor] = {}
        self._loss_ema: dict[str, Tensor] = {}
        self._all_parameters: list[nn.Parameter] | None = None
        self._grad_norm: Tensor | None = None
        #: the denormal flush of a fit on CPU, entered at its start and left at its end
        self._denormal = HeldFlushDenormal()
        #: the coordination weights of the last training step per task
        self.last_weights: dict[str, float] = {}
        self.save_hyperparameters(
            {
                "tasks": [t.to_dict() for t in task_list],
                "encoder": self.encoder.config,
                "head_defaults": head_defaults,
                "lr": lr,
                "head_lr_factor": head_lr_factor,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "min_lr_ratio": min_lr_ratio,
                "grad_clip_norm": grad_clip_norm,
                "grad_clip_mode": grad_clip_mode,
                "moments": moments,
                "aggregator": aggregator,
                "jacobian_dtype": jacobian_dtype,
                "jacobian_device": jacobian_device,
                "coordination": coordination,
                "loss_weighting": loss_weighting,
                "tasks_per_step": tasks_per_step,
                "nonfinite": nonfinite,
                "export_encoder": export_encoder,
                "channels_last": channels_last,
                "compile_encoder": compile_encoder,
                "flush_denormal": flush_denormal,
                "seed": seed,
            }
        )

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    # ------------------------------------------------------------------ the loop
    def encode(self, image: Tensor, **kwargs: Any) -> list[Tensor]:
        """Encoder feature pyramid of an image batch, in the module's memory layout (``kwargs``,
        such as a ``mask`` and ``mask_token``, go to the encoder)."""
        if self.hparams.channels_last and image.dim() == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.encoder(image, **kwargs)

    def forward_task(self, task_name: str, image: Tensor) -> Any:
        """The head outputs of one task for a batch of images (encoder + head; a
        self-supervised head encodes a masked image, see ``TaskHead.forward_image``)."""
        return self.heads[task_name].forward_image(self.encode, image)

    def task_loss(self, task_name: str, task_batch: dict[str, Any]) -> Tensor:
        """Scaled loss of one task's batch, graph attached."""
        outputs = self.forward_task(task_name, task_batch["image"])
        return self.loss_scales[task_name] * self.heads[task_name].loss(outputs, task_batch)

    def active_tasks(self, batch: dict[str, Any]) -> list[str]:
        """Tasks trained in this step, in configuration order."""
        missing = [n for n in batch if n not in self.tasks]
        if missing:
            raise KeyError(
                f"batch has tasks {missing} that the model does not know; tasks: {self.task_names}"
            )
        names = [n for n in self.task_names if n in batch]
        k = self.hparams.tasks_per_step
        if k is None or k >= len(names):
            return names
        # the data module's draw (task_subset), here by optimizer step
        chosen = task_subset(len(names), k, self.hparams.seed, 0, self.global_step)
        return [names[i] for i in chosen]

    def step_groups(self, batch: dict[str, Any]) -> list[list[str]]:
        """Tasks that share one forward/backward, in order: here each active task alone."""
        return [[name] for name in self.active_tasks(batch)]

    def group_losses(self, group: list[str], batch: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
        """Scaled losses (graphs attached) of a group of tasks trained by one backward."""
        return {name: self._finite_or_zero(name, self.task_loss(name, batch[name])) for name in group}

    def accumulate(self, batch: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
        """Forward and backward each task in turn (no optimizer step); detached losses per task.

        Gradients add up in ``.grad``. Each task's graph is freed by its backward before the
        next task runs. Attached to a Trainer, all but the last backward skip the DDP
        gradient synchronisation. Each group's batches are moved to the module's device just
        before its forward (training batches stay on the host until then, see
        :meth:`transfer_batch_to_device`), so one task's batch is on the device at a time.
        """
        groups = self.step_groups(batch)
        attached = self._trainer is not None
        optimizer = self.optimizers() if attached else None
        # per-task moments: each group's gradient is taken into its own moments after its backward
        taskwise = optimizer.optimizer if attached and isinstance(optimizer.optimizer, TaskwiseAdamW) else None
        # an aggregator: each group's encoder gradient becomes one row of J
        rows: list[Tensor] | None = [] if self._aggregator is not None else None
        # each group's gradient is used on its own (clipped alone, taken into its moments or into
        # J): the encoder must hold only that group's gradient after its backward
        consumed = taskwise is not None or rows is not None
        separate = self._clips_per_task or consumed
        clip_each = self.hparams.grad_clip_norm is not None and (self._clips_per_task or taskwise is not None)
        # coordination: each task's part of the step is weighted (its gradient, or with per-task
        # moments its AdamW direction, which the gradient's scale would not change)
        weights = self.coordination.weights([n for g in groups for n in g]) if self.coordination else None
        self.last_weights = weights or {}
        losses: dict[str, Tensor] = {}
        for i, group in enumerate(groups):
            last = i == len(groups) - 1
            # a group used on its own is synchronised by its own backward
            deferred = not (last or not attached or separate)
            sync = optimizer.toggle_model(sync_grad=False) if deferred else nullcontext()
            with sync:
                group_losses = self.group_losses(group, self.group_to_device(group, batch))
                if weights is not None and taskwise is None:
                    total = sum(weights[n] * loss for n, loss in group_losses.items())
                else:
                    total = sum(group_losses.values())
                # earlier groups' encoder gradients wait aside unless they were taken already
                earlier = self._stash_encoder_grads() if separate and not consumed else None
                if attached:
                    self.manual_backward(total)
                else:
                    total.backward()
                if clip_each:
                    self._clip_group(group)
                if earlier is not None:
                    self._restore_encoder_grads(earlier)
                if taskwise is not None:
                    # AdamW's normalisation undoes a loss weight: a task's weight scales its direction
                    scale = sum(self.tasks[n].weight * (weights[n] if weights is not None else 1.0) for n in group)
                    taskwise.accumulate("+".join(group), scale / len(group))
                if rows is not None:
                    rows.append(self._take_encoder_grad())
            losses.update({name: loss.detach() for name, loss in group_losses.items()})
            del group_losses, total
        if rows is not None:
            self._set_encoder_grad(self._aggregate(torch.stack(rows)))
        if self.hparams.nonfinite == "raise":
            self._check_finite(losses)
        return losses

    def _take_encoder_grad(self) -> Tensor:
        """The encoder's gradient as one vector of ``jacobian_dtype`` on ``jacobian_device``
        (zeros where a parameter has none); ``.grad`` is left empty."""
        dtype, device = self._jacobian_dtype, self._jacobian_device
        parts = []
        for p in self.encoder.parameters():
            where = p.device if device is None else device
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), device=where, dtype=dtype))
            else:
                parts.append(p.grad.detach().flatten().to(device=where, dtype=dtype))
            p.grad = None
        return torch.cat(parts)

    def _aggregate(self, jacobian: Tensor) -> Tensor:
        """``aggregator(J)``; an aggregator that cannot work in J's dtype is named in the error."""
        try:
            return self._aggregator(jacobian)
        except (TypeError, RuntimeError) as err:
            if jacobian.dtype == torch.float32:
                raise
            raise TypeError(
                f"aggregator {self.hparams.aggregator!r} failed on a Jacobian of dtype {jacobian.dtype} "
                f"({type(err).__name__}): use jacobian_dtype: float32 with it"
            ) from err

    def _set_encoder_grad(self, vector: Tensor) -> None:
        """Write ``vector`` (as :meth:`_take_encoder_grad` lays it out) into the encoder's ``.grad``."""
        params = list(self.encoder.parameters())
        expected = sum(p.numel() for p in params)
        if vector.shape != (expected,):
            raise ValueError(
                f"aggregator returned a tensor of shape {tuple(vector.shape)}, expected ({expected},): "
                "one vector over the encoder's parameters"
            )
        offset = 0
        for p in params:
            p.grad = vector[offset : offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype).clone()
            offset += p.numel()

    @property
    def _per_task_moments(self) -> bool:
        return self.hparams.get("moments", "shared") == "per_task"

    @property
    def _clips_per_task(self) -> bool:
        hp = self.hparams
        return hp.get("grad_clip_mode", "global") == "per_task" and hp.grad_clip_norm is not None

    def _stash_encoder_grads(self) -> list[Tensor | None]:
        """The encoder's gradients of the earlier groups of this step; ``.grad`` is left empty."""
        earlier = []
        for p in self.encoder.parameters():
            earlier.append(p.grad)
            p.grad = None
        return earlier

    def _clip_group(self, group: list[str]) -> None:
        """Clip the gradient of the encoder and ``group``'s heads (holding only this group's)."""
        params = [p for p in self.encoder.parameters() if p.grad is not None]
        params += [p for name in group for p in self.heads[name].parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip_norm, foreach=True)

    def _restore_encoder_grads(self, earlier: list[Tensor | None]) -> None:
        """Add the earlier groups' encoder gradients (from :meth:`_stash_encoder_grads`) back."""
        for p, grad in zip(self.encoder.parameters(), earlier, strict=True):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)

    def group_to_device(self, group: list[str], batch: dict[str, Any]) -> dict[str, Any]:
        """The batches of ``group`` on the module's device (a tensor shared by tasks moves once;
        tensors under the keys of ``keep_on_host`` stay where they are)."""
        return batch_to_device({name: batch[name] for name in group}, self.device, self.keep_on_host)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Training batches stay on the host: :meth:`accumulate` moves one group's batches at a time.

        With all tasks' batches moved at once, the device would hold every task's images for the
        whole step; moved per group, it holds those of the group being trained.
        """
        trainer = self._trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and set(batch) <= set(self.tasks):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _finite_or_zero(self, task_name: str, loss: Tensor) -> Tensor:
        """With ``nonfinite="skip"``, a non-finite task loss becomes a zero (with a warning)."""
        if self.hparams.nonfinite != "skip" or bool(torch.isfinite(loss)):
            return loss
        warnings.warn(
            f"task {task_name!r}: non-finite loss {loss.item()} at step {self.global_step}; batch skipped",
            RuntimeWarning,
            stacklevel=3,
        )
        return self.zero_loss(task_name)

    def zero_loss(self, task_name: str) -> Tensor:
        """A zero loss attached to the task's head (its backward gives zero head gradients)."""
        return sum(p.sum() for p in self.heads[task_name].parameters()) * 0.0

    def _check_finite(self, losses: dict[str, Tensor]) -> None:
        """Raise :class:`NonFiniteLossError` for a NaN/inf task loss.

        On CPU the check is immediate. On an accelerator it does not stall the host: the flags
        are copied without blocking and checked once they have arrived (at a later step at the
        latest when fit ends), so the error may name a step a little before the current one.
        """
        values = torch.stack(list(losses.values())).float()
        names, step = list(losses), self.global_step
        if values.device.type == "cpu":
            self._raise_if_nonfinite(names, values, step)
            return
        pending = values.to("cpu", non_blocking=True)
        event = torch.Event(values.device)
        event.record()
        self._pending_checks.append((event, names, pending, step))
        self._poll_finite_checks(wait=False)

    def _poll_finite_checks(self, wait: bool) -> None:
        while self._pending_checks and (wait or self._pending_checks[0][0].query()):
            event, names, values, step = self._pending_checks.pop(0)
            event.synchronize()
            self._raise_if_nonfinite(names, values, step)

    @staticmethod
    def _raise_if_nonfinite(names: list[str], values: Tensor, step: int) -> None:
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = {n: float(v) for n, v, ok in zip(names, values.tolist(), finite.tolist(), strict=True) if not ok}
            raise NonFiniteLossError(
                f"non-finite loss in task(s) {list(bad)} at step {step} ({bad}); "
                "set model.nonfinite=skip to drop such batches"
            )

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        losses = self.accumulate(batch)
        optimizer.step()
        self.lr_schedulers().step()
        self.after_optimizer_step()
        self.last_losses = losses
        if self.coordination is not None:
            # every rank weighs the tasks alike: from the losses averaged over the ranks
            values = torch.stack([v.float() for v in losses.values()])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(values)
                values /= torch.distributed.get_world_size()
            self.coordination.update(dict(zip(losses, values.tolist(), strict=True)))
        total = torch.stack(list(losses.values())).sum()
        # each task's own loss, smoothed over the steps that trained it (train/loss mixes tasks)
        for name, value in losses.items():
            previous = self._loss_ema.get(name)
            self._loss_ema[name] = value if previous is None else previous.lerp(value, 1.0 - self.LOSS_EMA)
        if self._logs_this_step():
            batch_size = sum(batch[n]["image"].shape[0] for n in losses)
            self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
            self.log_dict({f"train/{n}/loss": v for n, v in losses.items()}, batch_size=batch_size)
            self.log_dict(
                {f"train/{n}/loss_smooth": self._loss_ema[n] for n in losses}, batch_size=batch_size
            )
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=batch_size)
            if self.last_weights:
                self.log_dict({f"train/{n}/weight": w for n, w in self.last_weights.items()}, batch_size=batch_size)
            if self._grad_norm is not None:
                self.log("train/grad_norm", self._grad_norm)
        return total

    def after_optimizer_step(self) -> None:
        """What follows every optimizer step of the encoder: each head's ``after_step`` (an EMA
        teacher follows the encoder). Loops of their own that step the optimizer call it too."""
        for head in self.heads.values():
            head.after_step(self.encoder)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # gradients are unscaled here (also with fp16 + GradScaler)
        if self.hparams.grad_clip_norm is not None and not self._clips_per_task and not self._per_task_moments:
            # only the parameters this step trained (the other tasks' heads have no gradient); the
            # list of all parameters is kept: walking 17 heads' modules every step cost ~5 ms
            if self._all_parameters is None:
                self._all_parameters = list(self.parameters())
            trained = [p for p in self._all_parameters if p.grad is not None]
            self._grad_norm = torch.nn.utils.clip_grad_norm_(trained, self.hparams.grad_clip_norm, foreach=True)

    def _logs_this_step(self) -> bool:
        """Whether the step just taken is one the loggers record (every ``log_every_n_steps``, the
        first and the last): logging 50 values through Lightning every step cost a few ms a step."""
        trainer = self._trainer
        if trainer is None:
            return False
        every = trainer.log_every_n_steps
        step = self.global_step
        return every > 0 and (step % every == 0 or step == 1 or trainer.should_stop or step >= trainer.max_steps > 0)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, split: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        name = self.task_names[dataloader_idx]
        head = self.heads[name]
        outputs = self.forward_task(name, batch["image"])
        self.eval_losses[name].update(self.loss_scales[name] * head.loss(outputs, batch))
        metrics = self.val_metrics if split == "val" else self.test_metrics
        head.update_metrics(metrics[name], outputs, batch)

    def _eval_epoch_end(self, split: str) -> None:
        metrics = self.val_metrics if split == "val" else self.test_metrics
        values: dict[str, Tensor] = {}
        task_losses = []
        for name in self.task_names:
            if self.eval_losses[name].update_count == 0:
                continue
            loss = self.eval_losses[name].compute()
            task_losses.append(loss)
            values[f"{split}/{name}/loss"] = loss
            for key, value in metrics[name].compute().items():
                if value.numel() == 1:
                    values[f"{split}/{name}/{key}"] = value.float()
            metrics[name].reset()
            self.eval_losses[name].reset()
        if task_losses:
            values[f"{split}/loss"] = torch.stack(task_losses).mean()
            self.log_dict(values, sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        name = self.task_names[dataloader_idx]
        return {"task": name, "prediction": self.heads[name].predict(self.forward_task(name, batch["image"]))}

    # ------------------------------------------------------------------ optimisation
    def build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
        """AdamW over the encoder and every head (``lr * head_lr_factor * lr_factor``), and the per-step schedule."""
        hp = self.hparams
        # one group per (learning rate, weight decay): the heads of tasks with the same learning
        # rate share groups (34 groups for 17 heads made each AdamW step ~2 ms slower)
        merged: dict[tuple[float, float], list[nn.Parameter]] = {}
        modules = [(self.encoder, hp.lr)]
        modules += [(head, hp.lr * hp.get("head_lr_factor", 1.0) * self.tasks[name].lr_factor) for name, head in self.heads.items()]
        for module, lr in modules:
            for group in param_groups_weight_decay(module, hp.weight_decay):
                merged.setdefault((lr, group["weight_decay"]), []).extend(group["params"])
        groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in merged.items()]
        if self._per_task_moments:
            optimizer: torch.optim.Optimizer = TaskwiseAdamW(groups, lr=hp.lr)
        else:
            # fused: one kernel per step, no temporaries the size of the parameters (foreach has them)
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=True)
        total = max(1, total_steps)
        schedule = warmup_cosine(warmup_length(hp.warmup_steps, total), total, hp.min_lr_ratio)
        return optimizer, LambdaLR(optimizer, schedule)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = self.build_optimizer(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.encoder.config
        # stochastic depth, dropout and host-side augmentation draw from these streams: a run
        # resumed from this checkpoint continues them instead of restarting them
        checkpoint[RNG_KEY] = rng_states()
        if self.coordination is not None:
            checkpoint[COORDINATION_KEY] = self.coordination.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY])
        if self.coordination is not None and COORDINATION_KEY in checkpoint:
            self.coordination.load_state_dict(checkpoint[COORDINATION_KEY])

    def configure_model(self) -> None:
        if self.hparams.compile_encoder and not self._encoder_compiled:
            self.encoder.compile()
            self._encoder_compiled = True

    def on_fit_start(self) -> None:
        self._all_parameters = None  # configure_model may have changed the modules
        if self._per_task_moments and str(self.trainer.precision).startswith("16"):
            raise ValueError(
                f"moments='per_task' takes each task's gradient before the optimizer step, where "
                f"fp16's loss scaler unscales them; use precision bf16-mixed or 32-true, "
                f"not {self.trainer.precision!r}"
            )
        self._denormal.start(self.device, self.hparams.flush_denormal)

    def on_train_end(self) -> None:
        self._poll_finite_checks(wait=True)

    def on_fit_end(self) -> None:
        self._denormal.stop()
        if not self.trainer.is_global_zero:
            return
        table = self.metrics_table("val")
        if table:
            print(table)
        if self.hparams.export_encoder:
            root = self.trainer.log_dir or self.trainer.default_root_dir
            path = save_encoder(self.encoder, Path(root) / "encoder")
            print(f"umedpt: encoder exported to {path}")

    def metrics_table(self, split: str) -> str:
        """The last logged ``split`` metrics as a text table, one row per task."""
        rows = []
        for name, values in metrics_by_task(self.trainer.callback_metrics, split, self.task_names).items():
            cells = "  ".join(f"{k}={v:.3f}" for k, v in values.items())
            rows.append(f"  {name:<24} {self.tasks[name].kind:<15} {cells}")
        return f"umedpt: {split} metrics per task\n" + "\n".join(rows) if rows else ""
