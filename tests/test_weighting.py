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
    # a step of one task is judged against every task's progress, not its own alone
    assert coord.weights(["a"]) == {"a": weights["a"]}
    assert coord.weights(["b"]) == {"b": 1.0}


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


def test_dynamic_weight_average_follows_the_formula_on_window_means():
    from umedpt.weighting import DynamicWeightAverage

    dwa = DynamicWeightAverage(temperature=2.0, window=2)
    assert dwa.weights(["a", "b"]) == {"a": 1.0, "b": 1.0}  # no two windows yet
    for a, b in ((1.0, 1.0), (1.0, 1.0), (0.5, 1.2), (0.5, 1.2)):
        dwa.update({"a": a, "b": b})
    assert dwa.rates() == pytest.approx({"a": 0.5, "b": 1.2})
    ea, eb = math.exp(0.5 / 2), math.exp(1.2 / 2)
    weights = dwa.weights(["a", "b", "c"])
    # the slowly falling task gets more weight; the K known weights average 1; unknown tasks weigh 1
    assert weights == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb), "c": 1.0})
    assert dwa.weights(["b"]) == pytest.approx({"b": 2 * eb / (ea + eb)})  # a step of one task: the same weight
    other = DynamicWeightAverage(temperature=2.0, window=2)
    other.load_state_dict(dwa.state_dict())
    assert other.weights(["a", "b"]) == {"a": weights["a"], "b": weights["b"]}
    with pytest.raises(ValueError, match="window must be >= 1"):
        DynamicWeightAverage(window=0)


def test_uncertainty_weights_learn_the_inverse_loss_within_their_bounds():
    from umedpt.weighting import UncertaintyWeighting

    weighting = UncertaintyWeighting(lr=0.05)
    for _ in range(2000):
        weighting.update({"hard": 2.0, "easy": 0.25, "bad": float("nan")})
    weights = weighting.weights(["hard", "easy", "bad"])
    # equilibrium of exp(-s) L + s: exp(-s) = 1 / L
    assert weights["hard"] == pytest.approx(0.5, abs=1e-3) and weights["easy"] == pytest.approx(4.0, rel=1e-3)
    assert weights["bad"] == 1.0  # non-finite losses are not taken
    capped = UncertaintyWeighting(lr=0.5, max_weight=3.0)
    for _ in range(200):
        capped.update({"easy": 0.01})
    assert capped.weights(["easy"])["easy"] == pytest.approx(3.0)


def test_a_loss_weighting_by_name_weighs_the_step_and_travels_in_checkpoints(tasks, batch):
    from tests.test_module import make_module

    model = make_module(tasks, loss_weighting={"class_path": "uncertainty", "init_args": {"lr": 0.2}})
    reference = make_module(tasks)
    names = model.task_names
    for _ in range(5):
        model.coordination.update({n: 0.5 + i for i, n in enumerate(names)})
    weights = model.coordination.weights(names)
    assert len(set(weights.values())) == len(names)  # different losses, different weights
    model.accumulate(batch)
    assert model.last_weights == weights
    sum(weights[n] * reference.task_loss(n, batch[n]) for n in names).backward()
    for p, q in zip(model.encoder.parameters(), reference.encoder.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    resumed = make_module(tasks, loss_weighting={"class_path": "uncertainty", "init_args": {"lr": 0.2}})
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.coordination.weights(names) == weights
    assert type(make_module(tasks, loss_weighting="dwa").coordination).__name__ == "DynamicWeightAverage"
    with pytest.raises(ValueError, match="coordination and loss_weighting both"):
        make_module(tasks, loss_weighting="dwa", coordination={"alpha": 1.0})
    with pytest.raises(ValueError, match=r"loss_weighting 'nowhere.Famo': cannot import .*\['dwa', 'famo', 'uncertainty'\]"):
        make_module(tasks, loss_weighting="nowhere.Famo")


def test_famo_weights_and_logit_step_follow_the_formula():
    from umedpt.weighting import FastAdaptiveWeighting

    famo = FastAdaptiveWeighting(lr=0.1, weight_decay=0.0, smoothing=0.0)
    assert famo.weights(["a", "b"]) == {"a": 1.0, "b": 1.0}  # nothing seen yet
    famo.update({"a": 1.0, "b": 1.0})  # first losses: no improvement to judge
    assert famo.z() == pytest.approx({"a": 0.5, "b": 0.5})
    famo.update({"a": 0.5, "b": 1.0, "c": float("nan")})  # a improved by log 2, b not at all
    # gradient of z . delta: z_k (delta_k - z . delta) = +/-0.1733; Adam's first step is lr * sign
    za = math.exp(-0.1) / (math.exp(-0.1) + math.exp(0.1))
    assert famo.z() == pytest.approx({"a": za, "b": 1 - za})
    # shared moments: K (z_t / L_t) / sum_s (z_s / L_s), the step descends sum z_t log L_t
    inv_a, inv_b = za / 0.5, (1 - za) / 1.0
    assert famo.weights(["a", "b", "c"]) == pytest.approx(
        {"a": 2 * inv_a / (inv_a + inv_b), "b": 2 * inv_b / (inv_a + inv_b), "c": 1.0}
    )
    famo.set_moments(per_task=True)  # a weight of an AdamW direction: no 1 / L
    assert famo.weights(["a", "b"]) == pytest.approx({"a": 2 * za, "b": 2 * (1 - za)})
    other = FastAdaptiveWeighting(lr=0.1, weight_decay=0.0, smoothing=0.0)
    other.load_state_dict(famo.state_dict())
    other.set_moments(per_task=True)
    assert other.weights(["a", "b"]) == famo.weights(["a", "b"])
    with pytest.raises(ValueError, match="smoothing must be in"):
        FastAdaptiveWeighting(smoothing=1.0)


def test_famo_balances_the_rates_at_which_losses_fall():
    """Two tasks whose losses fall at 4x different speeds per unit of weight: FAMO moves weight
    to the slow one until both log-losses fall at about the same rate."""
    from umedpt.weighting import FastAdaptiveWeighting

    def run(weight_decay: float) -> tuple[dict[str, float], float]:
        famo = FastAdaptiveWeighting(lr=0.025, smoothing=0.0, weight_decay=weight_decay)
        famo.set_moments(per_task=True)
        speed = {"fast": 0.004, "slow": 0.001}
        loss = {"fast": 1.0, "slow": 1.0}
        drops: dict[str, list[float]] = {"fast": [], "slow": []}
        for _ in range(3000):
            weights = famo.weights(list(loss))
            for t in loss:
                new = loss[t] * (1.0 - speed[t] * weights[t])
                drops[t].append(math.log(loss[t]) - math.log(new))
                loss[t] = new
            famo.update(loss)
        return famo.weights(list(loss)), sum(drops["fast"][-500:]) / sum(drops["slow"][-500:])

    # equal weights: the fast task's log-loss falls 4x faster; FAMO: weights 0.4 / 1.6, equal rates
    weights, ratio = run(weight_decay=0.0)
    assert weights == pytest.approx({"fast": 0.4, "slow": 1.6}, rel=1e-3)
    assert ratio == pytest.approx(1.0, abs=0.01)
    # the logits' decay (the paper's gamma) keeps the weights nearer 1: part of the way there
    weights, ratio = run(weight_decay=0.001)
    assert 0.4 < weights["fast"] < 1.0 < weights["slow"] < 1.6 and 1.0 < ratio < 4.0


def test_the_module_tells_famo_what_its_weights_multiply(tasks):
    from tests.test_module import make_module

    assert make_module(tasks, loss_weighting="famo", moments="per_task").coordination.per_task_moments is True
    assert make_module(tasks, loss_weighting="famo").coordination.per_task_moments is False
