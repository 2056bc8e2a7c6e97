"""Where a run lives: ``<default_root_dir>/lightning_logs/version_N/`` and the checkpoints in it.

Commands that start from a checkpoint (``validate``, ``test``, ``predict``, and ``fit`` resuming)
write into the run the checkpoint belongs to, not into a new ``version_N``; ``--ckpt_path last``
means the newest checkpoint of the newest run under ``default_root_dir``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

__all__ = ["RunDir", "last_checkpoint", "run_of_checkpoint"]

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
    """The newest checkpoint of the newest run under ``root/name`` (``last.ckpt`` when it has one).

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
    named_last = [p for p in ckpts if p.name == "last.ckpt"]
    return named_last[0] if named_last else max(ckpts, key=lambda p: (p.stat().st_mtime, p.name))
