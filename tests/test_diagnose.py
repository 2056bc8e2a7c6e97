"""Diagnostics during a fit (callbacks) and of checkpoints (``umedpt diagnose``)."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from tests.conftest import TINY_ENCODER, mixed_tasks
from umedpt import MultiTaskModule, SwinEncoder
from umedpt.cli import main
from umedpt.data import MultiTaskDataModule
from umedpt.diagnostic_callbacks import FisherSpectrumCallback, InterferenceCallback, measure
from umedpt.testing import quiet_trainer

DEFAULTS = {"image_size": 64, "num_samples": {"train": 16, "val": 4, "test": 4}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("diag")
    tasks = mixed_tasks(batch_size=4)[:3]  # classification, multi-label, segmentation
    torch.manual_seed(0)
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER), lr=1e-3, export_encoder=False)
    data = MultiTaskDataModule(tasks=tasks, dataset_defaults=DEFAULTS)
    untrained = copy.deepcopy(model)
    interference_cb = InterferenceCallback(steps=[0, 6], num_batches=2)
    fisher_cb = FisherSpectrumCallback(num_batches=2)
    on_val = InterferenceCallback(steps=[6], num_batches=1, split="val", dirname="diagnostics_val")
    trainer = quiet_trainer(
        max_steps=6, logger=CSVLogger(root, name="logs"), callbacks=[interference_cb, fisher_cb, on_val],
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"root": root, "trainer": trainer, "data": data, "untrained": untrained, "ckpt": ckpt,
            "interference": interference_cb, "fisher": fisher_cb, "on_val": on_val, "model": model}  # fmt: skip


def test_callbacks_measure_at_their_steps_and_phases_and_log(fitted):
    cb, fisher = fitted["interference"], fitted["fisher"]
    assert list(cb.results) == ["step_0", "step_6"]
    assert list(fisher.results) == ["initial", "early", "mid", "late"]
    assert [r["step"] for r in fisher.results.values()] == [0, 1, 3, 6]
    # step 0 is the untrained model, measured on the same seeded batches as an independent call
    expected = measure(fitted["untrained"], fitted["data"].datasets["train"], num_batches=2)
    assert sum(cb.results["step_0"]["gd"], []) == pytest.approx(sum(expected["gd"], []), rel=1e-6)
    assert cb.results["step_0"]["tug_of_war"] != cb.results["step_6"]["tug_of_war"]  # training moved it
    for r in fisher.results.values():
        assert all(0.0 <= v["rho"] <= 1.0 and v["se"] >= 0.0 for v in r["fisher"].values())
    out = Path(fitted["trainer"].log_dir) / "diagnostics"
    assert {p.name for p in out.iterdir()} >= {
        "interference.json", "interference_step_0.png", "interference_step_6.png", "fisher.json", "fisher_phases.png",
    }  # fmt: skip
    assert list(json.loads((out / "fisher.json").read_text())["results"]) == ["initial", "early", "mid", "late"]
    with (Path(fitted["trainer"].log_dir) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"diag/xr_grade/tug_of_war", "diag/statistics_score", "diag/fisher/all/se", "diag/fisher/ct_seg/rho"} <= logged


def test_a_callback_measures_on_the_split_it_is_given(fitted):
    expected = measure(fitted["model"], fitted["data"].datasets["val"], num_batches=1)
    assert sum(fitted["on_val"].results["step_6"]["gd"], []) == pytest.approx(sum(expected["gd"], []), rel=1e-6)
    assert fitted["on_val"].results["step_6"]["gd"] != fitted["interference"].results["step_6"]["gd"]


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="give steps or phases, not both"):
        InterferenceCallback(steps=[1], phases={"a": 0.5})
    with pytest.raises(ValueError, match="phase 'late' at 1.5; phases are fractions in"):
        FisherSpectrumCallback(phases={"late": 1.5})


def test_diagnose_command_writes_the_report_of_checkpoints(fitted, tmp_path, capsys):
    out = tmp_path / "report"
    config = tmp_path / "run.yaml"  # the tasks' data as training read it
    tasks = [t.to_dict() for t in fitted["data"].tasks]
    config.write_text(yaml.safe_dump({"model": {"tasks": tasks}, "data": {"dataset_defaults": DEFAULTS}}))
    args = ["diagnose", "-c", str(config), "--ckpt_path", str(fitted["ckpt"]), "--num_batches", "2"]
    assert main([*args, "--output", str(out)]) == 0
    report = json.loads((out / "diagnostics.json").read_text())
    (only,) = report["checkpoints"]
    assert only["step"] == 6 and only["tasks"] == ["xr_grade", "fl_objects", "ct_seg"]
    assert sum(only["gd"], []) == pytest.approx(sum(fitted["interference"].results["step_6"]["gd"], []), rel=1e-5)
    assert all(math.isfinite(v) for v in only["tug_of_war"])
    assert {p.name for p in out.iterdir()} == {"diagnostics.json", "diagnostics.md", "interference.png", "fisher_phases.png"}
    assert "| 6 | ct_seg |" in capsys.readouterr().out
    sketched = tmp_path / "sketched"
    assert main([*args, "--sketch_dim", "4096", "--output", str(sketched), "--tasks", "xr_grade", "ct_seg"]) == 0
    small = json.loads((sketched / "diagnostics.json").read_text())["checkpoints"][0]
    assert small["sketch_dim"] == 4096 and small["tasks"] == ["xr_grade", "ct_seg"]
    # without -c: the config.yaml the CLI saves in the checkpoint's run directory
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fitted["ckpt"], run / "checkpoints" / "last.ckpt")
    shutil.copy(config, run / "config.yaml")
    assert main(["diagnose", "--ckpt_path", str(run / "checkpoints" / "*.ckpt"), "--num_batches", "2"]) == 0
    again = json.loads((run / "diagnostics" / "diagnostics.json").read_text())["checkpoints"][0]
    assert again["gd"] == only["gd"]
    assert main(["diagnose", "--ckpt_path", str(tmp_path / "none.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_measure_sketches_the_gradients_only_when_they_would_not_fit(fitted, monkeypatch, capsys):
    import umedpt.diagnostic_callbacks as diag

    datasets = fitted["data"].datasets["val"]
    assert measure(fitted["model"], datasets, num_batches=1)["sketch_dim"] is None  # a tiny encoder: full
    monkeypatch.setattr(diag, "AUTO_SKETCH_BYTES", 1)
    monkeypatch.setattr(diag, "AUTO_SKETCH_DIM", 2048)
    sketched = measure(fitted["model"], datasets, num_batches=1)
    assert sketched["sketch_dim"] == 2048 and "keeping count sketches of 2048" in capsys.readouterr().err
    assert measure(fitted["model"], datasets, num_batches=1, sketch_dim=None)["sketch_dim"] is None
