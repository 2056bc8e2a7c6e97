"""Task weights that change during training, decided from the tasks' losses.

:class:`GradientCoordination` is a gradient-guided coordination of tasks in the spirit of UMD's
GM-Coord: the task whose loss currently falls fastest dominates the shared encoder's updates,
so its share of each step is damped until the others catch up. Its weights need no per-task
gradients, only the scaled losses the loop already has; they multiply each task's part of
the step (``MultiTaskModule(coordination=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["COORDINATION_KEY", "GradientCoordination"]

#: checkpoint entry of the coordination state (its moving averages of the task losses)
COORDINATION_KEY = "umedpt_coordination"


class GradientCoordination:
    """Damp the task that improves fastest; the others keep weight 1.

    Each task's recent progress is the drop of its scaled loss (about 1 at initialisation)
    between a slow and a fast moving average: ``d_t = slow_t - fast_t`` (positive while the loss
    falls). A task's dominance is its share of the mean progress, ``rho_t = d_t / mean(d)``,
    over the tasks that have both averages; a dominant task (``rho_t > 1``) gets the weight
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
        known = [progress[t] for t in tasks if t in progress]
        mean = sum(known) / len(known) if known else 0.0
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
