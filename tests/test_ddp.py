"""DDP: the task-by-task loop all-reduces gradients once per optimizer step, and gets them right.

Two CPU processes (gloo) run ``tests/ddp_worker.py``: the real Lightning ``Trainer`` fits the real
``MultiTaskModule.training_step`` on 4 tasks of all kinds, each rank on different, known batches.
A counting DDP comm hook (which then does the default all-reduce; the worker registers it itself,
as Lightning registers ``DDPStrategy(ddp_comm_hook=...)`` on CUDA only) measures the all-reduces per
optimizer step, against the same fit with ``no_sync`` disabled (one all-reduce per task); the gradients of the first step are compared across ranks and with a
single-process reference: per rank, ``accumulate(batch_of_rank)`` on a fresh module with the same
initial weights, then the mean over ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ddp_worker import CLIP, MODES, WORLD_SIZE, build_model, rank_batch, tasks

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 2
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(WORLD_SIZE):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "TORCHELASTIC", "SLURM"))}
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD_SIZE),
            NODE_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            NO_ALBUMENTATIONS_UPDATE="1",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        cmd = [sys.executable, "-m", "tests.ddp_worker", str(out), str(MAX_STEPS)]
        with open(out / f"rank{rank}.log", "w") as log:  # the child keeps its own copy of the handle
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run both ranks once; load what they recorded: ``{mode: [per-rank dict]}``."""
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    procs = launch(out)
    deadline = start + TIMEOUT_S
    codes: list[int | None] = [None] * WORLD_SIZE
    try:
        while any(c is None for c in codes) and time.perf_counter() < deadline:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):  # one rank failed: the other would hang
                time.sleep(2)
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # only the processes started here, by handle
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * WORLD_SIZE:
        logs = "\n".join(
            f"----- rank {r} (exit {codes[r]}) -----\n{(out / f'rank{r}.log').read_text()[-6000:]}"
            for r in range(WORLD_SIZE)
        )
        pytest.fail(f"DDP workers failed or timed out after {TIMEOUT_S} s:\n{logs}")
    result: dict[str, Any] = {}
    for mode in MODES:
        ranks = []
        for r in range(WORLD_SIZE):
            folder = out / mode / f"rank{r}"
            ranks.append(
                {
                    "record": json.loads((folder / "record.json").read_text()),
                    "grads": torch.load(folder / "grads.pt", weights_only=True),
                    "initial": torch.load(folder / "initial.pt", weights_only=True),
                    "final": torch.load(folder / "final.pt", weights_only=True),
                }
            )
        result[mode] = ranks
    return result


def per_rank_reference(initial: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Single process, no DDP: per rank, ``accumulate`` its first batch from the same initial weights."""
    model = build_model(seed=123)
    model.load_state_dict(initial)
    task_list = tasks()
    grads = []
    for rank in range(WORLD_SIZE):
        model.zero_grad(set_to_none=True)
        model.accumulate(rank_batch(task_list, rank, step=0))
        # a parameter that a rank's tasks do not use contributes zeros to the mean
        grads.append(
            {
                n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in model.named_parameters()
            }
        )
    return grads


def rank_averaged_task_gradient(model: Any, task: str, step: int) -> dict[str, torch.Tensor]:
    """Task ``task``'s gradients at ``step`` averaged over the ranks' batches, by parameter name
    (what DDP's all-reduce of that task's backward gives)."""
    task_list = tasks()
    per_rank = []
    for rank in range(WORLD_SIZE):
        model.zero_grad(set_to_none=True)
        model.task_loss(task, rank_batch(task_list, rank, step)[task]).backward()
        per_rank.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return {n: sum(g[n] for g in per_rank) / WORLD_SIZE for n in per_rank[0]}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference over the parameters of ``a``, and where it is."""
    worst = max(a, key=lambda n: float((a[n] - b[n]).abs().max()))
    return float((a[worst] - b[worst]).abs().max()), worst


def test_workers_trained_all_tasks_from_the_same_weights(run):
    for mode in MODES:
        records = [r["record"] for r in run[mode]]
        assert [r["global_rank"] for r in records] == list(range(WORLD_SIZE)), mode
        assert all(r["world_size"] == WORLD_SIZE for r in records), mode
        assert all(r["global_step"] == MAX_STEPS for r in records), (mode, records)
        assert all(r["tasks"] == [t.name for t in tasks()] for r in records), mode
        # the ranks built their models from different seeds: DDP broadcast rank 0's weights
        first, other = run[mode][0]["initial"], run[mode][1]["initial"]
        assert first.keys() == other.keys()
        for name in first:
            assert torch.equal(first[name], other[name]), f"{mode}: {name} differs between ranks at start"


def test_one_allreduce_per_optimizer_step(run):
    n_tasks = len(tasks())
    assert n_tasks >= 3
    for r, rank in enumerate(run["no_sync"]):
        record = rank["record"]
        # one bucket holds every parameter, so one hook call == one all-reduce of all gradients
        assert record["calls_per_step"] == [1] * MAX_STEPS, (
            f"rank {r}: comm-hook calls per optimizer step {record['calls_per_step']}, expected 1 each "
            f"(buckets reduced: {record['bucket_numels']})"
        )
        assert all(numels == [record["num_params"]] for numels in record["bucket_numels"]), record


def test_without_no_sync_every_task_backward_would_allreduce(run):
    n_tasks = len(tasks())
    for r, rank in enumerate(run["sync_every_task"]):
        calls = rank["record"]["calls_per_step"]
        assert calls == [n_tasks] * MAX_STEPS, (
            f"rank {r}: {calls} comm-hook calls per step, expected {n_tasks}"
        )


# with per-task moments the optimizer takes each task's gradient out of .grad: checked by its own test
@pytest.mark.parametrize("mode", [m for m in MODES if m != "per_task_moments"])
def test_gradients_are_identical_on_all_ranks(run, mode):
    g0, g1 = run[mode][0]["grads"], run[mode][1]["grads"]
    assert g0.keys() == g1.keys(), f"{mode}: ranks have gradients for different parameters"
    differ = [n for n in g0 if not torch.equal(g0[n], g1[n])]
    diff, worst = max_abs_diff(g0, g1)
    assert not differ, (
        f"{mode}: {len(differ)}/{len(g0)} gradients differ between ranks after the step's all-reduce, "
        f"e.g. {differ[:6]}; max |diff| {diff:.3g} at {worst}"
    )


@pytest.mark.parametrize("mode", ["no_sync", "sync_every_task"])
def test_gradients_equal_the_rank_averaged_reference(run, mode):
    local = per_rank_reference(run[mode][0]["initial"])
    expected = {n: sum(g[n] for g in local) / WORLD_SIZE for n in local[0]}
    # not vacuous: the ranks' own gradients differ, and every head gets a gradient
    spread, _ = max_abs_diff(local[0], local[1])
    assert spread > 1e-3, f"the ranks' batches give the same gradients (max |diff| {spread:.3g})"
    for task in run[mode][0]["record"]["tasks"]:
        assert any(float(g.abs().max()) > 0 for n, g in expected.items() if n.startswith(f"heads.{task}.")), (
            task
        )
    for r, rank in enumerate(run[mode]):
        got = rank["grads"]
        missing = sorted(set(expected) - set(got))
        # a parameter without gradient in DDP must have a zero reference gradient
        assert all(float(expected[n].abs().max()) == 0.0 for n in missing), (mode, r, missing[:6])
        wrong = [n for n in got if not torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-6)]
        diff, worst = max_abs_diff(got, expected)
        assert not wrong, (
            f"{mode}, rank {r}: {len(wrong)}/{len(got)} gradients differ from the rank-averaged reference, "
            f"e.g. {wrong[:6]}; max |diff| {diff:.3g} at {worst} (between the ranks' own gradients: {spread:.3g})"
        )


def test_per_task_clipping_under_ddp_clips_each_rank_averaged_task_gradient(run):
    """Each task's gradient is averaged over the ranks, then clipped on its own, then summed."""
    initial = run["per_task_clip"][0]["initial"]
    model = build_model(seed=123)
    model.load_state_dict(initial)
    task_list = tasks()
    expected: dict[str, torch.Tensor] = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for task in model.task_names:
        mean = rank_averaged_task_gradient(model, task, step=0)
        norm = torch.nn.utils.get_total_norm(list(mean.values()))
        assert norm > CLIP, task  # the clip acts on every task
        for n, g in mean.items():
            expected[n] += g * (CLIP / (norm + 1e-6))
    for r, rank in enumerate(run["per_task_clip"]):
        got = rank["grads"]
        wrong = [n for n in got if not torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-7)]
        diff, worst = max_abs_diff(got, {n: expected[n] for n in got})
        assert not wrong, f"rank {r}: {len(wrong)}/{len(got)} gradients differ, max |diff| {diff:.3g} at {worst}"
    # one all-reduce per task: each task's clip needs its rank-averaged gradient
    assert all(c == [len(task_list)] * MAX_STEPS for c in [x["record"]["calls_per_step"] for x in run["per_task_clip"]])


def test_per_task_moments_under_ddp_step_with_each_rank_averaged_task_gradient(run):
    """``moments="per_task"``: each task's gradient, averaged over the ranks by its own backward,
    goes into that task's AdamW moments; the ranks end with identical weights, equal to a
    single-process TaskwiseAdamW fed with the rank-averaged task gradients."""
    records = run["per_task_moments"]
    initial = records[0]["initial"]
    model = build_model(seed=123, moments="per_task")
    model.load_state_dict(initial)
    optimizer, scheduler = model.build_optimizer(MAX_STEPS)
    task_list = tasks()
    params = dict(model.named_parameters())
    # a convolution bias followed by GroupNorm has a gradient of zero up to rounding, and AdamW
    # turns rounding noise into full steps of either sign: those parameters are not compared
    noise_level: set[str] = set()
    for step in range(MAX_STEPS):
        for task in model.task_names:
            for name, grad in rank_averaged_task_gradient(model, task, step).items():
                params[name].grad = grad
                if float(grad.abs().max()) < 1e-8:
                    noise_level.add(name)
            optimizer.accumulate(task)
        optimizer.step()
        scheduler.step()
    # (and the FPN's unused extra level): all in the detection head, none in the encoder
    assert noise_level and all(n.startswith("heads.xr_det.") for n in noise_level), sorted(noise_level)
    expected = {n: v for n, v in model.state_dict().items() if n not in noise_level}
    for r, rank in enumerate(records):
        got = rank["final"]
        # AdamW turns rounding differences of the all-reduce into steps of up to a few 1e-6 on single
        # elements with tiny gradients; every parameter moves by about 1.6e-3 over the steps
        wrong = [n for n in expected if not torch.allclose(got[n].float(), expected[n].float(), rtol=1e-4, atol=2e-5)]
        assert not wrong, f"rank {r}: {len(wrong)} tensors differ from the reference, e.g. {wrong[:6]}"
    key = "encoder.model.patch_embed.proj.weight"
    assert torch.equal(records[0]["final"][key], records[1]["final"][key])  # the ranks agree
    moved = max(float((records[0]["final"][n].float() - initial[n].float()).abs().max()) for n in initial)
    assert moved > 1e-4  # the run trained
    # each task's backward all-reduces: its moments need the rank-averaged gradient
    assert all(c == [len(task_list)] * MAX_STEPS for c in [x["record"]["calls_per_step"] for x in records])


def test_aggregator_under_ddp_sees_the_rank_averaged_task_gradients(run):
    """``aggregator=UPGrad``: row t of J is task t's encoder gradient averaged over the ranks (its
    own backward all-reduces), the encoder's gradient is UPGrad(J), heads keep their own."""
    from torchjd.aggregation import UPGrad

    records = run["upgrad"]
    model = build_model(seed=123)
    model.load_state_dict(records[0]["initial"])
    task_list = tasks()
    encoder = [n for n, _ in model.encoder.named_parameters()]
    rows, expected = [], {}
    for task in model.task_names:
        mean = rank_averaged_task_gradient(model, task, step=0)
        rows.append(torch.cat([mean[f"encoder.{n}"].flatten() for n in encoder]))
        expected.update({n: g for n, g in mean.items() if n.startswith(f"heads.{task}.")})
    aggregated = UPGrad()(torch.stack(rows))
    offset = 0
    for n, p in model.encoder.named_parameters():
        expected[f"encoder.{n}"] = aggregated[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    for r, rank in enumerate(records):
        got = rank["grads"]
        wrong = [n for n in expected if n in got and not torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-7)]
        assert not wrong, f"rank {r}: {len(wrong)} gradients differ from the reference, e.g. {wrong[:6]}"
        assert all(f"encoder.{n}" in got for n in encoder)
    assert all(c == [len(task_list)] * MAX_STEPS for c in [x["record"]["calls_per_step"] for x in records])
