"""The process's random streams as plain tensors, to carry them in a checkpoint and restore them.

torch's CPU (and CUDA) generators, NumPy's legacy global generator and Python's ``random``:
stochastic depth and dropout use torch's, host-side augmentations NumPy's and Python's. Stored
as uint8 tensors and plain lists, so the checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNG_KEY", "restore_rng_states", "rng_states"]

#: checkpoint key of :func:`rng_states`
RNG_KEY = "umedpt_rng_states"


def rng_states() -> dict[str, Any]:
    """Snapshot of every random stream a training step draws from."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},  # fmt: skip
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set every stream to a snapshot of :func:`rng_states` (CUDA only where both have devices)."""
    torch.set_rng_state(states["torch"].cpu())
    np_state = states["numpy"]
    keys = np.asarray(np_state["keys"].cpu().numpy(), dtype=np.uint32)
    np.random.set_state(
        (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
