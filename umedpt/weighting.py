"""Task weights that change during training, decided from the tasks' losses.

:class:`GradientCoordination` is a gradient-guided coordination of tasks in the spirit of UMD's
GM-Coord: the task whose loss currently falls fastest dominates the shared encoder's updates,
so its share of each step is damped until the others catch up (``MultiTaskModule(coordination=...)``).
:class:`UncertaintyWeighting` (Kendall et al., 2018) and :class:`DynamicWeightAverage` (Liu et
al., 2019) and :class:`FastAdaptiveWeighting` (FAMO, Liu et al., 2023) are loss weightings
(``MultiTaskModule(loss_weighting=...)``).

All of them need no per-task gradients, only the scaled losses the loop already has, and share
one interface: ``weights(tasks)`` before a step, ``update(losses)`` after it, ``state_dict`` /
``load_state_dict`` for checkpoints. A weight multiplies the task's part of the step (its loss,
or with AdamW moments per task its AdamW direction, which a loss weight would not change).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "COORDINATION_KEY",
    "LOSS_WEIGHTINGS",
    "DynamicWeightAverage",
    "FastAdaptiveWeighting",
    "GradientCoordination",
    "UncertaintyWeighting",
    "build_loss_weighting",
]

#: checkpoint entry of the coordination state (its moving averages of the task losses)
COORDINATION_KEY = "umedpt_coordination"


class GradientCoordination:
    """Damp the task that improves fastest; the others keep weight 1.

    Each task's recent progress is the drop of its scaled loss (about 1 at initialisation)
    between a slow and a fast moving average: ``d_t = slow_t - fast_t`` (positive while the loss
    falls). A task's dominance is its share of the mean progress, ``rho_t = d_t / mean(d)``,
    the mean over every task that has both averages (not only the tasks of the step, so that it
    also works when each step trains one task); a dominant task (``rho_t > 1``) gets the weight
    ``1 - tanh(alpha * (rho_t - 1))``, floored at ``min_weight``. While no task improves
    (``mean(d) <= eps``) every weight is 1.

    Args:
        alpha: strength of the damping (0: off).
        fast: decay of the fast moving average of each task's loss, per update of that task.
        slow: decay of the slow moving average (``slow > fast``).
        warmup: updates of a task before its progress counts (its averages settle first).
        min_weight: the smallest weight a task gets.
        eps: the mean progress below which no task is damped.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        fast: float = 0.9,
        slow: float = 0.99,
        warmup: int = 50,
        min_weight: float = 0.1,
        eps: float = 1e-4,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"GradientCoordination: alpha must be >= 0, got {alpha}")
        if not 0.0 <= fast < slow < 1.0:
            raise ValueError(f"GradientCoordination: need 0 <= fast < slow < 1, got fast={fast}, slow={slow}")
        if not 0.0 < min_weight <= 1.0:
            raise ValueError(f"GradientCoordination: min_weight must be in (0, 1], got {min_weight}")
        self.alpha, self.fast, self.slow = float(alpha), float(fast), float(slow)
        self.warmup, self.min_weight, self.eps = int(warmup), float(min_weight), float(eps)
        #: per task: ``[fast average, slow average, updates]``
        self.averages: dict[str, list[float]] = {}

    def progress(self) -> dict[str, float]:
        """Each settled task's recent progress ``d_t`` (slow minus fast average of its loss)."""
        return {n: s - f for n, (f, s, count) in self.averages.items() if count >= self.warmup}

    def weights(self, tasks: Sequence[str]) -> dict[str, float]:
        """The weight of each of ``tasks`` for the coming step (1 for unsettled tasks)."""
        progress = self.progress()
        mean = sum(progress.values()) / len(progress) if progress else 0.0
        out = {}
        for task in tasks:
            rho = progress[task] / mean if task in progress and mean > self.eps else 1.0
            damped = 1.0 - math.tanh(self.alpha * (rho - 1.0)) if rho > 1.0 else 1.0
            out[task] = max(self.min_weight, damped)
        return out

    def update(self, losses: Mapping[str, float]) -> None:
        """Take the scaled losses of the tasks of the step just taken (finite values only)."""
        for task, value in losses.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            state = self.averages.get(task)
            if state is None:
                self.averages[task] = [value, value, 1]
                continue
            state[0] = self.fast * state[0] + (1.0 - self.fast) * value
            state[1] = self.slow * state[1] + (1.0 - self.slow) * value
            state[2] += 1

    def state_dict(self) -> dict[str, Any]:
        """The moving averages (checkpointed with the module)."""
        return {"averages": {n: list(v) for n, v in self.averages.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.averages = {n: [float(v[0]), float(v[1]), int(v[2])] for n, v in state["averages"].items()}

    def __repr__(self) -> str:
        return (
            f"GradientCoordination(alpha={self.alpha}, fast={self.fast}, slow={self.slow}, "
            f"warmup={self.warmup}, min_weight={self.min_weight})"
        )


class UncertaintyWeighting:
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018).

    Each task has a log-variance ``s_t``; the weighted objective is ``exp(-s_t) L_t + s_t``, whose
    derivative in ``s_t`` is ``1 - exp(-s_t) L_t``. Here ``s_t`` learns by its own gradient step of
    size ``lr`` on that objective after each step that trained the task (from the observed scaled
    loss, so the module's optimizer and its moments are untouched), and the task's weight is
    ``exp(-s_t)``, clamped to ``[min_weight, max_weight]``: at equilibrium ``exp(-s_t) = 1 / L_t``,
    so tasks whose losses are large count less.

    Args:
        lr: step size of the log-variances.
        min_weight, max_weight: bounds of the weights.
    """

    def __init__(self, lr: float = 0.01, min_weight: float = 0.1, max_weight: float = 10.0) -> None:
        if not lr > 0:
            raise ValueError(f"UncertaintyWeighting: lr must be > 0, got {lr}")
        if not 0 < min_weight <= 1.0 <= max_weight:
            raise ValueError(f"UncertaintyWeighting: need 0 < min_weight <= 1 <= max_weight, got {min_weight}, {max_weight}")
        self.lr, self.min_weight, self.max_weight = float(lr), float(min_weight), float(max_weight)
        #: per task: the log-variance ``s_t`` (0 = weight 1 before the task is seen)
        self.log_vars: dict[str, float] = {}

    def weights(self, tasks: Sequence[str]) -> dict[str, float]:
        """``exp(-s_t)`` of each of ``tasks``."""
        return {t: min(self.max_weight, max(self.min_weight, math.exp(-self.log_vars.get(t, 0.0)))) for t in tasks}

    def update(self, losses: Mapping[str, float]) -> None:
        """One gradient step of each trained task's log-variance on ``exp(-s) L + s``."""
        low, high = -math.log(self.max_weight), -math.log(self.min_weight)
        for task, value in losses.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            s = self.log_vars.get(task, 0.0)
            s -= self.lr * (1.0 - math.exp(-s) * value)
            self.log_vars[task] = min(high, max(low, s))

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": dict(self.log_vars)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log_vars = {n: float(v) for n, v in state["log_vars"].items()}

    def __repr__(self) -> str:
        return f"UncertaintyWeighting(lr={self.lr}, min_weight={self.min_weight}, max_weight={self.max_weight})"


class DynamicWeightAverage:
    """Dynamic weight average (Liu, Johns and Davison, 2019).

    A task's rate of change is the ratio of its mean loss over its last ``window`` updates to the
    mean over the ``window`` before (below 1 while it learns); the weights are
    ``K softmax(r / temperature)`` over the ``K`` tasks that have both windows, so a task whose
    loss falls slowly gets more weight and the weights average 1. Tasks without two full windows
    weigh 1. (The paper's windows are epochs; here they count the steps that trained the task,
    since a step may train one task of many.)

    Args:
        temperature: softness of the weighting (large: all weights near 1).
        window: updates of a task per window.
    """

    def __init__(self, temperature: float = 2.0, window: int = 50) -> None:
        if not temperature > 0:
            raise ValueError(f"DynamicWeightAverage: temperature must be > 0, got {temperature}")
        if window < 1:
            raise ValueError(f"DynamicWeightAverage: window must be >= 1, got {window}")
        self.temperature, self.window = float(temperature), int(window)
        #: per task: ``[sum of the current window, its count, last window's mean, the mean before]``
        self.windows: dict[str, list[float]] = {}

    def rates(self) -> dict[str, float]:
        """Each task's ratio of its last window's mean loss to the window before."""
        return {n: w[2] / w[3] for n, w in self.windows.items() if w[3] > 0 and math.isfinite(w[2] / w[3])}

    def weights(self, tasks: Sequence[str]) -> dict[str, float]:
        rates = self.rates()
        if not rates:
            return {t: 1.0 for t in tasks}
        top = max(rates.values()) / self.temperature
        exps = {n: math.exp(r / self.temperature - top) for n, r in rates.items()}
        total = sum(exps.values())
        return {t: len(exps) * exps[t] / total if t in exps else 1.0 for t in tasks}

    def update(self, losses: Mapping[str, float]) -> None:
        for task, value in losses.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            w = self.windows.setdefault(task, [0.0, 0.0, 0.0, 0.0])
            w[0] += value
            w[1] += 1
            if w[1] >= self.window:
                w[3], w[2] = w[2], w[0] / w[1]
                w[0] = w[1] = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"windows": {n: list(v) for n, v in self.windows.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.windows = {n: [float(x) for x in v] for n, v in state["windows"].items()}

    def __repr__(self) -> str:
        return f"DynamicWeightAverage(temperature={self.temperature}, window={self.window})"


class FastAdaptiveWeighting:
    """Fast adaptive multitask optimisation, FAMO (Liu, Liu, Jin, Stone and Liu, 2023).

    Each task has a logit ``xi_t``; ``z = softmax(xi)`` over the tasks seen so far. The step
    descends ``sum_t z_t log L_t`` (normalised so the weights sum to the number of tasks ``K``),
    i.e. task ``t``'s loss gets the weight ``K (z_t / L_t) / sum_s (z_s / L_s)``, so every task's
    log-loss counts, not its scale. After a step, the logits move against each trained task's
    improvement ``delta_t`` (drop of its log-loss): ``xi <- xi - beta (dz/dxi)^T delta`` (by
    Adam, with weight decay ``gamma``), so tasks that improved more than the ``z``-weighted mean
    lose weight and the slow ones gain: every task's loss falls at about the same rate.

    Adapted to a loop in which a step may train one task of many: a task's loss ``L_t`` and its
    improvement are taken from a moving average of its log-loss over the steps that trained it
    (decay ``smoothing``; the paper re-evaluates every loss after each step). With AdamW moments
    per task (``MultiTaskModule(moments="per_task")``, told by :meth:`set_moments`) a task's
    weight scales its AdamW direction, which is already invariant to the loss's scale, so the
    weight is ``K z_t`` there.

    Args:
        lr: Adam step size ``beta`` of the logits (the paper's 0.025).
        weight_decay: ``gamma``, decay of the logits towards 0 (the paper's 0.001).
        smoothing: decay of each task's moving average of its log-loss.
        eps: added to a loss before its logarithm.
    """

    def __init__(self, lr: float = 0.025, weight_decay: float = 0.001, smoothing: float = 0.9, eps: float = 1e-8) -> None:
        if not lr > 0:
            raise ValueError(f"FastAdaptiveWeighting: lr must be > 0, got {lr}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"FastAdaptiveWeighting: smoothing must be in [0, 1), got {smoothing}")
        if weight_decay < 0:
            raise ValueError(f"FastAdaptiveWeighting: weight_decay must be >= 0, got {weight_decay}")
        self.lr, self.weight_decay, self.smoothing, self.eps = float(lr), float(weight_decay), float(smoothing), float(eps)
        self.betas = (0.9, 0.999)
        self.per_task_moments = False
        #: per task: ``[logit, Adam first moment, Adam second moment, smoothed log-loss]``
        self.state: dict[str, list[float]] = {}
        #: Adam steps taken by the logits
        self.steps = 0

    def set_moments(self, per_task: bool) -> None:
        """Whether a weight scales the task's AdamW direction (``True``) or its loss."""
        self.per_task_moments = bool(per_task)

    def z(self) -> dict[str, float]:
        """``softmax(xi)`` over the tasks seen so far."""
        if not self.state:
            return {}
        top = max(s[0] for s in self.state.values())
        exps = {n: math.exp(s[0] - top) for n, s in self.state.items()}
        total = sum(exps.values())
        return {n: e / total for n, e in exps.items()}

    def weights(self, tasks: Sequence[str]) -> dict[str, float]:
        """Each of ``tasks``' weight for the coming step (1 before a task is seen)."""
        z = self.z()
        if self.per_task_moments:
            share = z
        else:
            inverse = {n: z[n] / math.exp(s[3]) for n, s in self.state.items()}
            total = sum(inverse.values())
            share = {n: v / total for n, v in inverse.items()}
        return {t: len(share) * share[t] if t in share else 1.0 for t in tasks}

    def update(self, losses: Mapping[str, float]) -> None:
        """Take the trained tasks' losses; move the logits against their improvements."""
        delta: dict[str, float] = {}
        for task, value in losses.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            log_loss = math.log(max(value, 0.0) + self.eps)
            state = self.state.get(task)
            if state is None:
                self.state[task] = [0.0, 0.0, 0.0, log_loss]
                continue
            smoothed = self.smoothing * state[3] + (1.0 - self.smoothing) * log_loss
            delta[task] = state[3] - smoothed
            state[3] = smoothed
        if not delta:
            return
        z = self.z()
        mean = sum(z[n] * d for n, d in delta.items())
        # gradient of z . delta in xi: z_k (delta_k - sum_j z_j delta_j), tasks not trained delta 0
        self.steps += 1
        b1, b2 = self.betas
        for name, state in self.state.items():
            grad = z[name] * (delta.get(name, 0.0) - mean) + self.weight_decay * state[0]
            state[1] = b1 * state[1] + (1.0 - b1) * grad
            state[2] = b2 * state[2] + (1.0 - b2) * grad * grad
            m_hat = state[1] / (1.0 - b1**self.steps)
            v_hat = state[2] / (1.0 - b2**self.steps)
            state[0] -= self.lr * m_hat / (math.sqrt(v_hat) + 1e-8)

    def state_dict(self) -> dict[str, Any]:
        return {"state": {n: list(v) for n, v in self.state.items()}, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = {n: [float(x) for x in v] for n, v in state["state"].items()}
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"FastAdaptiveWeighting(lr={self.lr}, weight_decay={self.weight_decay}, smoothing={self.smoothing})"


#: the loss weightings known by a short name
LOSS_WEIGHTINGS: dict[str, type] = {
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "famo": FastAdaptiveWeighting,
}


def build_loss_weighting(spec: str | Mapping[str, Any]) -> Any:
    """A loss weighting from its spec: a short name of :data:`LOSS_WEIGHTINGS` or a class path,
    or ``{class_path: <name or class path>, init_args: {...}}``. The class must offer
    ``weights``, ``update``, ``state_dict`` and ``load_state_dict``."""
    from umedpt.tasks import import_class

    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"loss_weighting: expected a name of {sorted(LOSS_WEIGHTINGS)}, a class path or "
                         f"{{class_path: ..., init_args: {{...}}}}, got {spec!r}")  # fmt: skip
    path = str(spec["class_path"])
    try:
        cls = LOSS_WEIGHTINGS[path] if path in LOSS_WEIGHTINGS else import_class(path, "loss_weighting")
    except (ImportError, ValueError) as err:
        raise ValueError(f"{err}; the built-in ones are {sorted(LOSS_WEIGHTINGS)}") from err
    weighting = cls(**dict(spec.get("init_args") or {}))
    missing = [m for m in ("weights", "update", "state_dict", "load_state_dict") if not callable(getattr(weighting, m, None))]
    if missing:
        raise TypeError(f"loss_weighting: {path!r} has no {missing}")
    return weighting
