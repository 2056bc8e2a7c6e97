"""Two nodes simulated on this machine: ``torchrun --nnodes 2 --nproc-per-node 1`` twice (c10d
rendezvous on 127.0.0.1, gloo), Lightning's DDP over both, the tasks streamed from litdata
chunks. Checks: Lightning sees 2 nodes x 1 process; each rank streams its own, disjoint share of
every task, together all of it; one gradient all-reduce per optimizer step; the gradients of the
first step equal the single-process reference on the union of the two ranks' batches."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("litdata")

from tests.conftest import mixed_tasks  # noqa: E402
from tests.multinode_worker import NUM_NODES, build_model, streamed_tasks  # noqa: E402
from tests.test_ddp import free_port, max_abs_diff  # noqa: E402
from umedpt.data.streaming import StreamingTaskDataset, optimize_task  # noqa: E402
from umedpt.data.synthetic import SyntheticTaskDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SAMPLES = 8  # 4 per rank: 2 steps of batch 2
MAX_STEPS = 2
TIMEOUT_S = 300


def digest(image: torch.Tensor) -> str:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=8).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("multinode")
    stream = out / "stream"
    counts = {"train": TRAIN_SAMPLES, "val": 2}
    for task in mixed_tasks():
        args = task.data["init_args"]
        optimize_task(task, lambda split, a=args: SyntheticTaskDataset(**a, split=split, num_samples=counts[split], image_size=64),
                      stream, ("train", "val"), log=lambda _: None)  # fmt: skip
    port = free_port()
    procs = []
    for node in range(NUM_NODES):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "TORCHELASTIC", "SLURM", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
        env.update(OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NUM_NODES), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "umedpt-test",
               "--max-restarts", "0", "-m", "tests.multinode_worker", str(out), str(stream), str(MAX_STEPS)]  # fmt: skip
        with open(out / f"node{node}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(1.0)  # the first agent hosts the rendezvous store
    deadline = time.perf_counter() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_NODES:
        logs = "\n".join(f"----- node {n} (exit {codes[n]}) -----\n{(out / f'node{n}.log').read_text()[-6000:]}" for n in range(NUM_NODES))
        pytest.fail(f"torchrun nodes failed or timed out after {TIMEOUT_S} s:\n{logs}")
    ranks = []
    for r in range(NUM_NODES):
        folder = out / f"rank{r}"
        ranks.append({
            "record": json.loads((folder / "record.json").read_text()),
            "initial": torch.load(folder / "initial.pt", weights_only=True),
            "grads": torch.load(folder / "grads.pt", weights_only=True),
            "batches": torch.load(folder / "batches.pt", weights_only=True),
        })  # fmt: skip
    return {"ranks": ranks, "stream": stream}


def test_lightning_runs_two_nodes_of_one_process_under_torchrun(run):
    records = [r["record"] for r in run["ranks"]]
    assert sorted(r["global_rank"] for r in records) == [0, 1]
    assert all(r["world_size"] == 2 and r["num_nodes"] == 2 and r["global_step"] == MAX_STEPS for r in records), records
    assert sorted(r["node_rank"] for r in records) == [0, 1], records
    assert all(r["environment"] == "TorchElasticEnvironment" for r in records), records


def test_each_rank_streams_its_own_share_of_every_task(run):
    tasks = [t.name for t in streamed_tasks(run["stream"])]
    for name in tasks:
        stored = StreamingTaskDataset(str(run["stream"] / name), split="train", image_size=64)
        everything = sorted(digest(stored[i]["image"]) for i in range(len(stored)))
        shares = [[digest(image) for batch in rank["batches"] for image in batch[name]["image"]] for rank in run["ranks"]]
        assert all(len(share) == TRAIN_SAMPLES // NUM_NODES for share in shares), (name, shares)
        assert not set(shares[0]) & set(shares[1]), f"{name}: the ranks trained on the same samples"
        assert sorted(shares[0] + shares[1]) == everything, name


def test_one_allreduce_per_optimizer_step_across_nodes(run):
    for rank in run["ranks"]:
        assert rank["record"]["calls_per_step"] == [1] * MAX_STEPS, rank["record"]


def test_first_step_gradients_equal_the_single_process_reference_on_both_ranks_data(run):
    tasks = streamed_tasks(run["stream"])
    model = build_model(tasks, seed=123)
    model.load_state_dict(run["ranks"][0]["initial"])
    assert all(torch.equal(run["ranks"][1]["initial"][k], v) for k, v in run["ranks"][0]["initial"].items())
    local = []
    for rank in sorted(run["ranks"], key=lambda r: r["record"]["global_rank"]):
        model.zero_grad(set_to_none=True)
        model.accumulate(rank["batches"][0])
        local.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    expected = {n: (local[0][n] + local[1][n]) / 2 for n in local[0]}
    spread, _ = max_abs_diff(local[0], local[1])
    assert spread > 1e-3, spread  # the two ranks' data give different gradients
    for rank in run["ranks"]:
        got = rank["grads"]
        wrong = [n for n in got if not torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-6)]
        diff, worst = max_abs_diff(got, expected)
        assert not wrong, f"{len(wrong)} gradients differ from the reference; max |diff| {diff:.3g} at {worst}"
