"""End to end through the real Trainer and CLI: convergence, resume, export, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, Trainer

from tests.conftest import TINY_ENCODER, mixed_tasks
from umedpt import MultiTaskModule, SwinEncoder, load_encoder
from umedpt.cli import main
from umedpt.data import MultiTaskDataModule
from umedpt.device import default_precision
from umedpt.testing import quiet_trainer

CONF = Path(__file__).parent / "conf" / "tiny.yaml"


def build(num_samples: int, batch_size: int, init_seed: int = 0, drop_path_rate: float = 0.0, **model_kw: Any):
    torch.manual_seed(init_seed)
    tasks = mixed_tasks(batch_size=batch_size)
    encoder = {**TINY_ENCODER, "model_kwargs": {**TINY_ENCODER["model_kwargs"], "drop_path_rate": drop_path_rate}}
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**encoder), export_encoder=False, **model_kw)
    data = MultiTaskDataModule(
        tasks=tasks,
        num_workers=0,
        dataset_defaults={"image_size": 64, "num_samples": num_samples},
        tasks_per_step=model_kw.get("tasks_per_step"),
    )
    return model, data


def trainer(tmp_path: Path, **kw: Any) -> Trainer:
    return quiet_trainer(**{"default_root_dir": tmp_path, **kw})


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
        accumulate = pl_module.accumulate

        def recorded(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            losses = accumulate(batch)
            self.losses.append({k: float(v) for k, v in losses.items()})
            return losses

        pl_module.accumulate = recorded  # type: ignore[method-assign]


def test_every_task_loss_falls_on_synthetic_data(tmp_path):
    model, data = build(num_samples=16, batch_size=8, lr=2e-3, warmup_steps=2)
    record = RecordLosses()
    trainer(tmp_path, max_steps=60, callbacks=[record]).fit(model, data)
    assert len(record.losses) == 60
    for name in model.task_names:
        first = sum(step[name] for step in record.losses[:4]) / 4
        last = sum(step[name] for step in record.losses[-4:]) / 4
        assert last < 0.8 * first, (name, first, last)


class StopAndSave(Callback):
    """Save a checkpoint at the end of epoch ``epochs`` and stop (schedule stays that of the full run)."""

    def __init__(self, epochs: int, path: Path) -> None:
        self.epochs, self.path = epochs, path

    def on_train_epoch_end(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize(
    ("drop_path_rate", "tasks_per_step", "moments"),
    [(0.0, None, "shared"), (0.2, None, "shared"), (0.2, 2, "shared"), (0.0, None, "per_task")],
)
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, drop_path_rate, tasks_per_step, moments):
    """Resumed at an epoch boundary, the run is bitwise the uninterrupted one, also with stochastic
    depth (its random draws come from the global RNG streams that the checkpoint carries), with
    a random subset of the tasks per step (drawn by the data module from seed, epoch and step) and
    with per-task AdamW moments (kept in the checkpoint's optimizer state)."""
    # 16 samples / batch 8 = 2 steps per epoch; 4 epochs = 8 steps, interrupted after 2 epochs
    kw = {"drop_path_rate": drop_path_rate, "tasks_per_step": tasks_per_step, "moments": moments}
    full_model, data = build(num_samples=16, batch_size=8, **kw)
    trainer(tmp_path / "full", max_epochs=4).fit(full_model, data)

    ckpt = tmp_path / "half.ckpt"
    first, data = build(num_samples=16, batch_size=8, **kw)
    trainer(tmp_path / "first", max_epochs=4, callbacks=[StopAndSave(2, ckpt)]).fit(first, data)
    assert first.global_step == 4
    from umedpt.randomness import RNG_KEY

    assert RNG_KEY in torch.load(ckpt, weights_only=True)  # safe to load: tensors and plain values

    torch.manual_seed(999)  # the resuming process's own random state must not matter
    resumed, data = build(num_samples=16, batch_size=8, init_seed=123, **kw)
    trainer(tmp_path / "resumed", max_epochs=4).fit(resumed, data, ckpt_path=ckpt)
    assert resumed.global_step == full_model.global_step == 8
    full_state, resumed_state = full_model.state_dict(), resumed.state_dict()
    for key, value in full_state.items():
        assert torch.equal(resumed_state[key], value), f"{key}: max |diff| {(resumed_state[key] - value).abs().max()}"
    # the interrupted run really is different from the full one
    assert not torch.allclose(
        first.state_dict()["encoder.model.patch_embed.proj.weight"],
        full_state["encoder.model.patch_embed.proj.weight"],
    )


class StopAfterStep(Callback):
    """Save a checkpoint after optimizer step ``step`` (mid-epoch) and stop."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize(("tasks_per_step", "stop"), [(None, 7), (2, 7), (2, 5)])
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, tasks_per_step, stop):
    """Resumed from a checkpoint written mid-epoch (step 7) or after an epoch's last step (step 5),
    the run is bitwise the uninterrupted one: the training loaders continue their passes (a
    short task has cycled by then) and the task subsets continue from the step within the epoch
    (after the last step: from the next epoch's first)."""

    def build_uneven(init_seed: int = 0) -> tuple[MultiTaskModule, MultiTaskDataModule]:
        torch.manual_seed(init_seed)
        tasks = mixed_tasks(batch_size=4)
        tasks[1].data["init_args"]["num_samples"] = 8  # 2 batches: cycles within each 5-step epoch
        encoder = {**TINY_ENCODER, "model_kwargs": {**TINY_ENCODER["model_kwargs"], "drop_path_rate": 0.2}}
        model = MultiTaskModule(
            tasks=tasks, encoder=SwinEncoder(**encoder), export_encoder=False, tasks_per_step=tasks_per_step
        )
        data = MultiTaskDataModule(
            tasks=tasks,
            num_workers=0,
            dataset_defaults={"image_size": 64, "num_samples": 20},
            tasks_per_step=tasks_per_step,
        )
        return model, data

    full, data = build_uneven()
    trainer(tmp_path / "full", max_steps=13).fit(full, data)  # epochs of 5 steps
    ckpt = tmp_path / "mid.ckpt"
    first, data = build_uneven()
    trainer(tmp_path / "first", max_steps=13, callbacks=[StopAfterStep(stop, ckpt)]).fit(first, data)
    assert first.global_step == stop

    torch.manual_seed(999)
    resumed, data = build_uneven(init_seed=123)
    trainer(tmp_path / "resumed", max_steps=13).fit(resumed, data, ckpt_path=ckpt)
    assert resumed.global_step == full.global_step == 13
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    for key, value in full_state.items():
        assert torch.equal(resumed_state[key], value), f"{key}: max |diff| {(resumed_state[key] - value).abs().max()}"
    assert not torch.equal(first.state_dict()["encoder.model.patch_embed.proj.weight"], full_state["encoder.model.patch_embed.proj.weight"])


KILL_CONFIG = """
trainer: {max_steps: 18, max_epochs: -1, enable_progress_bar: false, log_every_n_steps: 3}
model:
  tasks_per_step: 2
  encoder:
    class_path: umedpt.SwinEncoder
    init_args:
      img_size: 64
      model_kwargs: {embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8], window_size: 4, drop_path_rate: 0.2}
data:
  dataset_defaults: {image_size: 64, num_samples: {train: 40, val: 4, test: 4}}
"""


def assert_killed_fit_resumes_exactly(tmp_path: Path, command: Any, env: dict[str, str]) -> None:
    """Run ``command(root, *extra)`` (a ``umedpt fit`` of 18 steps, 10 per epoch, a periodic
    checkpoint every 3) uninterrupted; run it again, SIGKILL it right after its first periodic
    checkpoint (mid-epoch) and resume it with ``--ckpt_path last``: the final weights and the
    exported encoder must equal the uninterrupted run's, bit for bit."""
    import signal
    import time

    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    run = tmp_path / "killed" / "lightning_logs" / "version_0" / "checkpoints"
    proc = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "last.ckpt").exists():
        assert proc.poll() is None, "the run ended before its first periodic checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(run / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert step < 18 and step % 10 != 0, step  # killed mid-epoch (40 samples / batch 4 = 10 steps)

    done = subprocess.run(command(tmp_path / "killed", "--ckpt_path", "last"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"--ckpt_path last is {run / 'last.ckpt'}" in done.stdout
    whole = torch.load(tmp_path / "whole" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(run / "last.ckpt", weights_only=True)
    assert whole["global_step"] == resumed["global_step"] == 18
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    exported = [root / "lightning_logs" / "version_0" / "encoder" / "model.safetensors" for root in
                (tmp_path / "whole", tmp_path / "killed")]
    assert exported[0].read_bytes() == exported[1].read_bytes()


def test_killed_fit_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """SIGKILL a real ``lightning fit`` process right after its first periodic checkpoint
    (mid-epoch), resume it with ``--ckpt_path last``: the final weights equal, bit for bit, those
    of a run that was never interrupted (stochastic depth and a random task subset per step)."""
    override = tmp_path / "kill.yaml"
    override.write_text(KILL_CONFIG)

    def command(root: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "umedpt", "fit", "-c", str(CONF), "-c", str(override),
                "--checkpoint_every", "3", "--trainer.default_root_dir", str(root), *extra]

    assert_killed_fit_resumes_exactly(tmp_path, command, {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_cli_fit_exports_encoder_that_loads_and_embeds(tmp_path):
    cli = main(["fit", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2  # 8 samples / batch 4, one epoch
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    metrics = cli.trainer.callback_metrics
    for name in ("xr_grade", "fl_objects", "ct_seg", "xr_det"):
        assert f"val/{name}/loss" in metrics
    assert "val/xr_grade/accuracy" in str(sorted(metrics)) or any(
        k.startswith("val/xr_grade/") for k in metrics
    )

    encoder = load_encoder(log_dir / "encoder")
    torch.testing.assert_close(
        encoder.state_dict()["model.patch_embed.proj.weight"],
        cli.model.encoder.state_dict()["model.patch_embed.proj.weight"],
    )
    assert encoder.embed(torch.rand(1, 1, 64, 64)).shape == (1, 128)

    ckpts = sorted(log_dir.glob("checkpoints/*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    from_ckpt = load_encoder(ckpts[-1])
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(from_ckpt.embed(x), encoder.embed(x))

    tested = main(
        ["test", "-c", str(CONF), "--ckpt_path", str(ckpts[-1]), "--trainer.default_root_dir", str(tmp_path)]
    )
    results = tested.trainer.callback_metrics
    assert {f"test/{n}/loss" for n in tested.model.task_names} <= set(results)
    assert 0.0 <= float(results["test/xr_grade/accuracy"]) <= 1.0

    predicted = main(
        [
            "predict",
            "-c",
            str(CONF),
            "--ckpt_path",
            str(ckpts[-1]),
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    out = Path(predicted.trainer.log_dir) / "predictions"
    assert sorted(p.name for p in out.iterdir()) == ["ct_seg.pt", "fl_objects.pt", "xr_det.pt", "xr_grade.pt"]
    probs = torch.load(out / "xr_grade.pt", weights_only=True)
    assert probs.shape == (8, 3)  # 8 test images, 3 classes
    torch.testing.assert_close(probs.sum(1), torch.ones(8))
    masks = torch.load(out / "ct_seg.pt", weights_only=True)
    assert masks.shape == (8, 64, 64) and masks.dtype == torch.int64 and int(masks.max()) < 5
    detections = torch.load(out / "xr_det.pt", weights_only=True)
    assert len(detections) == 8 and set(detections[0]) == {"boxes", "scores", "labels"}


def test_cli_run_false_builds_model_and_data_from_yaml():
    cli = main(["-c", str(CONF)], run=False)
    assert cli.model.task_names == ["xr_grade", "fl_objects", "ct_seg", "xr_det"]
    assert [t.name for t in cli.datamodule.tasks] == cli.model.task_names
    assert cli.model.encoder.out_channels == [16, 32, 64, 128]


def test_cli_rejects_unknown_task_kind(tmp_path, capsys):
    bad = CONF.read_text().replace("kind: multilabel", "kind: regression")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["-c", str(tmp_path / "bad.yaml")], run=False)
    message = str(info.value) + capsys.readouterr().err
    assert "regression" in message


def test_cli_rejects_missing_head_class(tmp_path):
    bad = CONF.read_text().replace("head_args: {fpn_channels: 32}", "head: heads.detection.Missing")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ImportError, match=r"task 'xr_det': head 'heads.detection.Missing'"):
        main(["-c", str(tmp_path / "bad.yaml")], run=False)


def test_data_errors_name_the_task(tmp_path):
    tasks = mixed_tasks(batch_size=32)
    data = MultiTaskDataModule(
        tasks=tasks, num_workers=0, dataset_defaults={"image_size": 64, "num_samples": 8}
    )
    with pytest.raises(
        ValueError, match=r"task 'xr_grade': train split has 8 samples, fewer than batch_size=32"
    ):
        data.setup("fit")
    tasks = mixed_tasks()
    tasks[0].num_classes = 7
    data = MultiTaskDataModule(tasks=tasks, num_workers=0, dataset_defaults={"num_samples": 8})
    with pytest.raises(
        ValueError, match=r"task 'xr_grade': num_classes=7 but its train dataset has 3 classes"
    ):
        data.setup("fit")
    tasks = mixed_tasks()
    tasks[1].data = {
        "class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
        "init_args": {"style": "mri"},
    }
    data = MultiTaskDataModule(tasks=tasks, num_workers=0)
    with pytest.raises((ValueError, TypeError), match=r"task 'fl_objects' \(train split\)"):
        data.setup("fit")


def test_console_script_runs_fit_and_exits_zero(tmp_path):
    script = Path(sys.executable).with_name("lightning")
    args = [str(script), "fit", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val metrics per task" in done.stdout and "xr_det" in done.stdout
    assert (tmp_path / "lightning_logs" / "version_0" / "encoder" / "model.safetensors").is_file()


def test_loaders_use_task_batch_size_and_workers():
    tasks = mixed_tasks(batch_size=4)
    tasks[0].num_workers, tasks[1].batch_size = 1, 2
    data = MultiTaskDataModule(
        tasks=tasks, num_workers=0, dataset_defaults={"image_size": 32, "num_samples": 8}
    )
    data.setup("fit")
    loaders = data.train_dataloader().iterables
    assert loaders["xr_grade"].num_workers == 1 and loaders["fl_objects"].num_workers == 0
    batch, _, _ = next(iter(data.train_dataloader()))
    assert batch["xr_grade"]["image"].shape == (4, 3, 32, 32)
    assert batch["fl_objects"]["label"].shape == (2, 4)
    assert isinstance(batch["xr_det"]["boxes"], list) and len(batch["xr_det"]["boxes"]) == 4
    assert [len(dl.dataset) for dl in data.val_dataloader()] == [8, 8, 8, 8]


class CountingDataset(torch.utils.data.Dataset):
    """Counts the samples read from a dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.reads = dataset, 0
        self.num_classes, self.kind = dataset.num_classes, dataset.kind

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self.reads += 1
        return self.dataset[i]


def test_tasks_per_step_loads_and_trains_only_the_drawn_tasks(tmp_path):
    """With tasks_per_step, the data module draws each step's tasks: only their samples are read,
    each step trains exactly those tasks, and every task is drawn about equally often."""
    from umedpt.data.loading import TaskSubsetLoader, task_subset

    model, data = build(num_samples=16, batch_size=4, tasks_per_step=1, lr=1e-3)
    data.setup("fit")
    counted = {name: CountingDataset(ds) for name, ds in data.datasets["train"].items()}
    data.datasets["train"] = counted
    loader = data.train_dataloader()
    assert isinstance(loader, TaskSubsetLoader)
    record = RecordLosses()
    steps = 40  # 10 epochs of 4 steps
    trainer(tmp_path, max_steps=steps, callbacks=[record]).fit(model, data)
    names = model.task_names
    expected = [[names[i] for i in task_subset(4, 1, 0, step // 4, step % 4)] for step in range(steps)]
    assert [sorted(losses) for losses in record.losses] == expected
    drawn = {name: sum(name in step for step in expected) for name in names}
    assert min(drawn.values()) >= 3, drawn  # binomial(40, 1/4): every task is drawn
    # the loader that Lightning iterated read exactly the drawn batches (4 samples each)
    assert {name: ds.reads for name, ds in counted.items()} == {n: 4 * drawn[n] for n in names}


def test_task_subset_loader_rejects_bad_sizes():
    with pytest.raises(ValueError, match="tasks_per_step must be in 1..2"):
        from umedpt.data.loading import TaskSubsetLoader

        TaskSubsetLoader({"a": [1], "b": [2]}, tasks_per_step=3)
    with pytest.raises(ValueError, match="tasks_per_step must be >= 1"):
        MultiTaskDataModule(tasks=mixed_tasks(), tasks_per_step=0)


def test_recipe_config_builds_17_tasks_of_all_kinds():
    root = Path(__file__).parents[1] / "configs"
    cli = main(["-c", str(root / "umedpt.yaml")], run=False)
    assert len(cli.model.task_names) == 17
    assert {t.kind for t in cli.model.tasks.values()} == {
        "classification",
        "multilabel",
        "segmentation",
        "detection",
    }
    assert cli.model.encoder.config["name"] == "swin_tiny_patch4_window7_224"
    assert cli.model.encoder.config["img_size"] == 224
    assert cli.trainer.precision == default_precision("auto")  # set by device, not by the recipe
    quick = main(["-c", str(root / "umedpt.yaml"), "-c", str(root / "quick.yaml")], run=False)
    assert quick.model.task_names == cli.model.task_names
    assert quick.datamodule.dataset_defaults["image_size"] == 64
    # the data module draws each step's task, so that only its batch is loaded
    assert quick.model.hparams.tasks_per_step == quick.datamodule.tasks_per_step == 1


def test_same_seed_exports_bitwise_identical_encoder(tmp_path):
    """Same config and seed on the same machine: the exported weights are identical byte for byte."""
    exported = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = tmp_path / run
        main(["fit", "-c", str(CONF), "--seed_everything", str(seed), "--trainer.default_root_dir", str(root),
              "--trainer.enable_progress_bar", "false"])
        exported.append((root / "lightning_logs" / "version_0" / "encoder" / "model.safetensors").read_bytes())
    assert exported[0] == exported[1]
    assert exported[0] != exported[2]  # the seed matters: the check above can fail


def test_fit_writes_learning_curves_and_logs_smoothed_task_losses(tmp_path):
    cli = main(["fit", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path),
                "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
    run_dir = tmp_path / "lightning_logs" / "version_0"
    record = json.loads((run_dir / "learning_curves.json").read_text())
    names = {"xr_grade", "fl_objects", "ct_seg", "xr_det"}
    assert set(record["train_loss"]) == names
    steps = [step for step, _ in record["train_loss"]["xr_grade"]]
    assert steps == sorted(steps) and len(steps) == 4  # 2 steps per epoch, every task in every step
    assert [v["step"] for v in record["val"]] == [2, 4]  # validation after each epoch
    assert "val/ct_seg/dice" in record["val"][-1]["metrics"]
    png = (run_dir / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    logged = cli.trainer.callback_metrics
    assert "train/lr" in logged and all(f"train/{n}/loss_smooth" in logged for n in names)


def test_resumable_loader_continues_its_pass_from_its_state():
    """The state of a ResumableDataLoader part-way through a pass (what a checkpoint stores) makes a
    fresh loader serve exactly the rest of that pass, then the next passes as the original did."""
    from umedpt.data.loading import EpochShuffleSampler, ResumableDataLoader

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(list(range(20)), batch_size=4, sampler=EpochShuffleSampler(20, seed=3))

    original = loader()
    original.sampler.set_epoch(2)
    served = iter(original)
    first = [next(served).tolist() for _ in range(3)]
    state = original.state_dict()
    assert state == {"epoch": 2, "pass": 0, "batches": 3}
    rest = [b.tolist() for b in served] + [b.tolist() for b in original]  # the pass, then the next

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # as Lightning does before the resumed epoch's first batch
    again = [b.tolist() for b in resumed] + [b.tolist() for b in resumed]
    assert again == rest
    assert sorted(sum(first + rest[:2], [])) == list(range(20))  # one pass: every sample once
