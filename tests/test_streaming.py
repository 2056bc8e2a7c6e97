"""Streaming task data (litdata chunks): stored cases equal the source's, `umedpt data optimize`
resumes and writes a config that trains, `data check` reads the chunks, and a streamed fit
resumed mid-epoch is bitwise the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("litdata")

from tests.conftest import TINY_ENCODER, mixed_tasks  # noqa: E402
from umedpt import MultiTaskModule, SwinEncoder  # noqa: E402
from umedpt.commands.data import main as data_main  # noqa: E402
from umedpt.data import MultiTaskDataModule  # noqa: E402
from umedpt.data.readers import ImageFolderDataset  # noqa: E402
from umedpt.data.streaming import META_FILE, StreamingTaskDataset, optimize_task  # noqa: E402
from umedpt.data.synthetic import SyntheticTaskDataset  # noqa: E402
from umedpt.tasks import Task  # noqa: E402
from umedpt.testing import quiet_trainer  # noqa: E402

CONF = Path(__file__).parent / "conf" / "tiny.yaml"
#: (family, kind) of each synthetic task stored below
FAMILIES = [("grade", "classification"), ("objects", "multilabel"), ("segmentation", "segmentation"),
            ("detection", "detection")]  # fmt: skip
#: the largest error of uint16 storage in a standardised image: half a step of 1/65535, / std 0.25
UINT16_ERROR = 0.5 / 65535 / 0.25 * 1.001


def synthetic(family: str, split: str, n: int = 6) -> SyntheticTaskDataset:
    return SyntheticTaskDataset("ct", family, split=split, num_samples=n, image_size=64)


def stored_task(tmp_path: Path, family: str, kind: str, pixels: str = "auto", splits=("val",)) -> StreamingTaskDataset:
    source = synthetic(family, "val")
    task = Task(name=f"ct_{family}", kind=kind, num_classes=source.num_classes,
                data={"class_path": "umedpt.data.synthetic.SyntheticTaskDataset", "init_args": {"style": "ct", "family": family}})  # fmt: skip
    optimize_task(task, lambda split: synthetic(family, split), tmp_path, splits, pixels=pixels, log=lambda _: None)
    return StreamingTaskDataset(str(tmp_path / task.name), split="val", image_size=64)


@pytest.mark.parametrize(("family", "kind"), FAMILIES)
def test_streamed_cases_equal_the_source_cases(tmp_path, family, kind):
    """float32 pixels: every case (image and targets) bitwise the source's; the default (uint16 for
    these float scenes) within half a quantisation step, targets bitwise."""
    exact = stored_task(tmp_path / "f32", family, kind, pixels="float32")
    packed = stored_task(tmp_path / "auto", family, kind)
    source = synthetic(family, "val")
    assert len(exact) == len(packed) == len(source) == 6
    assert (exact.kind, exact.num_classes, exact.class_names) == (kind, source.num_classes, source.class_names)
    for i in range(len(source)):
        want, a, b = source[i], exact[i], packed[i]
        assert set(a) == set(b) == set(want)
        for key in want:
            if key == "image":
                assert torch.equal(a[key], want[key]), f"sample {i}"
                error = float((b[key] - want[key]).abs().max())
                assert 0 < error <= UINT16_ERROR, error
            else:
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(want[key])), (i, key)
                assert torch.equal(torch.as_tensor(b[key]), torch.as_tensor(want[key])), (i, key)
    assert np.asarray(packed.stored_item(0)["image"]).dtype == np.uint16


def test_eight_bit_files_are_stored_as_uint8_and_read_back_exactly(tmp_path):
    """Real files that scikit-image ships (RGB JPEG, grey PNG): stored uint8 (no loss), grey kept
    grey; the streamed cases equal the reader's, at any image size chosen when reading."""
    skimage = pytest.importorskip("skimage")
    data = Path(skimage.__file__).parent / "data"
    root = tmp_path / "photos"
    for split, label, name in [("train", "fundus", "retina.jpg"), ("train", "grey", "camera.png"),
                               ("val", "fundus", "retina.jpg"), ("val", "grey", "camera.png")]:  # fmt: skip
        (root / split / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / name, root / split / label / name)
    task = Task(name="photos", kind="classification", num_classes=2, batch_size=1,
                data={"class_path": "umedpt.data.readers.ImageFolderDataset", "init_args": {"root": str(root)}})  # fmt: skip
    optimize_task(task, lambda split: ImageFolderDataset(str(root), split=split, image_size=48), tmp_path / "out",
                  ("val",), log=lambda _: None)  # fmt: skip
    for size in (48, 96):
        streamed = StreamingTaskDataset(str(tmp_path / "out" / "photos"), split="val", image_size=size)
        source = ImageFolderDataset(str(root), split="val", image_size=size)
        stored = [np.asarray(streamed.stored_item(i)["image"]) for i in range(2)]
        assert [s.dtype for s in stored] == [np.uint8, np.uint8]
        assert sorted(s.shape[-1] for s in stored) == [1, 3]
        for i in range(2):
            assert torch.equal(streamed[i]["image"], source[i]["image"]) and streamed[i]["label"] == source[i]["label"]


def test_training_augmentation_depends_only_on_the_seed_the_epoch_and_the_sample(tmp_path):
    """Two dataset objects (as two workers or ranks would hold) draw the same augmentation for
    the same (seed, epoch, sample), another one in another epoch or under another seed; the
    evaluation split is not augmented."""
    task = Task(name="ct_seg", kind="segmentation", num_classes=5,
                data={"class_path": "umedpt.data.synthetic.SyntheticTaskDataset", "init_args": {"style": "ct", "family": "segmentation"}})  # fmt: skip
    optimize_task(task, lambda split: synthetic("segmentation", split), tmp_path, ("train",), log=lambda _: None)

    def cases(epoch: int, seed: int = 7) -> list[dict[str, Any]]:
        dataset = StreamingTaskDataset(str(tmp_path / "ct_seg"), split="train", image_size=64, transform="ct")
        dataset.augment_seed = seed
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(3)]

    first, again, later, other = cases(1), cases(1), cases(2), cases(1, seed=8)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, later, strict=True))
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other, strict=True))
    plain = synthetic("segmentation", "train")
    assert any(not torch.equal(a["image"], plain[i]["image"]) for i, a in enumerate(first))  # augmented


def run_data(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = data_main(list(args))
    return code, capsys.readouterr().out


def test_optimize_command_writes_every_task_skips_finished_splits_and_redoes_unfinished_ones(tmp_path, capsys):
    out = tmp_path / "stream"
    code, text = run_data(capsys, "optimize", "-c", str(CONF), "--out", str(out), "--splits", "train", "val")
    assert code == 0, text
    config = yaml.safe_load((out / "streaming.yaml").read_text())
    tasks = config["model"]["tasks"]
    assert [t["name"] for t in tasks] == ["xr_grade", "fl_objects", "ct_seg", "xr_det"]
    for spec in tasks:
        assert spec["data"] == {"class_path": "umedpt.data.streaming.StreamingTaskDataset",
                                "init_args": {"input_dir": str(out / spec["name"])}}  # fmt: skip
        meta = json.loads((out / spec["name"] / META_FILE).read_text())
        assert {s: v["samples"] for s, v in meta["splits"].items()} == {"train": 8, "val": 8}
        assert meta["kind"] == spec["kind"] and meta["num_classes"] == spec["num_classes"]
    assert tasks[2]["head_args"] == {"decoder_channels": 32}  # the rest of each spec kept

    # a split recorded as finished is skipped; one stopped after litdata's index (before
    # umedpt.json) is recorded as it is; one stopped before its index is written again
    for name in ("ct_seg", "xr_det"):
        meta_path = out / name / META_FILE
        meta = json.loads(meta_path.read_text())
        del meta["splits"]["val"]
        meta_path.write_text(json.dumps(meta))
    (out / "xr_det" / "val" / "index.json").unlink()
    stamp = (out / "ct_seg" / "val" / "index.json").stat().st_mtime_ns
    code, text = run_data(capsys, "optimize", "-c", str(CONF), "--out", str(out), "--splits", "train", "val")
    assert code == 0, text
    assert text.count("already optimized, skipped") == 6
    assert "ct_seg val: 8 samples found complete" in text and "xr_det val: optimizing 8 samples" in text
    assert (out / "ct_seg" / "val" / "index.json").stat().st_mtime_ns == stamp
    for name in ("ct_seg", "xr_det"):
        assert json.loads((out / name / META_FILE).read_text())["splits"]["val"]["samples"] == 8
    assert len(StreamingTaskDataset(str(out / "xr_det"), split="val")) == 8

    # data check reads the chunks: counts, class balance, stored sizes
    code, text = run_data(capsys, "check", "-c", str(CONF), "-c", str(out / "streaming.yaml"), "--splits", "train", "val", "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"], text
    by_name = {t["name"]: t for t in report["tasks"]}
    grade = by_name["xr_grade"]["splits"]["train"]
    assert grade["count"] == 8 and grade["inspected"] and sum(grade["class_counts"]) == 8
    assert grade["sizes"] == {"64x64": 8} and grade["dtypes"] == {"uint16": 8}


def test_data_check_finds_bad_stored_targets_and_a_missing_split(tmp_path, capsys):
    class Wrong(SyntheticTaskDataset):
        def stored(self, i: int) -> dict[str, Any]:
            out = super().stored(i)
            if i == 2:
                out["label"] = 7  # not a class of 3
            return out

    task = Task(name="xr_grade", kind="classification", num_classes=3, batch_size=2,
                data={"class_path": "umedpt.data.synthetic.SyntheticTaskDataset", "init_args": {"style": "radiograph", "family": "grade"}})  # fmt: skip
    optimize_task(task, lambda split: Wrong("radiograph", "grade", split=split, num_samples=4, image_size=64),
                  tmp_path, ("train",), log=lambda _: None)  # fmt: skip
    capsys.readouterr()  # litdata's own messages
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"tasks": [{
        "name": "xr_grade", "kind": "classification", "num_classes": 3, "batch_size": 2,
        "data": {"class_path": "umedpt.data.streaming.StreamingTaskDataset", "init_args": {"input_dir": str(tmp_path / "xr_grade")}},
    }]}}))  # fmt: skip
    code, text = run_data(capsys, "check", "-c", str(config), "--json")
    report = json.loads(text)
    assert code == 1
    problems = [p["message"] for p in report["tasks"][0]["problems"]]
    assert any("7 is out of range 0..2" in m for m in problems), problems
    assert any("split 'val' was not optimized" in m and "--splits val" in m for m in problems), problems


def streamed_modules(root: Path, tasks_per_step: int | None, init_seed: int = 0, workers: int = 0,
                     **kw: Any) -> tuple[MultiTaskModule, MultiTaskDataModule]:  # fmt: skip
    torch.manual_seed(init_seed)
    tasks = mixed_tasks(batch_size=4)
    for task in tasks:
        task.data = {"class_path": "umedpt.data.streaming.StreamingTaskDataset", "init_args": {"input_dir": str(root / task.name)}}
    encoder = {**TINY_ENCODER, "model_kwargs": {**TINY_ENCODER["model_kwargs"], "drop_path_rate": 0.2}}
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**encoder), export_encoder=False, tasks_per_step=tasks_per_step, **kw)
    data = MultiTaskDataModule(tasks=tasks, num_workers=workers, dataset_defaults={"image_size": 64, "transform": "ct"},
                               tasks_per_step=tasks_per_step)  # fmt: skip
    return model, data


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config's four tasks optimized; xr_grade with 8 training samples (2 batches: it
    cycles within each 5-step epoch of the 20-sample tasks)."""
    root = tmp_path_factory.mktemp("streamed")
    for task in mixed_tasks(batch_size=4):
        args = task.data["init_args"]
        counts = {"train": 8 if task.name == "xr_grade" else 20, "val": 4}
        optimize_task(task, lambda split, a=args, c=counts: SyntheticTaskDataset(**a, split=split, num_samples=c[split], image_size=64),
                      root, ("train", "val"), log=lambda _: None)  # fmt: skip
    return root


class StopAfterStep:
    """Save a checkpoint after optimizer step ``step`` (mid-epoch) and stop."""

    def __new__(cls, step: int, path: Path) -> Any:
        from lightning import Callback

        class _Stop(Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if trainer.global_step == step:
                    trainer.save_checkpoint(path)
                    trainer.should_stop = True

        return _Stop()


@pytest.mark.parametrize(("tasks_per_step", "workers", "stop"), [(None, 0, 7), (2, 0, 7), (2, 2, 7), (None, 0, 5), (2, 0, 10)])
def test_streamed_fit_resumed_mid_epoch_equals_the_uninterrupted_fit(tmp_path, streamed, tasks_per_step, workers, stop):
    """litdata loaders' positions travel in the checkpoint: resumed at step 7 of 13 (mid-epoch,
    after a short task cycled) or at the end of an epoch (steps 5 and 10: the short task is
    part-way through a pass, the next epoch starts a new one), the weights equal the
    uninterrupted run's bit for bit, with augmentation and stochastic depth on, in the main
    process or with 2 workers per task."""
    full, data = streamed_modules(streamed, tasks_per_step, workers=workers)
    quiet_trainer(default_root_dir=tmp_path / "full", max_steps=13).fit(full, data)
    ckpt = tmp_path / "mid.ckpt"
    first, data = streamed_modules(streamed, tasks_per_step, workers=workers)
    quiet_trainer(default_root_dir=tmp_path / "first", max_steps=13, callbacks=[StopAfterStep(stop, ckpt)]).fit(first, data)
    assert first.global_step == stop
    states = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    positions = {s["dataset"]["input_dir_path"].split("/")[-2]: s["num_samples_yielded"] for s in states if "dataset" in s}
    assert len(positions) == 4 and all("lightning_epoch" in s for s in states if "dataset" in s), states
    if stop == 5:
        assert 0 < positions["xr_grade"] < 8, positions  # the short task part-way through a pass at the epoch's end

    torch.manual_seed(999)
    resumed, data = streamed_modules(streamed, tasks_per_step, init_seed=123, workers=workers)
    quiet_trainer(default_root_dir=tmp_path / "resumed", max_steps=13).fit(resumed, data, ckpt_path=ckpt)
    assert resumed.global_step == full.global_step == 13
    want, got = full.state_dict(), resumed.state_dict()
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key}: max |diff| {(got[key] - value).abs().max()}"
    assert not torch.equal(first.state_dict()["encoder.model.patch_embed.proj.weight"], want["encoder.model.patch_embed.proj.weight"])


def test_losses_fall_on_streamed_data(tmp_path, streamed):
    model, data = streamed_modules(streamed, None, lr=2e-3, warmup_steps=2)
    losses: list[float] = []
    from lightning import Callback

    class Record(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    quiet_trainer(default_root_dir=tmp_path, max_steps=60, log_every_n_steps=1, callbacks=[Record()]).fit(model, data)
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_killed_streamed_fit_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """The reliability test on streamed data: ``umedpt data optimize`` the tiny config, SIGKILL a
    ``umedpt fit`` on it after its first periodic checkpoint (mid-epoch, 2 of 4 tasks per step),
    resume with ``--ckpt_path last``: the final weights and the exported encoder equal those of
    an uninterrupted run bit for bit."""
    import os
    import subprocess
    import sys

    from tests.test_train import KILL_CONFIG, assert_killed_fit_resumes_exactly

    out = tmp_path / "stream"
    override = tmp_path / "kill.yaml"
    override.write_text(KILL_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    made = subprocess.run([sys.executable, "-m", "umedpt", "data", "optimize", "-c", str(CONF), "-c", str(override),
                           "--out", str(out), "--splits", "train", "val"], env=env, capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]

    def command(root: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "umedpt", "fit", "-c", str(CONF), "-c", str(override), "-c", str(out / "streaming.yaml"),
                "--checkpoint_every", "3", "--trainer.default_root_dir", str(root), *extra]  # fmt: skip

    assert_killed_fit_resumes_exactly(tmp_path, command, env)


def test_a_folder_not_written_by_optimize_is_refused_with_the_command_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"umedpt.json not found: .* is not a task folder written by `umedpt data optimize`"):
        StreamingTaskDataset(str(tmp_path / "nothing"), split="train")
    data = MultiTaskDataModule(tasks=[Task(name="t", kind="classification", num_classes=2, data={
        "class_path": "umedpt.data.streaming.StreamingTaskDataset", "init_args": {"input_dir": str(tmp_path / "nothing")}})])  # fmt: skip
    with pytest.raises(Exception, match=r"task 't' \(train split\): .*umedpt.json not found") as info:
        data.setup("fit")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_stored_targets_keep_their_values_in_the_smallest_type():
    from umedpt.data.streaming import encode_sample

    image = np.zeros((4, 4, 1), np.float32)
    mask = np.array([[0, 1], [255, 2]])
    assert encode_sample({"image": image, "mask": mask}, 0)["mask"].dtype == np.uint8
    wide = np.array([[0, 300], [65535, 2]])
    assert encode_sample({"image": image, "mask": wide}, 0)["mask"].dtype == np.uint16
    assert np.array_equal(encode_sample({"image": image, "mask": wide * 2}, 0)["mask"], wide * 2)
    empty = encode_sample({"image": image, "boxes": None, "box_labels": None}, 3)
    assert empty["boxes"].shape == (0, 4) and empty["box_labels"].shape == (0,) and empty["index"] == 3
    assert encode_sample({"image": np.full((2, 2, 3), 0.5, np.float32)}, 0)["image"].dtype == np.uint16
    assert encode_sample({"image": np.full((2, 2, 3), 128 / 255, np.float32)}, 0)["image"].dtype == np.uint8


def test_a_changed_task_is_refused_unless_overwritten(tmp_path):
    task = Task(name="xr_grade", kind="classification", num_classes=3,
                data={"class_path": "umedpt.data.synthetic.SyntheticTaskDataset", "init_args": {"style": "radiograph", "family": "grade"}})  # fmt: skip

    def dataset(channels: int):
        return lambda split: SyntheticTaskDataset("radiograph", "grade", split=split, num_samples=4, image_size=32, channels=channels)

    optimize_task(task, dataset(3), tmp_path, ("train", "val"), log=lambda _: None)
    with pytest.raises(ValueError, match=r"no longer matches .*channels: stored 3, now 1.*--overwrite"):
        optimize_task(task, dataset(1), tmp_path, ("test",), log=lambda _: None)
    meta = optimize_task(task, dataset(1), tmp_path, ("val",), overwrite=True, log=lambda _: None)
    assert meta["channels"] == 1 and sorted(meta["splits"]) == ["val"]
    assert not (tmp_path / "xr_grade" / "train").exists()  # written as 3 channels: removed
    case = StreamingTaskDataset(str(tmp_path / "xr_grade"), split="val", image_size=32)[0]
    assert case["image"].shape == (1, 32, 32)


def test_streaming_yaml_keeps_reading_options_and_earlier_tasks(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    spec = yaml.safe_load(CONF.read_text())
    spec["model"]["tasks"][0]["data"]["init_args"]["image_size"] = 48
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "stream"
    assert data_main(["optimize", "-c", str(config), "--out", str(out), "--tasks", "xr_grade", "--splits", "val"]) == 0
    assert "['fl_objects', 'ct_seg', 'xr_det'] not optimized" in capsys.readouterr().out
    tasks = {t["name"]: t for t in yaml.safe_load((out / "streaming.yaml").read_text())["model"]["tasks"]}
    assert tasks["xr_grade"]["data"]["init_args"] == {"input_dir": str(out / "xr_grade"), "image_size": 48}
    assert tasks["ct_seg"]["data"]["class_path"] == "umedpt.data.synthetic.SyntheticTaskDataset"
    # a later run for another task keeps the first one streamed
    assert data_main(["optimize", "-c", str(config), "--out", str(out), "--tasks", "ct_seg", "--splits", "val"]) == 0
    tasks = {t["name"]: t for t in yaml.safe_load((out / "streaming.yaml").read_text())["model"]["tasks"]}
    assert [n for n, t in tasks.items() if t["data"]["class_path"].endswith("StreamingTaskDataset")] == ["xr_grade", "ct_seg"]


def test_optimize_reports_a_task_whose_data_is_wrong_and_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    spec = yaml.safe_load(CONF.read_text())
    spec["model"]["tasks"][0]["num_classes"] = 5  # the radiograph grade has 3
    config.write_text(yaml.safe_dump(spec))
    assert data_main(["optimize", "-c", str(config), "--out", str(tmp_path / "s"), "--tasks", "xr_grade"]) == 2
    assert "task 'xr_grade': num_classes=5 but its train dataset has 3 classes" in capsys.readouterr().err


def test_a_folder_of_another_layout_version_is_refused_by_reader_and_writer(tmp_path):
    task = Task(name="xr_grade", kind="classification", num_classes=3,
                data={"class_path": "umedpt.data.synthetic.SyntheticTaskDataset", "init_args": {"style": "radiograph", "family": "grade"}})  # fmt: skip
    source = lambda split: SyntheticTaskDataset("radiograph", "grade", split=split, num_samples=4, image_size=32)  # noqa: E731
    optimize_task(task, source, tmp_path, ("val",), log=lambda _: None)
    meta_path = tmp_path / "xr_grade" / META_FILE
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format": 99}))
    with pytest.raises(ValueError, match=r"umedpt.json: written in layout 99"):
        StreamingTaskDataset(str(tmp_path / "xr_grade"), split="val")
    with pytest.raises(ValueError, match=r"written in layout 99.*another --out"):
        optimize_task(task, source, tmp_path, ("train",), log=lambda _: None)
