"""One node of the simulated 2-node run checked by ``tests/test_multinode.py``.

``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``
starts it once per "node" (two local agents, one process each, gloo). Lightning finds the
torchrun environment itself (``TorchElasticEnvironment``); the Trainer runs with
``num_nodes=2, devices=1``. The four tiny tasks are streamed from the litdata folder the test
wrote (``umedpt data optimize``), so every rank reads its own share of each task.

Writes ``<out>/rank<r>/``: ``initial.pt`` (weights when training starts, after DDP's broadcast),
``batches.pt`` (the batches this rank trained on, step by step), ``grads.pt`` (the gradients
before the first optimizer step) and ``record.json`` (comm-hook calls per optimizer step, world
size, node rank, the environment Lightning detected).

Usage: ``python -m tests.multinode_worker OUT_DIR STREAM_DIR MAX_STEPS``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

from tests.conftest import TINY_ENCODER, mixed_tasks  # noqa: E402
from umedpt import MultiTaskModule, SwinEncoder, Task  # noqa: E402

NUM_NODES = 2
BATCH_SIZE = 2
HOOK_CALLS: list[int] = []


def counting_allreduce(state, bucket):  # unannotated: DDP rejects string annotations here
    """DDP comm hook: record the call, then DDP's default all-reduce (sum / world size)."""
    HOOK_CALLS.append(int(bucket.buffer().numel()))
    return default_hooks.allreduce_hook(state, bucket)


def streamed_tasks(stream: Path) -> list[Task]:
    """The tiny mix of four kinds, each task read from its optimized folder."""
    tasks = mixed_tasks(batch_size=BATCH_SIZE)
    for task in tasks:
        task.data = {"class_path": "umedpt.data.streaming.StreamingTaskDataset", "init_args": {"input_dir": str(stream / task.name)}}
    return tasks


def build_model(tasks: list[Task], seed: int) -> MultiTaskModule:
    """Deterministic forward (no stochastic depth), raw gradients (no clipping)."""
    torch.manual_seed(seed)
    encoder = {**TINY_ENCODER, "model_kwargs": {**TINY_ENCODER["model_kwargs"], "drop_path_rate": 0.0}}
    return MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**encoder), grad_clip_norm=None, warmup_steps=1, export_encoder=False)


def main(out: Path, stream: Path, max_steps: int) -> None:
    from lightning import Callback, Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    from umedpt.data import MultiTaskDataModule

    rank = int(os.environ["RANK"])
    folder = out / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)

    class Recorder(Callback):
        def __init__(self) -> None:
            self.calls_per_step: list[int] = []
            self.batches: list[dict[str, Any]] = []
            self.start = 0

        def on_fit_start(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
            ddp = trainer.strategy.model
            assert isinstance(ddp, DistributedDataParallel), type(ddp)
            ddp.register_comm_hook(state=None, hook=counting_allreduce)

        def on_train_start(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, folder / "initial.pt")

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.start = len(HOOK_CALLS)
            self.batches.append(batch)

        def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
            self.calls_per_step.append(len(HOOK_CALLS) - self.start)
            if trainer.global_step == 0:
                grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
                torch.save(grads, folder / "grads.pt")

        def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
            torch.save(self.batches, folder / "batches.pt")
            env = trainer.strategy.cluster_environment
            record = {
                "calls_per_step": self.calls_per_step,
                "global_rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "node_rank": trainer.node_rank,
                "num_nodes": trainer.num_nodes,
                "environment": type(env).__name__,
                "global_step": trainer.global_step,
                "group_rank": os.environ.get("GROUP_RANK"),
            }
            (folder / "record.json").write_text(json.dumps(record))

    torch.set_num_threads(1)
    tasks = streamed_tasks(stream)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=NUM_NODES,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True, bucket_cap_mb=100),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(folder),
        callbacks=[Recorder()],
    )
    data = MultiTaskDataModule(tasks=tasks, num_workers=0, dataset_defaults={"image_size": 64})
    # a different seed per rank: DDP must broadcast rank 0's weights
    trainer.fit(build_model(tasks, seed=rank), datamodule=data)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
