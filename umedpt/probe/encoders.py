"""Encoder sources of a probe run: exported encoders, checkpoints, globs and ``random``."""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import torch

from umedpt.encoder import SwinEncoder
from umedpt.io import load_encoder

#: source of a randomly initialised encoder with the config of another encoder of the run
RANDOM = "random"


class ProbeError(ValueError):
    """Bad probe input: a missing encoder, mismatched channels, an unusable task or fraction."""


def resolve_source(name: str, source: str) -> Path:
    """The path of ``source``; a glob pattern picks its most recently modified match."""
    if glob.has_magic(source):
        matches = [Path(p) for p in glob.glob(source)]
        if not matches:
            raise ProbeError(f"encoder {name!r}: no file or folder matches {source!r}")
        return max(matches, key=lambda p: p.stat().st_mtime)
    path = Path(source)
    if not path.exists():
        raise ProbeError(
            f"encoder {name!r}: {source} does not exist; give an exported encoder folder, its "
            "model.safetensors, a training checkpoint (.ckpt), a glob of those, or 'random'"
        )
    return path


def random_encoder(config: dict, seed: int) -> SwinEncoder:
    """A randomly initialised :class:`SwinEncoder` of ``config``, the same for the same ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinEncoder(**config).eval()


def load_encoders(sources: dict[str, str], random_seed: int = 0) -> dict[str, SwinEncoder]:
    """Load every encoder of ``sources`` (name -> source), in order, in eval mode.

    ``"random"`` builds a random initialisation with the config of the first other encoder;
    ``"random:<source>"`` with the config of ``<source>``.
    """
    if not sources:
        raise ProbeError("no encoders given: set encoders: {name: source}")
    loaded: dict[str, SwinEncoder] = {}
    for name, source in sources.items():
        if source != RANDOM and not source.startswith(f"{RANDOM}:"):
            loaded[name] = _load(name, source)
    encoders: dict[str, SwinEncoder] = {}
    for name, source in sources.items():
        if name in loaded:
            encoders[name] = loaded[name]
            continue
        if source.startswith(f"{RANDOM}:"):
            config = _load(name, source[len(RANDOM) + 1 :]).config
        elif loaded:
            config = next(iter(loaded.values())).config
        else:
            raise ProbeError(
                f"encoder {name!r}: 'random' takes the config of another encoder of the run; "
                "add one, or write 'random:<encoder source>'"
            )
        encoders[name] = random_encoder(config, random_seed)
    return encoders


def _load(name: str, source: str) -> SwinEncoder:
    path = resolve_source(name, source)
    try:
        return load_encoder(path)
    except (FileNotFoundError, ValueError) as err:
        raise ProbeError(f"encoder {name!r}: {err}") from err


def weights_hash(encoder: SwinEncoder) -> str:
    """SHA-256 of the encoder's config and weights (names, dtypes, shapes and values)."""
    digest = hashlib.sha256(json.dumps(encoder.config, sort_keys=True).encode())
    for key, value in sorted(encoder.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
