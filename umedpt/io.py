"""Save and load the shared encoder (safetensors weights + a small JSON config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from umedpt.encoder import SwinEncoder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "umedpt-encoder"
CHECKPOINT_KEY = "umedpt_encoder"


def save_encoder(encoder: SwinEncoder, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "version": 1,
        "encoder": encoder.config,
        "out_channels": encoder.out_channels,
        "reductions": encoder.reductions,
        "embed_dim": encoder.embed_dim,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_encoder(source: str | Path, map_location: str | torch.device = "cpu") -> SwinEncoder:
    """Load a :class:`SwinEncoder` from an exported encoder or a training checkpoint.

    Args:
        source: an encoder directory written by :func:`save_encoder` (or its
            ``model.safetensors`` file), or a Lightning checkpoint of ``MultiTaskModule``.
        map_location: device the weights are loaded to.

    Raises:
        FileNotFoundError: ``source`` or a file it needs does not exist.
        ValueError: the file is not a umedpt encoder or its weights do not fit its config.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"load_encoder: {path} does not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        directory = path if path.is_dir() else path.parent
        config, state = _read_export(directory)
    else:
        config, state = _read_checkpoint(path, map_location)
    encoder = SwinEncoder(**config)
    result = encoder.load_state_dict(_cast(state, encoder), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"load_encoder: weights in {path} do not match config {config}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return encoder.to(map_location).eval()


def _cast(state: dict[str, torch.Tensor], encoder: SwinEncoder) -> dict[str, torch.Tensor]:
    """Check shapes up front so a config/weights mismatch reads clearly."""
    own = encoder.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs config {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError(
            f"load_encoder: weights do not match the encoder config ({len(bad)} shapes differ): {bad[:3]}"
        )
    return state


def _read_export(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"load_encoder: {needed} is missing; an encoder directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_encoder: {config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or "encoder" not in config:
        raise ValueError(f"load_encoder: {config_path} is not a umedpt encoder config (format != {FORMAT!r})")
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"load_encoder: {weights_path} is not a readable safetensors file: {err}") from err
    return config["encoder"], state


def _read_checkpoint(
    path: Path, map_location: str | torch.device
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types on foreign or unsafe files
        raise ValueError(
            f"load_encoder: {path} is neither an encoder directory/safetensors file nor a checkpoint "
            f"that loads with weights_only=True: {err}"
        ) from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"load_encoder: {path} is not a umedpt MultiTaskModule checkpoint "
            f"(no '{CHECKPOINT_KEY}' encoder config or no 'state_dict')"
        )
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return checkpoint[CHECKPOINT_KEY], state
