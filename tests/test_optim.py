"""TaskwiseAdamW: AdamW with per-task moments (umedpt.optim)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from umedpt.optim import TaskwiseAdamW


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def groups(net: nn.Module) -> list[dict]:
    return [
        {"params": list(net[0].parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(net[2].parameters()), "lr": 3e-2, "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("named", [False, True])
def test_one_task_is_adamw(named):
    a, b = small_net(), small_net()
    reference = torch.optim.AdamW(groups(a))
    taskwise = TaskwiseAdamW(groups(b))
    torch.manual_seed(1)
    for _ in range(40):
        x = torch.randn(8, 5)
        for net, opt in ((a, reference), (b, taskwise)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            if named and opt is taskwise:
                taskwise.accumulate("task")
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert taskwise.task_names() == (["task"] if named else [""])


def run_two_tasks(optimizer_class: type, scale: float, steps: int = 30) -> list[torch.Tensor]:
    """Two tasks on one shared net, task ``a``'s gradients multiplied by ``scale``."""
    net = small_net()
    opt = optimizer_class(net.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(2)
    xs = [(torch.randn(8, 5), torch.randn(8, 5)) for _ in range(steps)]
    for xa, xb in xs:
        opt.zero_grad()
        (scale * net(xa)[:, 0].pow(2).mean()).backward()
        if isinstance(opt, TaskwiseAdamW):
            opt.accumulate("a")
        (net(xb)[:, 1] - 1.0).pow(2).mean().backward()
        if isinstance(opt, TaskwiseAdamW):
            opt.accumulate("b")
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_a_task_with_larger_gradients_does_not_shrink_the_others_step():
    # AdamW normalises each task's gradient by that task's own moments: scaling one task's
    # loss by 1000 leaves the trajectory unchanged (up to eps)
    base = run_two_tasks(TaskwiseAdamW, scale=1.0)
    scaled = run_two_tasks(TaskwiseAdamW, scale=1000.0)
    for p, q in zip(base, scaled, strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
    # a shared AdamW follows the larger task: the same scaling moves it far away
    shared_base = run_two_tasks(torch.optim.AdamW, scale=1.0)
    shared_scaled = run_two_tasks(torch.optim.AdamW, scale=1000.0)
    gap = max((p - q).abs().max().item() for p, q in zip(shared_base, shared_scaled, strict=True))
    assert gap > 1e-2


def test_step_is_the_sum_of_each_task_adamw_direction():
    net = small_net()
    opt = TaskwiseAdamW(net.parameters(), lr=0.1, weight_decay=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 5)
    grads = []
    for column in (0, 1):
        net(x)[:, column].sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        opt.accumulate(f"t{column}")
    opt.step()
    # first AdamW step of a task: lr * g / (|g| + eps), per element
    for i, p in enumerate(net.parameters()):
        expected = before[i] - 0.1 * sum(g[i] / (g[i].abs() + 1e-8) for g in grads)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_untrained_parameters_are_not_decayed():
    net = small_net()
    opt = TaskwiseAdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    frozen = net[2].weight.detach().clone()
    net[0](torch.randn(3, 5)).sum().backward()  # only the first layer has gradients
    opt.accumulate("t")
    opt.step()
    torch.testing.assert_close(net[2].weight.detach(), frozen, rtol=0, atol=0)


def test_state_dict_round_trip_continues_bitwise():
    def train(net: nn.Module, opt: TaskwiseAdamW, seed: int, steps: int) -> None:
        torch.manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            for column in (0, 2):
                net(torch.randn(6, 5))[:, column].pow(2).mean().backward()
                opt.accumulate(f"t{column}")
            opt.step()

    net = small_net()
    opt = TaskwiseAdamW(groups(net))
    train(net, opt, 0, 5)
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buffer)
    train(net, opt, 1, 5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, ints and dicts
    resumed = small_net(seed=9)
    resumed.load_state_dict(saved["net"])
    resumed_opt = TaskwiseAdamW(groups(resumed))
    resumed_opt.load_state_dict(copy.deepcopy(saved["opt"]))
    assert sorted(resumed_opt.task_names()) == ["t0", "t2"]
    train(resumed, resumed_opt, 1, 5)
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_bad_arguments_are_named():
    net = small_net()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        TaskwiseAdamW(net.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match=r"betas must be in \[0, 1\)"):
        TaskwiseAdamW(net.parameters(), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="task must be a str"):
        TaskwiseAdamW(net.parameters()).accumulate(3)  # type: ignore[arg-type]


def test_warmup_cosine_rises_linearly_then_decays_to_its_floor():
    from umedpt.optim import warmup_cosine

    factor = warmup_cosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert factor(14) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)
    decay = [factor(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
