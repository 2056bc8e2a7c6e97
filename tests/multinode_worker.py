"""One node of the simulated 2-node run checked by ``tests/test_multinode.py``.

``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``
starts it once per "node" (two local agents, one process each, gloo). Lightning finds the
torchrun environment itself (``TorchElasticEnvironment``); the Trainer runs with
``num_nodes=2, devices=1``. The four tiny tasks are streamed from the litdata folder the test
wrote (``umedpt data optimize``), so every rank reads its own share of each task.

Writes ``<out>/rank<r>/``: ``initial.pt`` (weights when training starts, after DDP's broadcast),
``batches.pt`` (the batches this rank trained on, step by step), ``grads.pt`` (the gradients
before the first optimizer step) and ``record.json`` (comm-hook calls per optimizer step, world
size, node rank, the environment Lightning detected): the recorder of ``tests/ddp_worker.py``.

Usage: ``python -m tests.multinode_worker OUT_DIR STREAM_DIR MAX_STEPS``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from tests.conftest import TINY_ENCODER, mixed_tasks  # noqa: E402
from tests.ddp_worker import QUIET_TRAINER, recorder_class  # noqa: E402
from umedpt import MultiTaskModule, SwinEncoder, Task  # noqa: E402

NUM_NODES = 2
BATCH_SIZE = 2
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
    from lightning import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    from umedpt.data import MultiTaskDataModule

    rank = int(os.environ["RANK"])
    folder = out / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)

    class Recorder(recorder_class()):
        """The DDP test's recorder, also keeping the batches and the environment Lightning found."""

        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            self.batches: list[dict[str, Any]] = []

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.batches.append(batch)

        def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
            torch.save(self.batches, self.folder / "batches.pt")
            super().on_train_end(trainer, pl_module)

        def record(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
            return {**super().record(trainer, pl_module), "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes,
                    "environment": type(trainer.strategy.cluster_environment).__name__}  # fmt: skip

    torch.set_num_threads(1)
    tasks = streamed_tasks(stream)
    trainer = Trainer(
        **QUIET_TRAINER,
        devices=1,
        num_nodes=NUM_NODES,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True, bucket_cap_mb=100),
        max_steps=max_steps,
        default_root_dir=str(folder),
        callbacks=[Recorder(folder)],
    )
    data = MultiTaskDataModule(tasks=tasks, num_workers=0, dataset_defaults={"image_size": 64})
    # a different seed per rank: DDP must broadcast rank 0's weights
    trainer.fit(build_model(tasks, seed=rank), datamodule=data)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
