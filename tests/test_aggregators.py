"""MultiTaskModule(aggregator=...): per-task encoder gradients combined by a TorchJD aggregator."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torchjd.aggregation import MGDA, UPGrad

from tests.conftest import TINY_ENCODER
from umedpt import MultiTaskModule, SwinEncoder, Task


def make_module(tasks: list[Task], **kw: Any) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER), export_encoder=False, **kw)


def jacobian(model: MultiTaskModule, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, list]]:
    """Rows: each task's encoder gradient by torch.autograd.grad (independent of the loop); and
    each task's head gradients."""
    encoder = list(model.encoder.parameters())
    rows, heads = [], {}
    for name in model.task_names:
        head = list(model.heads[name].parameters())
        grads = torch.autograd.grad(model.task_loss(name, batch[name]), encoder + head, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(encoder, grads[: len(encoder)], strict=True)]))
        heads[name] = list(grads[len(encoder) :])
    return torch.stack(rows), heads


def encoder_grad(model: MultiTaskModule) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.encoder.parameters()])


@pytest.mark.parametrize("spec", ["torchjd.aggregation.UPGrad", {"class_path": "torchjd.aggregation.MGDA"}])
def test_encoder_gradient_is_the_aggregation_of_the_task_gradients(tasks, batch, spec):
    model = make_module(tasks, aggregator=spec)
    reference = copy.deepcopy(model)
    J, head_grads = jacobian(reference, batch)
    assert J.shape == (len(tasks), sum(p.numel() for p in model.encoder.parameters()))
    aggregator = UPGrad() if "UPGrad" in str(spec) else MGDA()

    model.accumulate(batch)

    torch.testing.assert_close(encoder_grad(model), aggregator(J), rtol=1e-4, atol=1e-7)
    # not the sum: the tasks' gradients conflict somewhere
    assert not torch.allclose(encoder_grad(model), J.sum(0), rtol=1e-3, atol=1e-6)
    # heads keep their own task's gradient
    for name in model.task_names:
        for p, g in zip(model.heads[name].parameters(), head_grads[name], strict=True):
            if g is None:
                assert p.grad is None or not p.grad.any()
            else:
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert model.hparams.aggregator == spec


def test_sum_is_the_plain_loop_bitwise(tasks, batch):
    default, explicit = make_module(tasks), make_module(tasks, aggregator="sum")
    default.accumulate(batch)
    explicit.accumulate(batch)
    for p, q in zip(default.parameters(), explicit.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


def test_per_task_clipping_clips_each_row_before_aggregation(tasks, batch):
    max_norm = 0.05  # below every task's gradient norm
    model = make_module(tasks, aggregator="torchjd.aggregation.UPGrad", grad_clip_norm=max_norm, grad_clip_mode="per_task")
    reference = copy.deepcopy(model)
    rows = []
    for name in reference.task_names:
        params = [*reference.encoder.parameters(), *reference.heads[name].parameters()]
        grads = torch.autograd.grad(reference.task_loss(name, batch[name]), params, allow_unused=True)
        norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
        assert norm > max_norm, name
        encoder = grads[: len(list(reference.encoder.parameters()))]
        rows.append(torch.cat([g.flatten() for g in encoder]) * (max_norm / (norm + 1e-6)))

    model.accumulate(batch)

    torch.testing.assert_close(encoder_grad(model), UPGrad()(torch.stack(rows)), rtol=1e-4, atol=1e-8)


def test_an_aggregator_instance_is_used_and_recorded_by_class(tasks, batch):
    calls = []

    def mean(J: torch.Tensor) -> torch.Tensor:
        calls.append(J.shape)
        return J.mean(0)

    model = make_module(tasks, aggregator=mean)
    model.accumulate(batch)
    assert calls == [(len(tasks), sum(p.numel() for p in model.encoder.parameters()))]
    summed = make_module(tasks)
    summed.accumulate(batch)
    torch.testing.assert_close(encoder_grad(model), encoder_grad(summed) / len(tasks), rtol=1e-4, atol=1e-7)
    assert model.hparams.aggregator.endswith("mean")


def test_bad_aggregators_are_named(tasks, batch):
    with pytest.raises(ImportError, match="aggregator 'torchjd.aggregation.UpGrad'.*no attribute 'UpGrad'"):
        make_module(tasks, aggregator="torchjd.aggregation.UpGrad")
    with pytest.raises(TypeError, match="aggregator 'torchjd.aggregation.UPGrad': cannot build it with init_args"):
        make_module(tasks, aggregator={"class_path": "torchjd.aggregation.UPGrad", "init_args": {"weight": 2}})
    with pytest.raises(ValueError, match="unknown keys \\['init'\\]"):
        make_module(tasks, aggregator={"class_path": "torchjd.aggregation.UPGrad", "init": {}})
    with pytest.raises(ValueError, match="use one of them"):
        make_module(tasks, aggregator="torchjd.aggregation.UPGrad", moments="per_task")
    model = make_module(tasks, aggregator=lambda J: J[:, :3].sum(0))
    with pytest.raises(ValueError, match="aggregator returned a tensor of shape \\(3,\\)"):
        model.accumulate(batch)


def test_the_jacobian_can_be_kept_in_half_precision_or_host_memory(tasks, batch):
    from torchjd.aggregation import PCGrad

    model = make_module(tasks, aggregator="torchjd.aggregation.PCGrad", jacobian_dtype="bfloat16", jacobian_device="cpu")
    J, _ = jacobian(copy.deepcopy(model), batch)
    model.accumulate(batch)
    grad = encoder_grad(model)
    assert grad.dtype == torch.float32
    # PCGrad of the bfloat16 rows, written back in the parameters' dtype; close to float32's
    torch.testing.assert_close(grad, PCGrad()(J.bfloat16()).float(), rtol=1e-2, atol=1e-5)
    exact = PCGrad()(J)
    assert 0 < ((grad - exact).norm() / exact.norm()).item() < 0.01
    assert model.hparams.jacobian_dtype == "bfloat16" and model.hparams.jacobian_device == "cpu"
    # MGDA's min-norm solve is sensitive: 8% on these rows (documented)
    mgda = make_module(tasks, aggregator="torchjd.aggregation.MGDA", jacobian_dtype="bfloat16")
    mgda.accumulate(batch)
    exact = MGDA()(J)
    assert ((encoder_grad(mgda) - exact).norm() / exact.norm()).item() < 0.15

    refuses = make_module(tasks, aggregator="torchjd.aggregation.UPGrad", jacobian_dtype="bfloat16")
    with pytest.raises(TypeError, match=r"aggregator 'torchjd.aggregation.UPGrad' failed on a Jacobian of dtype torch.bfloat16.*jacobian_dtype: float32") as err:
        refuses.accumulate(batch)
    assert err.value.__cause__ is not None
    with pytest.raises(ValueError, match="jacobian_dtype must be one of"):
        make_module(tasks, aggregator="torchjd.aggregation.MGDA", jacobian_dtype="int8")
    with pytest.raises(ValueError, match="jacobian_device: 'gpu0' is not a device"):
        make_module(tasks, aggregator="torchjd.aggregation.MGDA", jacobian_device="gpu0")
