"""Multi-task diagnostics on plain tensors: gradient interference between tasks and the Fisher spectrum.

A "gradient" here is the flattened gradient (1-D tensor of length P) of the same chosen
parameters for every task and batch, e.g. of the shared encoder. All results are computed in
float64 on the gradients' device.

- :func:`interference`: the tug-of-war between tasks from their gradients (Uni-Med, section
  3.1.1): gradient-direction interference ``GD``, gradient-magnitude similarity ``GM`` and a
  tug-of-war index per task.
- :func:`statistics_score`: per parameter, how much the tasks' gradients agree in sign
  (1: all push the same way, 0: they cancel).
- :func:`task_gradients`: collects those gradients from any per-task loss, one batch at a time
  (no graph is kept and no ``.grad`` is touched).
- :func:`fisher_spectrum`, :func:`spectral_entropy`, :func:`dominant_ratio`: the eigenvalues of
  the empirical Fisher information of a set of gradients and two summaries of their shape
  (IMAX relates lower entropy / a higher dominant ratio to multi-task gains).
- :class:`CountSketch`: a random linear map to ``k`` dimensions for gradients too long to keep
  (inner products preserved in expectation); :func:`diagnose` runs all of the above on one set
  of task gradients.

The Lightning callbacks :class:`~umedpt.diagnostic_callbacks.InterferenceCallback` and
:class:`~umedpt.diagnostic_callbacks.FisherSpectrumCallback` and the command ``umedpt diagnose``
measure a model during or after training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CountSketch",
    "diagnose",
    "dominant_ratio",
    "fisher_spectrum",
    "interference",
    "spectral_entropy",
    "statistics_score",
    "task_gradients",
]


def task_gradients(
    loss: Callable[[str, Any], Tensor],
    batches: Mapping[str, Iterable[Any]],
    parameters: Iterable[Tensor],
    num_batches: int = 8,
    device: torch.device | str | None = "cpu",
    sketch: CountSketch | None = None,
) -> dict[str, list[Tensor]]:
    """The flattened gradient of ``loss(task, batch)`` w.r.t. ``parameters`` for the first
    ``num_batches`` batches of every task: the input of :func:`interference`.

    Each gradient is computed with :func:`torch.autograd.grad` and its graph freed before the
    next batch, so memory stays that of one batch plus the gradients kept (``num_batches`` x P
    per task, on ``device``; ``None`` keeps them where they are). Parameters a task's loss does
    not reach contribute zeros. For a :class:`~umedpt.MultiTaskModule`: ``loss=model.task_loss``,
    ``parameters=model.encoder.parameters()`` and batches on the model's device. With a
    ``sketch`` each gradient is kept as its ``sketch.dim_out``-dimensional image.
    """
    if num_batches < 1:
        raise ValueError(f"task_gradients: num_batches must be >= 1, got {num_batches}")
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("task_gradients: no parameters that require gradients")
    out: dict[str, list[Tensor]] = {}
    for name, source in batches.items():
        rows = []
        for batch in islice(source, num_batches):
            grads = torch.autograd.grad(loss(name, batch), params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)])
            flat = sketch(flat.detach()) if sketch is not None else flat.detach()
            rows.append(flat.to(device) if device is not None else flat)
        if not rows:
            raise ValueError(f"task {name!r}: its batches are empty")
        out[name] = rows
    return out


class CountSketch:
    """A fixed random linear map from ``dim_in`` to ``dim_out`` dimensions (a count sketch):
    coordinate ``i`` is added, with a random sign ``s(i)``, to the random bucket ``h(i)``.

    It keeps inner products in expectation, ``E[<Sx, Sy>] = <x, y>``, with variance at most
    ``2 ||x||^2 ||y||^2 / dim_out``: a cosine between two gradients is off by about
    ``sqrt(2 / dim_out)`` (0.014 at ``dim_out = 10_000``), whatever ``dim_in``. GD, GM and the
    tug-of-war index are built from such inner products and norms; the Fisher spectrum of
    sketched gradients is that of ``S F S^T``, whose eigenvalues approximate the largest ones of
    ``F``. Holds 5 bytes per input dimension (bucket and sign).

    Args:
        dim_in: length of the gradients.
        dim_out: length of their sketches.
        seed: seed of the buckets and signs (the same seed gives the same map).
    """

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0) -> None:
        if dim_in < 1 or dim_out < 1:
            raise ValueError(f"CountSketch: dim_in and dim_out must be >= 1, got {dim_in}, {dim_out}")
        generator = torch.Generator().manual_seed(seed)
        self.dim_in, self.dim_out = int(dim_in), int(dim_out)
        self.bucket = torch.randint(0, dim_out, (dim_in,), generator=generator, dtype=torch.int64).to(torch.int32)
        self.sign = (torch.randint(0, 2, (dim_in,), generator=generator, dtype=torch.int8) * 2 - 1).to(torch.int8)

    def __call__(self, x: Tensor) -> Tensor:
        """The sketch of a 1-D tensor of length ``dim_in`` (its dtype, on its device)."""
        if x.dim() != 1 or x.shape[0] != self.dim_in:
            raise ValueError(f"CountSketch: expected a 1-D tensor of length {self.dim_in}, got shape {tuple(x.shape)}")
        bucket, sign = self.bucket.to(x.device), self.sign.to(device=x.device, dtype=x.dtype)
        return torch.zeros(self.dim_out, dtype=x.dtype, device=x.device).index_add_(0, bucket, x * sign)


def _stack(name: str, grads: Sequence[Tensor] | Tensor, length: int | None) -> Tensor:
    """(n, P) float64 matrix of a task's gradients, checked for shape and finiteness."""
    if isinstance(grads, Tensor) and grads.dim() == 2:
        matrix = grads.to(torch.float64)  # already stacked: no copy when it is float64
    else:
        rows = [grads] if isinstance(grads, Tensor) and grads.dim() == 1 else list(grads)
        if not rows:
            raise ValueError(f"task {name!r}: no gradients (expected at least one 1-D tensor)")
        matrix = torch.stack([torch.as_tensor(g).reshape(-1).to(torch.float64) for g in rows])
    if matrix.shape[0] == 0:
        raise ValueError(f"task {name!r}: no gradients (expected at least one 1-D tensor)")
    if length is not None and matrix.shape[1] != length:
        raise ValueError(
            f"task {name!r}: gradients of length {matrix.shape[1]}, the first task's have length {length}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"task {name!r}: gradients contain NaN or Inf")
    return matrix


def interference(task_grads: Mapping[str, Sequence[Tensor] | Tensor]) -> dict[str, Any]:
    """Gradient-direction interference, magnitude similarity and tug-of-war index between tasks.

    ``task_grads[t]`` holds ``n_t >= 1`` gradients of task ``t`` (a sequence, or an (n_t, P) tensor), one per sampled batch (``n_t``
    may differ between tasks). With ``g_t^a`` the gradient of task ``t`` for batch ``a`` and
    ``ĝ = g / ||g||``:

    - ``delta[j -> i](a) = (1 / n_j) sum_b ĝ_j^b . g_i^a`` (``b`` over all batches of ``j``);
    - ``GD[i, j] = mean_a delta[j -> i](a) / mean_a delta[i -> i](a)``: how far a step along task
      ``j``'s gradient directions moves task ``i``, relative to a step along its own (1 on the
      diagonal; 0 for orthogonal tasks; negative when ``j`` works against ``i``);
    - ``m_t = mean_a ||g_t^a||`` and ``GM[i, j] = 2 m_i m_j / (m_i^2 + m_j^2)`` (1 for equal
      magnitudes, towards 0 when one task's gradients dwarf the other's);
    - ``tug_of_war[i] = sum_j GD[i, j] GM[i, j]``.

    Returns:
        ``{"tasks": [names in input order], "gd": (T, T), "gm": (T, T), "tug_of_war": (T,)}``
        (float64 tensors).

    Raises:
        ValueError: no tasks, a task without gradients, gradients of different lengths, a zero
            gradient (it has no direction) or non-finite values, naming the task.
    """
    if not task_grads:
        raise ValueError("interference: no tasks given")
    names = list(task_grads)
    length = None
    mats = []
    for name in names:
        matrix = _stack(name, task_grads[name], length)
        length = matrix.shape[1]
        norms = matrix.norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError(f"task {name!r}: a gradient is zero and has no direction")
        mats.append((matrix, norms))
    # mean unit direction and mean gradient of each task: delta averaged over a is U_j . mean_i
    units = torch.stack([(m / n[:, None]).mean(0) for m, n in mats])  # (T, P)
    means = torch.stack([m.mean(0) for m, _ in mats])  # (T, P)
    cross = means @ units.T  # cross[i, j] = mean_a delta[j -> i](a)
    own = cross.diagonal()
    if bool((own == 0).any()):
        bad = [names[i] for i in torch.nonzero(own == 0).flatten().tolist()]
        raise ValueError(f"tasks {bad}: their mean gradient is orthogonal to their own directions")
    gd = cross / own[:, None]
    magnitude = torch.stack([n.mean() for _, n in mats])
    gm = 2 * magnitude[:, None] * magnitude[None, :] / (magnitude[:, None] ** 2 + magnitude[None, :] ** 2)
    return {"tasks": names, "gd": gd, "gm": gm, "tug_of_war": (gd * gm).sum(1)}


def statistics_score(task_grads: Mapping[str, Tensor]) -> Tensor:
    """Per parameter, ``|sum_t g_t| / sum_t |g_t|`` over one gradient per task (e.g. its mean).

    1 where every task pushes the parameter the same way, 0 where their pushes cancel; NaN
    where no task moves it (``sum_t |g_t| == 0``). Float64, length P.
    """
    if not task_grads:
        raise ValueError("statistics_score: no tasks given")
    length = None
    rows = []
    for name, grad in task_grads.items():
        row = _stack(name, [grad], length)[0]
        length = row.shape[0]
        rows.append(row)
    matrix = torch.stack(rows)
    total = matrix.abs().sum(0)
    score = matrix.sum(0).abs() / total
    return torch.where(total == 0, torch.full_like(score, math.nan), score)


def fisher_spectrum(grads: Tensor) -> Tensor:
    """Eigenvalues of the empirical Fisher ``F = (1/N) sum_n g_n g_n^T`` of ``grads`` (N, P).

    Descending, length ``min(N, P)``, clamped at 0. With N < P they come from the N x N Gram
    matrix ``G G^T / N``, which has the same non-zero eigenvalues as ``F`` at a fraction of the
    cost (P may be millions); with N >= P from ``G^T G / N`` itself.
    """
    g = torch.as_tensor(grads)
    if g.dim() != 2 or g.shape[0] < 1 or g.shape[1] < 1:
        raise ValueError(f"fisher_spectrum: grads must be (N, P) with N, P >= 1, got shape {tuple(g.shape)}")
    g = g.to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("fisher_spectrum: grads contain NaN or Inf")
    n, p = g.shape
    gram = g @ g.T / n if n < p else g.T @ g / n
    eigs = torch.linalg.eigvalsh(gram)  # ascending, symmetric matrix
    return eigs.flip(0).clamp_min(0.0)


def _distribution(eigs: Tensor) -> Tensor:
    values = torch.as_tensor(eigs, dtype=torch.float64).reshape(-1)
    if values.numel() == 0 or bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
        raise ValueError("eigenvalues must be a non-empty set of finite values >= 0")
    total = values.sum()
    if total == 0:
        raise ValueError("eigenvalues are all zero: the spectrum has no shape")
    return values / total


def spectral_entropy(eigs: Tensor) -> float:
    """``-sum_k p_k log p_k`` with ``p_k = lambda_k / sum lambda`` (``0 log 0 = 0``); log k for k equal values."""
    p = _distribution(eigs)
    nonzero = p[p > 0]
    return float(-(nonzero * nonzero.log()).sum())


def dominant_ratio(eigs: Tensor) -> float:
    """``lambda_max / sum lambda``: the share of the largest eigenvalue (1/k for k equal values)."""
    return float(_distribution(eigs).max())


def diagnose(task_grads: Mapping[str, Sequence[Tensor] | Tensor]) -> dict[str, Any]:
    """Every diagnostic of one set of task gradients (as :func:`task_gradients` returns them), as
    plain lists for JSON.

    Returns:
        ``tasks``, ``gd``, ``gm``, ``tug_of_war`` (:func:`interference`); ``grad_norm`` (each
        task's mean gradient norm); ``statistics_score`` (:func:`statistics_score` of the tasks'
        mean gradients; NaN entries dropped) with its ``statistics_score_mean``; ``fisher``: per
        task and for all tasks' gradients together (``"all"``), the spectral entropy ``se``,
        the dominant ratio ``rho`` and the ``eigenvalues``.
    """
    # each task's gradients stacked once (float64), shared by every measure below
    stacked = {name: _stack(name, grads, None) for name, grads in task_grads.items()}
    out = interference(stacked)
    names = out["tasks"]
    score = statistics_score({name: m.mean(0) for name, m in stacked.items()})
    score = score[~torch.isnan(score)]
    fisher = {}
    for name, matrix in [*stacked.items(), ("all", torch.cat(list(stacked.values())))]:
        eigs = fisher_spectrum(matrix)
        fisher[name] = {"se": spectral_entropy(eigs), "rho": dominant_ratio(eigs), "eigenvalues": eigs.tolist()}
    return {
        "tasks": names,
        "gd": out["gd"].tolist(),
        "gm": out["gm"].tolist(),
        "tug_of_war": out["tug_of_war"].tolist(),
        "grad_norm": [float(m.norm(dim=1).mean()) for m in stacked.values()],
        "statistics_score": score.tolist(),
        "statistics_score_mean": float(score.mean()) if score.numel() else math.nan,
        "fisher": fisher,
    }
