"""TaskwiseAdamW: AdamW that keeps each task's own moment estimates.

In a multi-task step the tasks' gradients are summed before AdamW divides them, parameter by
parameter, by the root of their second moment. That moment is then dominated by the task with
the largest gradients, so a task whose gradients are a few times smaller than another's moves
the shared encoder a few times less than it would alone. :class:`TaskwiseAdamW` keeps a first
and second moment per task instead: after a task's backward, :meth:`TaskwiseAdamW.accumulate`
takes that task's gradient into its own moments and adds its bias-corrected AdamW direction to
the step; :meth:`TaskwiseAdamW.step` then applies the sum of the directions once, with
decoupled weight decay. Every task therefore moves the encoder as far as it would alone; with
``T`` tasks in a step the step is up to ``T`` times longer than a single task's.

Gradients left in ``.grad`` when :meth:`~TaskwiseAdamW.step` runs belong to an unnamed task, so
an optimizer used without :meth:`~TaskwiseAdamW.accumulate` is AdamW.

:func:`warmup_cosine` is the learning-rate schedule of pretraining, probes and the MLLM stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

#: the task name of gradients that reach :meth:`TaskwiseAdamW.step` without :meth:`accumulate`
UNNAMED_TASK = ""


class TaskwiseAdamW(torch.optim.Optimizer):
    """AdamW with first and second moments per task; one update for all tasks per step.

    Args:
        params: parameters or parameter groups, as for :class:`torch.optim.AdamW`.
        lr: learning rate.
        betas: decay rates of the first and second moment.
        eps: added to the root of the second moment.
        weight_decay: decoupled weight decay (applied once per step to every parameter that
            some task of the step trained).

    Memory: two buffers per task and parameter, plus one for the step being gathered (AdamW
    holds two per parameter); checkpoints carry the moments only.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"TaskwiseAdamW: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TaskwiseAdamW: betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        # the step being gathered: a direction buffer per parameter (kept between steps, zero
        # there, so not optimizer state that checkpoints would carry) and the parameters that
        # some task trained since the last step
        self._updates: dict[Tensor, Tensor] = {}
        self._pending: set[Tensor] = set()

    def _task_moments(self, p: Tensor, task: str) -> dict[str, Any]:
        state = self.state[p]
        tasks = state.setdefault("tasks", {})
        moments = tasks.get(task)
        if moments is None:
            moments = tasks[task] = {
                # a float32 tensor on the parameter's device, as torch's fused AdamW keeps it
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        elif moments["step"].device != p.device:  # loaded from a checkpoint of another device
            moments["step"] = moments["step"].to(device=p.device, dtype=torch.float32)
        return moments

    @torch.no_grad()
    def accumulate(self, task: str, scale: float = 1.0) -> None:
        """Take the gradients now in ``.grad`` as ``task``'s: update its moments, add its AdamW
        direction, times ``scale``, to the step, and clear ``.grad``."""
        if not isinstance(task, str):
            raise TypeError(f"TaskwiseAdamW.accumulate: task must be a str, got {type(task).__name__}")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("TaskwiseAdamW does not support sparse gradients")
            beta1, beta2 = group["betas"]
            moments = [self._task_moments(p, task) for p in params]
            # torch's AdamW kernel on the step buffers instead of the parameters: with lr -1 and
            # no weight decay it adds the bias-corrected direction m / (sqrt(v) + eps) to them
            for p in params:
                if p not in self._updates:
                    self._updates[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
            updates = [self._updates[p] for p in params]
            self._pending.update(params)
            adamw(
                updates,
                [p.grad for p in params],
                [m["exp_avg"] for m in moments],
                [m["exp_avg_sq"] for m in moments],
                [],
                [m["step"] for m in moments],
                fused=all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params),
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=-float(scale),
                weight_decay=0.0,
                eps=group["eps"],
                maximize=False,
            )
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the gathered directions (and weight decay) to the parameters some task trained."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self.accumulate(UNNAMED_TASK)
        for group in self.param_groups:
            params = [p for p in group["params"] if p in self._pending]
            if not params:
                continue
            updates = [self._updates[p] for p in params]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            torch._foreach_zero_(updates)
        self._pending.clear()
        return loss

    def task_names(self) -> list[str]:
        """The tasks that have moments, in the order they were first seen."""
        names: dict[str, None] = {}
        for state in self.state.values():
            names.update(dict.fromkeys(state.get("tasks", {})))
        return list(names)


#: ``MultiTaskModule(jacobian_dtype=...)`` values: the dtypes J of an aggregator may be kept in
JACOBIAN_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: ``MultiTaskModule(aggregator=...)`` value that keeps the plain sum of the task gradients
SUM = "sum"


def build_aggregator(spec: Any) -> Callable[[Tensor], Tensor] | None:
    """The aggregator of a ``MultiTaskModule(aggregator=...)`` value; ``None`` for ``"sum"``.

    ``spec`` is ``"sum"``, a class path (``"torchjd.aggregation.UPGrad"``), a mapping
    ``{"class_path": ..., "init_args": {...}}``, or a callable that maps the matrix of per-task
    gradients (one row per task) to one gradient vector, such as a TorchJD aggregator instance.
    """
    from umedpt.tasks import import_class

    if spec is None or spec == SUM:
        return None
    if callable(spec) and not isinstance(spec, (str, type)):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TypeError(
            f"aggregator must be 'sum', a class path or {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"aggregator {spec['class_path']!r}: unknown keys {unknown}; expected class_path, init_args")
    path = spec["class_path"]
    try:
        cls = import_class(path, "aggregator")
    except ImportError as err:
        if path.startswith("torchjd"):
            raise ImportError(f"{err}; TorchJD aggregators need: pip install 'umedpt[aggregators]'") from err
        raise
    try:
        aggregator = cls(**dict(spec.get("init_args") or {}))
    except TypeError as err:
        raise TypeError(f"aggregator {path!r}: cannot build it with init_args {spec.get('init_args')}: {err}") from err
    if not callable(aggregator):
        raise TypeError(f"aggregator {path!r} is not callable on a matrix of task gradients")
    return aggregator


def warmup_length(warmup: float, total_steps: int) -> int:
    """Warmup steps (at least 1) of a run of ``total_steps``: ``warmup`` < 1 is a fraction of
    them, otherwise a count."""
    return max(1, int(warmup * total_steps) if warmup < 1 else int(warmup))


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier (for ``LambdaLR``): linear warmup to 1 over ``warmup_steps``, then
    cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
