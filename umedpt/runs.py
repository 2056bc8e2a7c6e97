"""Where a run lives: ``<default_root_dir>/lightning_logs/version_N/`` and the checkpoints in it.

Commands that start from a checkpoint (``validate``, ``test``, ``predict``, and ``fit`` resuming)
write into the run the checkpoint belongs to, not into a new ``version_N``; ``--ckpt_path last``
means the newest checkpoint of the newest run under ``default_root_dir``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = [
    "AtomicCheckpointIO",
    "PeriodicCheckpoint",
    "RunDir",
    "architecture_differences",
    "last_checkpoint",
    "run_of_checkpoint",
    "unreadable_checkpoint",
]

_VERSION = re.compile(r"version_(\d+)$")


class RunDir(NamedTuple):
    """A TensorBoard-logger run folder: ``<save_dir>/<name>/<version>``."""

    save_dir: Path
    name: str
    version: str

    @property
    def path(self) -> Path:
        return self.save_dir / self.name / self.version


def run_of_checkpoint(ckpt_path: str | Path) -> RunDir | None:
    """The run folder of a checkpoint at ``<save_dir>/<name>/version_N/checkpoints/<file>.ckpt``."""
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints" or not _VERSION.match(path.parent.parent.name):
        return None
    version_dir = path.parent.parent
    return RunDir(version_dir.parent.parent, version_dir.parent.name, version_dir.name)


def last_checkpoint(root: str | Path, name: str = "lightning_logs") -> Path:
    """The newest checkpoint file of the newest run under ``root/name``.

    A run writes ``last.ckpt`` every ``--checkpoint_every`` steps and ``epoch=E-step=S.ckpt`` at
    each validation / epoch end; the one written last (by modification time) is returned.

    Raises:
        FileNotFoundError: naming the folder searched, when no run there has a checkpoint.
    """
    base = Path(root) / name
    runs = []
    for folder in base.glob("version_*"):
        match = _VERSION.match(folder.name)
        ckpts = list((folder / "checkpoints").glob("*.ckpt"))
        if match and ckpts:
            runs.append((int(match.group(1)), ckpts))
    if not runs:
        raise FileNotFoundError(
            f"--ckpt_path last: no checkpoint in {base}/version_*/checkpoints/ - nothing to resume. "
            "Start the run without --ckpt_path, or pass a checkpoint file (or the same "
            "--trainer.default_root_dir as the run to resume)."
        )
    _, ckpts = max(runs, key=lambda run: run[0])
    return max(ckpts, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt", p.name))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with local checkpoints written atomically in their own folder.

    Lightning writes through a temporary file that may live on another filesystem (TMPDIR), so a
    kill during the final copy can leave a truncated newest checkpoint. Here the bytes go to a
    hidden temporary file beside the target, are flushed to disk, and replace the target in one
    ``os.replace``: a reader sees the old checkpoint or the new one, never a part. Remote paths
    (``s3://`` ...) keep Lightning's behaviour. A checkpoint that cannot be read raises an error
    that names the file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {"weights_only": weights_only} if map_location is None else {
            "map_location": map_location, "weights_only": weights_only}  # fmt: skip
        try:
            return super().load_checkpoint(path, **kwargs)
        except FileNotFoundError:
            raise
        except UNREADABLE as err:
            raise unreadable_checkpoint(path, err) from err


#: what ``torch.load`` raises on a truncated or foreign file
UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile)


def unreadable_checkpoint(path: Any, err: BaseException) -> RuntimeError:
    """The error for a checkpoint that cannot be read, naming the file (raise it ``from err``)."""
    return RuntimeError(
        f"checkpoint {path} cannot be read: {err}. It may be truncated (a run killed while "
        "writing it) or not a torch checkpoint; resume from an earlier one."
    )


def architecture_differences(checkpoint_hparams: dict[str, Any], model_config: Any) -> list[str]:
    """How a checkpoint's encoder and tasks differ from a configured ``MultiTaskModule``.

    ``checkpoint_hparams`` is the checkpoint's ``hyper_parameters`` (``encoder``: the encoder's
    ``config``, ``tasks``: task dicts); ``model_config`` the parsed ``model`` section. Returns one
    line per differing field (empty when they agree or when there is nothing to compare).
    """
    lines: list[str] = []
    saved_encoder = checkpoint_hparams.get("encoder")
    encoder = _get(model_config, "encoder")
    init_args = _get(encoder, "init_args") if _get(encoder, "class_path") else encoder
    if isinstance(saved_encoder, dict) and init_args is not None:
        for key in ("name", "in_chans", "img_size"):
            given = _get(init_args, key)
            if given is not None and key in saved_encoder and given != saved_encoder[key]:
                lines.append(f"model.encoder {key}: config {given!r}, checkpoint {saved_encoder[key]!r}")
        given_kwargs = dict(_get(init_args, "model_kwargs") or {})
        saved_kwargs = dict(saved_encoder.get("model_kwargs") or {})
        for key in sorted(set(given_kwargs) | set(saved_kwargs)):
            if given_kwargs.get(key) != saved_kwargs.get(key):
                lines.append(
                    f"model.encoder model_kwargs.{key}: config {given_kwargs.get(key)!r}, "
                    f"checkpoint {saved_kwargs.get(key)!r}"
                )
    saved_tasks = checkpoint_hparams.get("tasks")
    tasks = _get(model_config, "tasks")
    if isinstance(saved_tasks, list) and tasks is not None:
        given = {_get(t, "name"): t for t in tasks}
        saved = {t.get("name"): t for t in saved_tasks if isinstance(t, dict)}
        for name in sorted(set(given) - set(saved)):
            lines.append(f"model.tasks: {name!r} is in the config, not in the checkpoint")
        for name in sorted(set(saved) - set(given)):
            lines.append(f"model.tasks: {name!r} is in the checkpoint, not in the config")
        for name in sorted(set(given) & set(saved)):
            for key in ("kind", "num_classes"):
                if _get(given[name], key) != saved[name].get(key):
                    lines.append(
                        f"model.tasks {name!r} {key}: config {_get(given[name], key)!r}, "
                        f"checkpoint {saved[name].get(key)!r}"
                    )
    return lines


def _get(node: Any, key: str) -> Any:
    """``node[key]`` for dicts and jsonargparse namespaces, ``None`` when absent."""
    return node.get(key) if hasattr(node, "get") else None


class PeriodicCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at each validation end
    (Lightning's ``save_last``); no other files.

    Its state key does not depend on its arguments, so that validate / test / predict, which
    add one with any period, accept the checkpoints of a fit without Lightning's warning about
    missing callbacks.
    """

    def __init__(self, every_n_train_steps: int, **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True, **kwargs)

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        # Lightning warns (with a page of example code) that a manually optimised module's periodic
        # checkpoint holds the weights after the step: that is the state a resumed run continues
        # from (step, weights, optimizer and loaders agree), so the warning is not shown
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

