"""Resampler and connector-MoE: each rule of the reference implementation as an assertion."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from umedpt.mllm import ConnectorMoE, MLPConnector, Resampler

TASKS = ["vqa", "refer", "identify", "caption", "cls"]


def tokens(b: int = 2, length: int = 6, dim: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, length, dim, generator=torch.Generator().manual_seed(seed))


def connector(**kw) -> ConnectorMoE:
    torch.manual_seed(0)
    return ConnectorMoE(12, 8, TASKS, **kw)


def router_logits(moe: ConnectorMoE, x: torch.Tensor, task: str) -> torch.Tensor:
    """The reference's router input: the task token first, then the visual token."""
    task_token = moe.task_tokens[task].expand(x.shape[0], x.shape[1], -1)
    return moe.router(torch.cat([task_token, x], dim=-1))


def expert_outputs(moe: ConnectorMoE, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([expert(x) for expert in moe.experts], dim=-2)  # (B, L, N, H)


# ---------------------------------------------------------------------------------- resampler
def test_projection_resampler_concatenates_consecutive_tokens_in_raster_order():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    out = Resampler(4)(x)
    assert out.shape == (2, 4, 12)
    for j in range(4):
        assert torch.equal(out[:, j], torch.cat([x[:, 4 * j + i] for i in range(4)], dim=-1))
    assert Resampler(4).out_dim(3) == 12 and not list(Resampler(4).parameters())


@pytest.mark.parametrize("method", ["avg", "max"])
def test_pooling_resampler_pools_square_windows_of_the_grid(method):
    x = torch.randn(1, 16, 5)  # a 4 x 4 grid in raster order
    out = Resampler(4, method)(x, grid=(4, 4))
    assert out.shape == (1, 4, 5) and Resampler(4, method).out_dim(5) == 5
    window = x[0, [0, 1, 4, 5]]  # top-left 2 x 2 window
    expected = window.mean(0) if method == "avg" else window.amax(0)
    assert torch.allclose(out[0, 0], expected)


def test_resampler_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible"):
        Resampler(4)(torch.zeros(1, 6, 2))
    with pytest.raises(ValueError, match="square rate"):
        Resampler(2, "avg")


# ---------------------------------------------------------------------------------- structure
def test_defaults_and_structure_follow_the_reference():
    defaults = {k: p.default for k, p in inspect.signature(ConnectorMoE).parameters.items()}
    assert defaults["num_experts"] == 5 and defaults["router_type"] == "soft"
    assert defaults["router_input"] == "task_token" and defaults["top_k"] == 2
    moe = connector()
    assert len(moe.experts) == 5
    for expert in moe.experts:
        assert [type(m) for m in expert] == [nn.Linear, nn.GELU, nn.Linear]
        assert (expert[0].in_features, expert[0].out_features, expert[2].out_features) == (12, 8, 8)
    router_in = 12 + 12  # task token (task_token_dim = in_dim) + visual token
    assert [type(m) for m in moe.router] == [nn.Linear, nn.GELU, nn.Linear]
    assert (moe.router[0].in_features, moe.router[0].out_features) == (router_in, 4 * router_in)
    assert moe.router[2].out_features == 5
    assert set(moe.task_tokens) == set(TASKS)
    assert all(t.shape == (1, 1, 12) for t in moe.task_tokens.values())


def test_task_tokens_are_normal_with_std_002():
    torch.manual_seed(0)
    moe = ConnectorMoE(8, 4, TASKS, task_token_dim=4000, router_hidden=4)
    values = torch.cat([t.flatten() for t in moe.task_tokens.values()])
    assert abs(values.std().item() - 0.02) < 0.001 and abs(values.mean().item()) < 0.001


@pytest.mark.parametrize(("router_input", "width"), [("token", 12), ("task", 7)])
def test_router_input_options(router_input, width):
    moe = connector(router_input=router_input, task_token_dim=7)
    assert moe.router[0].in_features == width and moe.router[0].out_features == 4 * width
    weights = moe.route(tokens(), "vqa")
    if router_input == "task":  # the same weights for every token of the task
        assert torch.allclose(weights, weights[:1, :1].expand_as(weights))
    else:
        assert len(moe.task_tokens) == 0


def test_smaller_router_hidden_option():
    moe = connector(router_hidden=16)
    assert moe.router[0].out_features == 16
    assert moe(tokens(), "cls")[0].shape == (2, 6, 8)


# ---------------------------------------------------------------------------------- routing
def test_soft_router_is_normalised_sigmoid_not_softmax():
    moe, x = connector(), tokens()
    out, weights = moe(x, "refer")
    logits = router_logits(moe, x, "refer")
    expected = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 6), atol=1e-6)
    assert not torch.allclose(weights, F.softmax(logits, dim=-1), atol=1e-3)


def test_output_is_the_weighted_sum_of_the_experts():
    moe, x = connector(), tokens()
    out, weights = moe(x, "caption")
    expected = (weights[..., None] * expert_outputs(moe, x)).sum(-2)
    assert out.shape == (2, 6, 8) and torch.allclose(out, expected, atol=1e-6)


def test_sparse_router_keeps_exactly_top_k_experts():
    moe, x = connector(router_type="sparse", top_k=2), tokens()
    out, weights = moe(x, "vqa")
    assert torch.equal((weights > 0).sum(-1), torch.full((2, 6), 2))
    logits = router_logits(moe, x, "vqa")
    top = logits.topk(2, dim=-1)
    expected = torch.zeros_like(logits).scatter(-1, top.indices, F.softmax(top.values, dim=-1))
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(out, (weights[..., None] * expert_outputs(moe, x)).sum(-2), atol=1e-6)


def test_hard_router_uses_the_expert_of_the_task():
    moe, x = connector(router_type="hard"), tokens()
    assert moe.router is None and len(moe.task_tokens) == 0
    for index, task in enumerate(TASKS):
        out, weights = moe(x, task)
        assert torch.equal(weights, F.one_hot(torch.full((2, 6), index), 5).float())
        assert torch.allclose(out, moe.experts[index](x), atol=1e-6)
    with pytest.raises(ValueError, match="one expert per task"):
        ConnectorMoE(12, 8, TASKS, num_experts=3, router_type="hard")


def test_constant_router_averages_the_experts():
    moe, x = connector(router_type="constant"), tokens()
    out, weights = moe(x, "cls")
    assert torch.allclose(weights, torch.full((2, 6, 5), 0.2))
    assert torch.allclose(out, expert_outputs(moe, x).mean(-2), atol=1e-6)


@pytest.mark.parametrize("router_type", ["sparse", "hard"])
def test_sparse_compute_matches_the_dense_mixture(router_type):
    x = tokens()
    dense, fast = connector(router_type=router_type), connector(router_type=router_type, sparse_compute=True)
    out_dense, _ = dense(x, "identify")
    out_fast, _ = fast(x, "identify")
    assert torch.allclose(out_dense, out_fast, atol=1e-6)
    out_dense.square().sum().backward()
    out_fast.square().sum().backward()
    for a, b in zip(dense.parameters(), fast.parameters(), strict=True):
        grad_a, grad_b = (torch.zeros_like(p) if p.grad is None else p.grad for p in (a, b))
        assert torch.allclose(grad_a, grad_b, atol=1e-5)


def test_load_balancing_loss():
    moe = connector()
    assert moe.load_balancing_loss(torch.full((2, 6, 5), 0.2)).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(2, 6, dtype=torch.long), 5).float()
    assert moe.load_balancing_loss(collapsed).item() == pytest.approx(5.0)
    _, weights = moe(tokens(), "vqa")
    moe.load_balancing_loss(weights).backward()
    assert moe.router[0].weight.grad.abs().sum() > 0
    assert connector(router_type="constant").load_balancing_loss(collapsed).item() == 0.0


def test_unknown_task_and_bad_input_are_reported():
    moe = connector()
    with pytest.raises(KeyError, match="unknown task 'seg'"):
        moe(tokens(), "seg")
    with pytest.raises(ValueError, match=r"\(B, L, 12\)"):
        moe(torch.zeros(2, 6, 5), "vqa")


def test_mlp_connector_baseline():
    out, weights = MLPConnector(12, 8)(tokens(), "vqa")
    assert out.shape == (2, 6, 8) and weights is None
