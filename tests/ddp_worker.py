"""One rank of the 2-process CPU (gloo) DDP run checked by ``tests/test_ddp.py``.

Launched twice by the test with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
set, so Lightning treats it as an externally launched process and does not spawn its own.
It fits the real :class:`umedpt.MultiTaskModule` with the real Lightning ``Trainer`` twice:

* ``no_sync``: the module as shipped (all but the last task's backward inside
  ``optimizer.toggle_model(sync_grad=False)``);
* ``sync_every_task``: the same module under a strategy whose ``block_backward_sync`` does nothing,
  i.e. what the loop would cost without ``no_sync`` (one all-reduce per task);
* ``per_task_clip``: ``grad_clip_mode="per_task"`` at the clip norm ``CLIP``;
* ``per_task_moments``: ``moments="per_task"`` (each task's rank-averaged gradient goes into its
  own AdamW moments, so every task's backward all-reduces);
* ``upgrad``: ``aggregator="torchjd.aggregation.UPGrad"`` (the rows of J are rank-averaged task
  gradients, so every task's backward all-reduces).

Each fit writes to ``<out>/<mode>/rank<r>/``: ``initial.pt`` (state dict when training starts, after
DDP broadcast the weights), ``grads.pt`` (gradients seen by ``on_before_optimizer_step`` of the first
step), ``final.pt`` (state dict when training ends) and ``record.json`` (comm-hook calls per
optimizer step and the bucket sizes they reduced).

Usage: ``python -m tests.ddp_worker OUT_DIR MAX_STEPS``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

from tests.conftest import TINY_ENCODER, mixed_tasks, random_batch  # noqa: E402
from umedpt import MultiTaskModule, SwinEncoder, Task  # noqa: E402

WORLD_SIZE = 2
BATCH_SIZE = 2
#: the Trainer options of every distributed test fit: no logging, checkpoints, bars or validation
QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}
MODES = ("no_sync", "sync_every_task", "per_task_clip", "per_task_moments", "upgrad")
#: the clip norm of the ``per_task_clip`` mode (below every task's gradient norm)
CLIP = 0.05

# comm-hook calls in this process: one entry per call, the number of gradient elements reduced
HOOK_CALLS: list[int] = []


def counting_allreduce(state, bucket):  # unannotated: DDP rejects string annotations here
    """DDP comm hook: record the call, then do DDP's default all-reduce (sum / world size)."""
    HOOK_CALLS.append(int(bucket.buffer().numel()))
    return default_hooks.allreduce_hook(state, bucket)


def tasks() -> list[Task]:
    """The task mix of the run: one task of each kind."""
    return mixed_tasks(batch_size=BATCH_SIZE)


def build_model(seed: int, **kw: Any) -> MultiTaskModule:
    """The model of the run: deterministic forward, raw gradients (no clipping), nothing exported.

    timm's Swin has stochastic depth by default (``drop_path_rate=0.1``): its random draws differ
    between the ranks and the reference, so it is switched off to make gradients comparable.
    """
    torch.manual_seed(seed)
    encoder = {**TINY_ENCODER, "model_kwargs": {**TINY_ENCODER["model_kwargs"], "drop_path_rate": 0.0}}
    settings = {"grad_clip_norm": None, "warmup_steps": 1, "export_encoder": False, **kw}
    return MultiTaskModule(tasks=tasks(), encoder=SwinEncoder(**encoder), **settings)


def rank_batch(task_list: list[Task], rank: int, step: int) -> dict[str, dict[str, Any]]:
    """The known, rank-specific batch ``{task: task_batch}`` that ``rank`` trains on at ``step``."""
    return {
        t.name: random_batch(t, batch_size=BATCH_SIZE, seed=1000 * rank + 100 * step + i)
        for i, t in enumerate(task_list)
    }


def recorder_class() -> type:
    """The callback each rank records with: comm-hook calls per optimizer step and the buckets
    they reduced, the first step's gradients, the initial and final weights and
    ``record.json`` (:meth:`record`). Lightning is imported here so that a test can import this
    module without it."""
    from lightning import Callback, Trainer
    from torch.nn.parallel import DistributedDataParallel

    class Recorder(Callback):
        def __init__(self, folder: Path) -> None:
            self.folder = folder
            self.calls_per_step: list[int] = []
            self.bucket_numels: list[list[int]] = []
            self.start = 0

        def on_fit_start(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
            # Lightning registers ``DDPStrategy(ddp_comm_hook=...)`` on CUDA only: register it here
            ddp = trainer.strategy.model
            assert isinstance(ddp, DistributedDataParallel), type(ddp)
            ddp.register_comm_hook(state=None, hook=counting_allreduce)

        def on_train_start(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, self.folder / "initial.pt")

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.start = len(HOOK_CALLS)

        def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
            self.calls_per_step.append(len(HOOK_CALLS) - self.start)
            self.bucket_numels.append(HOOK_CALLS[self.start :])
            if trainer.global_step == 0:
                grads = {
                    n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
                }
                torch.save(grads, self.folder / "grads.pt")

        def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.folder / "final.pt")
            (self.folder / "record.json").write_text(json.dumps(self.record(trainer, pl_module)))

        def record(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
            return {
                "calls_per_step": self.calls_per_step,
                "bucket_numels": self.bucket_numels,
                "num_params": sum(p.numel() for p in pl_module.parameters()),
                "tasks": pl_module.task_names,
                "world_size": trainer.world_size,
                "global_rank": trainer.global_rank,
                "global_step": trainer.global_step,
            }

    return Recorder


def main(out: Path, max_steps: int) -> None:
    # imported here so that the test can import ``rank_batch`` without the Lightning stack
    from lightning import Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.utilities import CombinedLoader
    from torch.utils.data import DataLoader

    class SyncEveryBackward(DDPStrategy):
        """DDP with ``no_sync`` disabled: every backward all-reduces (the contrast)."""

        @contextmanager
        def block_backward_sync(self) -> Iterator[None]:
            yield None

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    task_list = tasks()
    batches = [rank_batch(task_list, rank, step) for step in range(max_steps)]
    for mode in MODES:
        folder = out / mode / f"rank{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        loaders = {
            t.name: DataLoader([b[t.name] for b in batches], batch_size=None, shuffle=False)
            for t in task_list
        }
        strategy_cls = SyncEveryBackward if mode == "sync_every_task" else DDPStrategy
        strategy = strategy_cls(
            process_group_backend="gloo",
            find_unused_parameters=True,
            bucket_cap_mb=100,  # the tiny model fits one bucket (also the first one)
        )
        trainer = Trainer(
            **QUIET_TRAINER,
            devices=WORLD_SIZE,
            num_nodes=1,
            strategy=strategy,
            max_steps=max_steps,
            use_distributed_sampler=False,
            default_root_dir=str(folder),
            callbacks=[recorder_class()(folder)],
        )
        # a different seed per rank: DDP must broadcast rank 0's weights
        options = {
            "per_task_clip": {"grad_clip_norm": CLIP, "grad_clip_mode": "per_task"},
            "per_task_moments": {"moments": "per_task"},
            "upgrad": {"aggregator": "torchjd.aggregation.UPGrad"},
        }.get(mode, {})
        model = build_model(seed=rank, **options)
        trainer.fit(model, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
