"""Linear probes on frozen features: L2-regularised logistic regression, C chosen on validation.

Multi-class tasks fit one multinomial model; multi-label tasks fit one binary model per label.
Features are standardised with the statistics of the training subset. The inverse regularisation
strength ``C`` is the value of ``c_grid`` with the best primary metric on the validation split;
ties (e.g. a perfect AUROC for several C) go to the lowest validation log-loss.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from umedpt.kinds import BUILTIN_KINDS, get_kind

#: default grid of the inverse L2 strength C (sklearn's convention)
C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: the metric a probe reports (and a linear probe picks C by), per built-in kind (any kind's is
#: ``umedpt.kinds.get_kind(kind).probed_metric``)
PRIMARY_METRIC: dict[str, str] = {name: get_kind(name).probed_metric for name in BUILTIN_KINDS}


def classification_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 of class scores ``(N, C)`` against labels ``(N,)``."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    pred = scores.argmax(1)
    return {
        "accuracy": float((pred == y_true).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "f1": float(f1_score(y_true, pred, average="macro", zero_division=0)),
    }


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro AUROC (labels with both values in ``y_true``) and macro F1 at 0.5 of ``(N, K)`` probabilities."""
    from sklearn.metrics import f1_score, roc_auc_score

    y = y_true > 0.5
    both = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    auroc = float(np.mean([roc_auc_score(y[:, k], probs[:, k]) for k in both])) if both else float("nan")
    f1 = f1_score(y, probs > 0.5, average="macro", zero_division=0)
    return {"auroc": auroc, "f1": float(f1)}


@dataclass
class LinearProbe:
    """A fitted probe: standardisation, the chosen C and one (or, multi-label, K) sklearn models."""

    mean: np.ndarray
    scale: np.ndarray
    c: float
    models: list[Any]
    val_score: float = float("-inf")
    val_loss: float = float("inf")

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` (multi-class) or label probabilities ``(N, K)``."""
        z = (x - self.mean) / self.scale
        if len(self.models) == 1:
            return self.models[0].predict_proba(z)
        return np.stack([m.predict_proba(z)[:, 1] for m in self.models], axis=1)


def _fit_path(z: np.ndarray, y: np.ndarray, c_grid: Sequence[float], max_iter: int) -> list[Any]:
    """One logistic regression per C (ascending), each warm-started from the previous solution."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=max_iter, warm_start=True)
    path = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in c_grid:
            model.set_params(C=c)
            model.fit(z, y)
            path.append(copy.deepcopy(model))
    return path


def fit_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    c_grid: Sequence[float] = C_GRID,
    max_iter: int = 1000,
) -> LinearProbe:
    """Fit on ``(x_train, y_train)`` for every C of ``c_grid``; keep the best on validation.

    ``y`` holds class indices ``(N,)`` for a multi-class task or multi-hot ``(N, K)`` labels.
    """
    # one thread: these problems are small, and BLAS/OpenMP threads made the fits several times
    # slower on a 2-core machine (benchmarks/probe_sweep.py)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _fit_linear_probe(x_train, y_train, x_val, y_val, c_grid, max_iter)


def _fit_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    c_grid: Sequence[float],
    max_iter: int,
) -> LinearProbe:
    grid = sorted(float(c) for c in c_grid)
    mean = x_train.mean(0)
    scale = x_train.std(0) + 1e-6
    z_train = (x_train - mean) / scale
    multilabel = y_train.ndim == 2
    targets = [y_train[:, k] > 0.5 for k in range(y_train.shape[1])] if multilabel else [y_train]
    paths = [_fit_path(z_train, t, grid, max_iter) for t in targets]
    metric = "auroc" if multilabel else "accuracy"
    probes = []
    for i, c in enumerate(grid):
        probe = LinearProbe(mean, scale, c, [path[i] for path in paths])
        probe.val_score = evaluate(probe, x_val, y_val)[metric]
        probe.val_loss = log_loss(y_val, probe.scores(x_val), probe.models[0].classes_)
        probes.append(probe)
    return max(probes, key=lambda p: (p.val_score, -p.val_loss))


def log_loss(y: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> float:
    """Mean cross-entropy of class probabilities, or mean binary cross-entropy of label probabilities."""
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    if y.ndim == 2:
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    column = np.searchsorted(classes, y)
    known = (column < len(classes)) & (classes[np.minimum(column, len(classes) - 1)] == y)
    picked = np.where(known, p[np.arange(len(y)), np.minimum(column, len(classes) - 1)], 1e-7)
    return float(-np.log(picked).mean())


def evaluate(probe: LinearProbe, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of ``probe`` on features ``x`` with labels ``y``."""
    scores = probe.scores(x)
    if y.ndim == 2:
        return multilabel_metrics(y, scores)
    full = np.zeros((len(x), int(max(y.max(), probe.models[0].classes_.max())) + 1))
    full[:, probe.models[0].classes_] = scores  # classes the subset lacked get probability 0
    return classification_metrics(y, full)
