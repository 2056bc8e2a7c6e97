"""The task-by-task accumulation loop: gradients, graph freeing, non-finite losses, task specs."""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import TINY_ENCODER, mixed_tasks, random_batch
from umedpt import MultiTaskModule, SwinEncoder, Task
from umedpt.encoder import find_batchnorm
from umedpt.module import NonFiniteLossError
from umedpt.testing import quiet_trainer


def make_module(tasks: list[Task], **kw: Any) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER), **kw)


def test_accumulated_gradient_equals_gradient_of_summed_loss(tasks, batch):
    model = make_module(tasks)
    reference = copy.deepcopy(model)

    losses = model.accumulate(batch)
    total = sum(reference.task_loss(name, batch[name]) for name in reference.task_names)
    total.backward()

    assert set(losses) == {t.name for t in tasks}
    torch.testing.assert_close(sum(losses.values()), total.detach(), rtol=1e-5, atol=1e-6)
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    # every head and the whole encoder received gradients
    assert checked >= len(list(model.encoder.parameters()))
    for name in model.task_names:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads[name].parameters()), (
            name
        )


def test_each_task_graph_is_freed_before_the_next_task_runs(tasks, batch):
    model = make_module(tasks)
    # parameters and input tensors legitimately outlive a task's graph: track only activations
    kept = [*model.parameters(), *(v for b in batch.values() for v in b.values() if torch.is_tensor(v))]
    kept += [t for b in batch.values() for key in ("boxes", "box_labels") for t in b.get(key, [])]
    param_storages = {t.untyped_storage().data_ptr() for t in kept}
    saved: dict[str, list[weakref.ref]] = {}
    current = {"task": None}
    alive_at_start: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in param_storages:
            saved.setdefault(current["task"], []).append(weakref.ref(t))
        return t

    original = model.task_loss

    def tracked_task_loss(name: str, task_batch: dict[str, Any]) -> torch.Tensor:
        alive_at_start[name] = sum(r() is not None for refs in saved.values() for r in refs)
        current["task"] = name
        return original(name, task_batch)

    model.task_loss = tracked_task_loss  # type: ignore[method-assign]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.accumulate(batch)

    assert set(saved) == set(model.task_names)
    assert all(len(refs) > 10 for refs in saved.values())  # the hook really saw each task's activations
    assert alive_at_start == dict.fromkeys(model.task_names, 0)


def test_nonfinite_loss_raises_naming_task_and_step(tasks, batch):
    model = make_module(tasks)
    head = model.heads["ct_seg"]
    head.loss = lambda outputs, b: outputs.sum() * float("nan")  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match=r"ct_seg.*step 0"):
        model.accumulate(batch)


def test_nonfinite_loss_skip_drops_only_that_task(tasks, batch):
    model = make_module(tasks, nonfinite="skip")
    model.heads["ct_seg"].loss = lambda outputs, b: outputs.sum() * float("inf")  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="ct_seg"):
        losses = model.accumulate(batch)
    assert float(losses["ct_seg"]) == 0.0
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.heads["ct_seg"].parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.grad is not None)


def test_loss_scale_normalises_initial_losses_to_about_one(tasks, batch):
    model = make_module(tasks)
    with torch.no_grad():
        for name in model.task_names:
            value = float(model.task_loss(name, batch[name]))
            assert 0.3 < value < 2.0, (name, value)


def test_task_weight_and_explicit_loss_scale_multiply_the_loss(batch):
    base = mixed_tasks()
    weighted = mixed_tasks()
    weighted[0].weight = 3.0
    weighted[1].loss_scale = 0.5
    a, b = make_module(base), make_module(weighted)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        t0, t1 = base[0].name, base[1].name
        torch.testing.assert_close(b.task_loss(t0, batch[t0]), 3.0 * a.task_loss(t0, batch[t0]))
        expected = 0.5 * a.task_loss(t1, batch[t1]) / a.loss_scales[t1]
        torch.testing.assert_close(b.task_loss(t1, batch[t1]), expected)


def test_tasks_per_step_samples_a_deterministic_subset(tasks, batch):
    model = make_module(tasks, tasks_per_step=2)
    chosen = model.active_tasks(batch)
    assert len(chosen) == 2 and chosen == model.active_tasks(batch)
    assert chosen == [n for n in model.task_names if n in chosen]  # configuration order kept


def test_no_batchnorm_anywhere_in_shared_encoder_or_heads(tasks):
    model = make_module(tasks)
    assert find_batchnorm(model) == []
    assert any(isinstance(m, nn.LayerNorm) for m in model.encoder.modules())


def test_module_rejects_encoder_with_batchnorm(tasks):
    encoder = SwinEncoder(**TINY_ENCODER)
    encoder.model.extra = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match=r"BatchNorm layers \[.model.extra.\]: .* a mixture of the tasks rather than any one"):
        MultiTaskModule(tasks=tasks, encoder=encoder)


def test_batchnorm_swin_exists_only_behind_the_ablation_s_escape_hatch(tasks):
    from umedpt.encoder import TokenBatchNorm

    with pytest.raises(ValueError, match=r"norm='batchnorm' is refused: .*docs/normalization.md"):
        SwinEncoder(**TINY_ENCODER, norm="batchnorm")
    plain = SwinEncoder(**TINY_ENCODER)
    assert "norm" not in plain.config  # ordinary encoders and their exports are unchanged
    encoder = SwinEncoder(**TINY_ENCODER, norm="batchnorm", allow_batchnorm=True)
    assert not [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
    norms = [m for m in encoder.modules() if isinstance(m, TokenBatchNorm)]
    assert len(norms) == len([m for m in plain.modules() if isinstance(m, nn.LayerNorm)])
    assert encoder.config["norm"] == "batchnorm"
    model = MultiTaskModule(tasks=tasks, encoder=encoder)  # accepted: the encoder says it is the ablation's
    # BatchNorm over the token channels: every token of the batch is one sample of its statistics
    channels = norms[0].num_features
    x = torch.randn(2, 3, 4, channels) * 3 + 1
    norms[0].train()
    out = norms[0](x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, channels).mean(0), torch.zeros(channels), atol=1e-5, rtol=0)
    assert [tuple(f.shape[1:]) for f in model.encoder(torch.zeros(2, 3, 64, 64))] == [
        tuple(f.shape[1:]) for f in plain(torch.zeros(2, 3, 64, 64))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "regression"}, "unknown task kind 'regression'"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"name": "bad name"}, "task name 'bad name' is invalid"),
        ({"class_names": ["a"]}, "1 class_names given for num_classes=3"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"data": {"init_args": {}}}, "data must be a mapping with 'class_path'"),
    ],
)
def test_task_spec_errors_name_the_task_and_field(kwargs, message):
    spec = {"name": "t1", "kind": "classification", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        Task(**spec)


def test_missing_head_class_gives_clear_error():
    task = Task(name="t1", kind="classification", num_classes=3, head="heads.nowhere.Head")
    with pytest.raises(ImportError, match=r"task 't1': head 'heads.nowhere.Head'.*cannot import module"):
        make_module([task])
    task = Task(name="t1", kind="classification", num_classes=3, head="heads.classification.NoSuchHead")
    with pytest.raises(ImportError, match="has no attribute 'NoSuchHead'"):
        make_module([task])


def test_duplicate_task_names_rejected():
    task = Task(name="t1", kind="classification", num_classes=3)
    with pytest.raises(ValueError, match="used twice"):
        make_module([task, task])


def test_batch_with_unknown_task_rejected(tasks):
    model = make_module(tasks)
    with pytest.raises(KeyError, match="nope"):
        model.accumulate({"nope": random_batch(tasks[0])})


def test_head_defaults_apply_per_kind_and_task_head_args_win(tasks):
    tasks[2].head_args = {"decoder_channels": 64}
    tasks[3].head_args = {}
    model = make_module(
        tasks, head_defaults={"segmentation": {"decoder_channels": 96}, "detection": {"fpn_channels": 64}}
    )
    assert model.heads["ct_seg"].classifier.in_channels == 64  # the task's own head_args win
    assert model.heads["xr_det"].fcos.backbone.out_channels == 64
    with pytest.raises(ValueError, match=r"head_defaults: unknown task kind 'regression'"):
        make_module(tasks, head_defaults={"regression": {}})


def test_channels_last_layout_gives_the_same_losses_and_gradients(tasks, batch):
    fast = make_module(tasks, channels_last=True)
    plain = make_module(tasks, channels_last=False)
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))

    fast_losses, plain_losses = fast.accumulate(batch), plain.accumulate(batch)
    for name in fast.task_names:
        torch.testing.assert_close(fast_losses[name], plain_losses[name], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_encoder_compiles_in_place_once(tasks, monkeypatch):
    model = make_module(tasks, compile_encoder=True)
    calls = []
    monkeypatch.setattr(model.encoder, "compile", lambda **kw: calls.append(kw))
    keys = set(model.state_dict())
    model.configure_model()
    model.configure_model()  # fit then test: compiled once
    assert calls == [{}]
    assert set(model.state_dict()) == keys
    assert make_module(tasks).hparams.compile_encoder is False


def test_group_to_device_moves_only_the_group_and_shared_tensors_once(tasks, batch):
    model = make_module(tasks).to("meta")
    shared = torch.rand(2, 3, 64, 64)
    host = {name: dict(batch[name], image=shared) for name in model.task_names}
    det = next(t.name for t in tasks if t.kind == "detection")
    seg = next(t.name for t in tasks if t.kind == "segmentation")

    moved = model.group_to_device([seg, det], host)

    assert set(moved) == {seg, det}
    assert moved[seg]["image"].device.type == "meta"
    assert moved[seg]["image"] is moved[det]["image"]  # one copy of an image batch shared by tasks
    assert moved[seg]["mask"].device.type == "meta"
    assert all(b.device.type == "meta" for b in moved[det]["boxes"])
    assert host[seg]["image"].device.type == "cpu"  # the host batch is left as it was


def test_training_batches_stay_on_the_host_until_their_task_runs(tasks, batch):
    from types import SimpleNamespace

    model = make_module(tasks)
    meta = torch.device("meta")
    model._trainer = SimpleNamespace(training=True)
    assert model.transfer_batch_to_device(batch, meta, 0) is batch
    model._trainer = SimpleNamespace(training=False)  # validation/test/predict: moved by Lightning
    moved = model.transfer_batch_to_device(batch, meta, 0)
    assert all(b["image"].device == meta for b in moved.values())


def test_head_lr_factor_scales_every_head_and_task_lr_factor_multiplies_it(tasks):
    tasks = [dataclasses.replace(t, lr_factor=3.0) if i == 0 else t for i, t in enumerate(tasks)]
    model = make_module(tasks, lr=1e-3, head_lr_factor=10.0)
    optimizer, _ = model.build_optimizer(10)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in model.encoder.parameters()} == {1e-3}
    assert [lr_of[id(p)] for p in model.heads[tasks[0].name].parameters()] == pytest.approx(
        [3e-2] * len(list(model.heads[tasks[0].name].parameters()))
    )
    for task in tasks[1:]:
        lrs = [lr_of[id(p)] for p in model.heads[task.name].parameters()]
        assert lrs == pytest.approx([1e-2] * len(lrs))
    with pytest.raises(ValueError, match="head_lr_factor must be > 0"):
        make_module(tasks, head_lr_factor=0.0)


def test_group_to_device_leaves_keep_on_host_keys_on_the_host(tasks, batch):
    model = make_module(tasks).to("meta")
    model.keep_on_host = ("label",)
    name = next(t.name for t in tasks if t.kind == "classification")
    moved = model.group_to_device([name], batch)
    assert moved[name]["image"].device.type == "meta"
    assert moved[name]["label"].device.type == "cpu"


def test_per_task_clipping_sums_each_task_gradient_clipped_on_its_own(tasks, batch):
    max_norm = 0.05  # below every task's gradient norm: each one is clipped
    model = make_module(tasks, grad_clip_norm=max_norm, grad_clip_mode="per_task")
    expected = {name: torch.zeros_like(p) for name, p in model.encoder.named_parameters()}
    for task in model.task_names:
        reference = copy.deepcopy(model)
        reference.task_loss(task, batch[task]).backward()
        params = [p for p in [*reference.encoder.parameters(), *reference.heads[task].parameters()] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        assert norm > max_norm, task
        for name, p in reference.encoder.named_parameters():
            if p.grad is not None:
                expected[name] += p.grad
        for (name, _), q in zip(model.heads[task].named_parameters(), reference.heads[task].parameters(), strict=True):
            expected[f"heads.{task}.{name}"] = q.grad

    model.accumulate(batch)

    for name, p in model.encoder.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    for task in model.task_names:
        for name, p in model.heads[task].named_parameters():
            want = expected[f"heads.{task}.{name}"]
            if want is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7)
    # the summed gradient is larger than one clip: the step is not clipped again as a whole
    total = torch.nn.utils.get_total_norm([p.grad for p in model.encoder.parameters() if p.grad is not None])
    assert total > max_norm


def test_grad_clip_mode_is_checked(tasks):
    with pytest.raises(ValueError, match="grad_clip_mode must be 'global' or 'per_task', got 'task'"):
        make_module(tasks, grad_clip_mode="task")


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_per_task_moments_fit_equals_a_manual_taskwise_adamw_loop(tasks, batch, tmp_path):
    """``moments="per_task"``: after each task's backward its gradient (encoder + its head) is
    clipped alone and taken into that task's AdamW moments; one step applies them all, each
    task's direction times its weight (AdamW's normalisation would undo a loss weight)."""
    from dataclasses import replace

    from lightning import Trainer
    from torch.utils.data import DataLoader

    from umedpt.optim import TaskwiseAdamW

    tasks = [replace(tasks[0], weight=0.25), *tasks[1:]]
    max_norm = 0.05  # below every task's gradient norm: each one is clipped
    model = make_module(tasks, moments="per_task", grad_clip_norm=max_norm, lr=1e-3, warmup_steps=1, export_encoder=False)
    reference = copy.deepcopy(model)
    batches = [batch, {t.name: random_batch(t, seed=7 + i) for i, t in enumerate(tasks)}, batch]

    def fit(module: MultiTaskModule) -> Trainer:
        trainer = quiet_trainer(max_steps=len(batches), default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
        return trainer

    trainer = fit(model)
    assert isinstance(trainer.optimizers[0], TaskwiseAdamW)
    assert sorted(trainer.optimizers[0].task_names()) == sorted(model.task_names)

    optimizer, scheduler = reference.build_optimizer(len(batches))
    for step_batch in batches:
        for name in reference.task_names:
            reference.task_loss(name, step_batch[name]).backward()
            trained = [*reference.encoder.parameters(), *reference.heads[name].parameters()]
            torch.nn.utils.clip_grad_norm_([p for p in trained if p.grad is not None], max_norm)
            optimizer.accumulate(name, reference.tasks[name].weight)
        optimizer.step()
        scheduler.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # and it is not what one shared AdamW does with the same batches
    shared = make_module(tasks, grad_clip_norm=max_norm, lr=1e-3, warmup_steps=1, export_encoder=False)
    fit(shared)
    gap = (shared.encoder.model.patch_embed.proj.weight - model.encoder.model.patch_embed.proj.weight).abs().max()
    assert gap > 1e-4


def test_moments_is_checked(tasks):
    with pytest.raises(ValueError, match="moments must be 'shared' or 'per_task', got 'task'"):
        make_module(tasks, moments="task")


def test_per_task_moments_refuse_fp16(tasks):
    from types import SimpleNamespace

    model = make_module(tasks, moments="per_task")
    model._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ValueError, match="moments='per_task'.*use precision bf16-mixed or 32-true, not '16-mixed'"):
        model.on_fit_start()
    model._trainer = SimpleNamespace(precision="bf16-mixed")
    model.on_fit_start()  # accepted
    torch.set_flush_denormal(False)


def test_flush_denormal_holds_only_inside_its_block():
    from umedpt.device import flush_denormal

    tiny = torch.tensor([1e-39])  # subnormal in float32
    with flush_denormal("cpu"):
        assert float(tiny * 1.0) == 0.0
    assert float(tiny * 1.0) > 0.0
    with flush_denormal("cpu", enabled=False):
        assert float(tiny * 1.0) > 0.0
