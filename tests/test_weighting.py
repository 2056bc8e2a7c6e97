"""GradientCoordination: the weights follow the tasks' recent progress, and the loop applies them."""

from __future__ import annotations

import math

import pytest
import torch

from umedpt.optim import TaskwiseAdamW
from umedpt.weighting import GradientCoordination


def _feed(coord: GradientCoordination, steps: int, falling: float = 0.004) -> list[float]:
    """Task ``a``'s loss falls by ``falling`` per step, ``b``'s stays at 1."""
    losses = []
    for step in range(steps):
        losses.append(1.0 - falling * step)
        coord.update({"a": losses[-1], "b": 1.0})
    return losses


def test_the_task_that_improves_fastest_is_damped_by_the_formula():
    coord = GradientCoordination(alpha=1.0, fast=0.9, slow=0.99, warmup=20)
    assert coord.weights(["a", "b"]) == {"a": 1.0, "b": 1.0}  # nothing settled yet
    losses = _feed(coord, 200)
    # the averages computed independently
    fast = slow = losses[0]
    for value in losses[1:]:
        fast, slow = 0.9 * fast + 0.1 * value, 0.99 * slow + 0.01 * value
    progress = {"a": slow - fast, "b": 0.0}
    assert coord.progress() == pytest.approx(progress)
    rho = progress["a"] / (progress["a"] / 2)  # = 2: a makes all of the progress
    weights = coord.weights(["a", "b"])
    assert weights["a"] == pytest.approx(1.0 - math.tanh(rho - 1.0)) and weights["a"] < 0.3
    assert weights["b"] == 1.0


def test_no_progress_means_no_damping_and_the_floor_holds():
    coord = GradientCoordination(alpha=1.0, warmup=5)
    for _ in range(50):
        coord.update({"a": 0.5, "b": 0.7})
    assert coord.weights(["a", "b"]) == {"a": 1.0, "b": 1.0}
    strong = GradientCoordination(alpha=10.0, warmup=5, min_weight=0.2)
    _feed(strong, 100)
    assert strong.weights(["a", "b"])["a"] == 0.2
    assert GradientCoordination(alpha=0.0, warmup=5).weights(["a"]) == {"a": 1.0}


def test_state_round_trips_and_bad_arguments_are_named():
    coord = GradientCoordination(warmup=10)
    _feed(coord, 60)
    again = GradientCoordination(warmup=10)
    again.load_state_dict(coord.state_dict())
    assert again.weights(["a", "b"]) == coord.weights(["a", "b"])
    coord.update({"a": float("nan")})  # a non-finite loss is not taken
    assert coord.averages["a"] == again.averages["a"]
    with pytest.raises(ValueError, match="need 0 <= fast < slow < 1"):
        GradientCoordination(fast=0.99, slow=0.9)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        GradientCoordination(alpha=-1)


def test_taskwise_adamw_scales_a_task_s_direction_and_not_its_moments():
    torch.manual_seed(0)
    start = torch.randn(5)
    grads = [torch.randn(5), torch.randn(5)]
    moved = {}
    for scale in (1.0, 0.25):
        p = torch.nn.Parameter(start.clone())
        opt = TaskwiseAdamW([p], lr=0.1, weight_decay=0.0)
        p.grad = grads[0].clone()
        opt.accumulate("a", scale)
        p.grad = grads[1].clone()
        opt.accumulate("b")
        opt.step()
        moved[scale] = (p.detach() - start, opt.state[p]["tasks"]["a"]["exp_avg"].clone())
    # one AdamW step from zero moments moves each task by lr * sign(g) (bias-corrected)
    direction_a, direction_b = -0.1 * grads[0].sign(), -0.1 * grads[1].sign()
    assert torch.allclose(moved[1.0][0], direction_a + direction_b, atol=1e-6)
    assert torch.allclose(moved[0.25][0], 0.25 * direction_a + direction_b, atol=1e-6)
    assert torch.equal(moved[1.0][1], moved[0.25][1])  # the moments saw the same gradient


def test_the_loop_weights_each_task_s_gradient(tasks, batch):
    from tests.test_module import make_module

    model = make_module(tasks, coordination={"warmup": 1})
    reference = make_module(tasks)
    names = model.task_names
    weights = {name: 0.25 + 0.5 * i for i, name in enumerate(names)}
    model.coordination.weights = lambda active: {n: weights[n] for n in active}  # type: ignore[method-assign]
    model.accumulate(batch)
    assert model.last_weights == weights
    total = sum(weights[n] * reference.task_loss(n, batch[n]) for n in names)
    total.backward()
    for (name, p), (_, q) in zip(model.encoder.named_parameters(), reference.encoder.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(TypeError, match="coordination: expected the arguments of GradientCoordination"):
        make_module(tasks, coordination=0.5)


def test_the_coordination_state_travels_in_checkpoints(tasks):
    from tests.test_module import make_module

    model = make_module(tasks, coordination={"warmup": 5})
    _feed(model.coordination, 40)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    resumed = make_module(tasks, coordination={"warmup": 5})
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.coordination.averages == model.coordination.averages
    assert resumed.coordination.weights(["a", "b"]) == model.coordination.weights(["a", "b"]) != {"a": 1.0, "b": 1.0}
