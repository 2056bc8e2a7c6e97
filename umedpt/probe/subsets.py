"""Training-data fractions: stratified, at least one sample per class, reproducible per seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from umedpt.probe.encoders import ProbeError


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], or a :class:`ProbeError`."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ProbeError(f"fractions must be in (0, 1], got {fraction}")
    return float(fraction)


def subset_size(fraction: float, total: int) -> int:
    """Number of training samples a fraction keeps: ``round(fraction * total)``, at least 1."""
    return max(1, round(check_fraction(fraction) * total))


def check_labels(
    labels: np.ndarray, num_classes: int, task: str, class_names: Sequence[str] | None = None
) -> None:
    """Raise for a single-class task or a class (or label) the training split never shows."""
    if num_classes < 2:
        raise ProbeError(f"task {task!r} has {num_classes} class; a probe needs at least 2 classes")
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    if labels.ndim == 1:
        present = np.bincount(labels.astype(np.int64), minlength=num_classes)
        if (present > 0).sum() < 2:
            raise ProbeError(
                f"task {task!r}: the train split holds a single class ({names[int(labels[0])]!r})"
            )
        empty = [names[c] for c in np.flatnonzero(present == 0)]
        if empty:
            raise ProbeError(f"task {task!r}: classes {empty} have no sample in the train split")
        return
    positives = labels.sum(0)
    constant = [names[k] for k in np.flatnonzero((positives == 0) | (positives == len(labels)))]
    if constant:
        raise ProbeError(f"task {task!r}: labels {constant} are all 0 or all 1 in the train split")


def stratified_subset(
    labels: np.ndarray | None, fraction: float, seed: int, total: int | None = None
) -> np.ndarray:
    """Sorted indices of a ``fraction`` of the training samples, drawn with ``seed``.

    Args:
        labels: ``(N,)`` class indices (stratified: each class keeps its share, at least one
            sample), ``(N, K)`` multi-hot labels (every label keeps a positive and a negative), or
            ``None`` (a plain random subset of ``total`` samples, e.g. segmentation).
        fraction: share of the samples, in (0, 1]; 1 keeps all.
        seed: the subset is a pure function of ``(labels, fraction, seed)``.
        total: number of samples when ``labels`` is ``None``.

    Raises:
        ProbeError: the fraction keeps fewer samples than there are classes (a class would be
            empty), or it is outside (0, 1].
    """
    n_all = len(labels) if labels is not None else int(total or 0)
    n = subset_size(fraction, n_all)
    if n >= n_all:
        return np.arange(n_all)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_all, n, replace=False))
    if labels.ndim == 1:
        return _stratified(labels.astype(np.int64), n, fraction, rng)
    return _multilabel(labels, n, fraction, rng)


def _stratified(labels: np.ndarray, n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    classes, counts = np.unique(labels, return_counts=True)
    if n < len(classes):
        raise ProbeError(
            f"fraction {fraction} keeps {n} of {len(labels)} training samples, fewer than the "
            f"{len(classes)} classes, so a class would be empty; use a fraction >= {len(classes) / len(labels):.3g}"
        )
    share = counts * (n / len(labels))
    take = np.maximum(np.floor(share).astype(int), 1)
    for c in np.argsort(np.floor(share) - share, kind="stable"):  # largest remainders first
        if take.sum() >= n:
            break
        if take[c] < counts[c]:
            take[c] += 1
    while take.sum() > n:  # the minimum of 1 per class overshot: trim the largest classes
        take[np.argmax(take)] -= 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def _multilabel(labels: np.ndarray, n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    positive = labels > 0.5
    chosen: list[int] = []
    for k in np.argsort(positive.sum(0)):  # rarest label first
        for column in (positive[:, k], ~positive[:, k]):
            if not column[chosen].any():
                chosen.append(int(rng.choice(np.flatnonzero(column))))
    if len(chosen) > n:
        raise ProbeError(
            f"fraction {fraction} keeps {n} of {len(labels)} training samples, too few for a positive "
            f"and a negative of each of the {labels.shape[1]} labels ({len(chosen)} needed)"
        )
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    chosen.extend(rng.choice(rest, n - len(chosen), replace=False).tolist())
    return np.sort(np.array(chosen))
