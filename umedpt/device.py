"""Moving nested batches to a device: shared tensors move once, chosen keys stay on the host."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch


def batch_to_device(batch: Any, device: torch.device | str, keep_on_host: Collection[str] = ()) -> Any:
    """``batch`` (dicts, lists, tuples of tensors) with its tensors on ``device``.

    A tensor that appears several times (e.g. one image batch shared by several tasks) is copied
    once, so the copies stay shared. Tensors under a dict key in ``keep_on_host`` are not moved
    (flags read on the host need no device synchronisation). Copies to CUDA do not block.
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    moved: dict[int, torch.Tensor] = {}

    def move(value: Any, key: str | None = None) -> Any:
        if torch.is_tensor(value):
            if key in keep_on_host:
                return value
            if id(value) not in moved:
                moved[id(value)] = value.to(device, non_blocking=non_blocking)
            return moved[id(value)]
        if isinstance(value, dict):
            return {k: move(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return value

    return move(batch)


@contextmanager
def flush_denormal(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero while the block runs on a CPU device (x86 CPUs compute
    10-100x slower on them; small updates of detection heads produce them); elsewhere, or with
    ``enabled=False``, nothing changes."""
    on = enabled and torch.device(device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


class HeldFlushDenormal:
    """:func:`flush_denormal` held from :meth:`start` to :meth:`stop` rather than over one block:
    a module starts it in ``on_fit_start`` and stops it in ``on_fit_end``."""

    def __init__(self) -> None:
        self._held: ExitStack | None = None

    def start(self, device: torch.device | str, enabled: bool = True) -> None:
        self.stop()
        self._held = ExitStack()
        self._held.enter_context(flush_denormal(device, enabled))

    def stop(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


def default_precision(accelerator: str | None) -> str:
    """The fastest correct precision for ``accelerator`` when the configuration sets none.

    ``bf16-mixed`` on a CUDA GPU that supports bfloat16 (``auto`` counts as the GPU when one is
    visible), ``32-true`` everywhere else: on CPUs bf16 autocast is about 11x slower than fp32
    (``benchmarks/precision_layout.py``).
    """
    name = str(accelerator or "auto").lower()
    wants_gpu = name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"
