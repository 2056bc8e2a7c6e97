"""What the commands print and refuse: step progress, compact tables, metrics files, predict
without a checkpoint, the optimiser flags that do not exist, precision by device."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from umedpt.cli import main
from umedpt.device import default_precision

CONF = Path(__file__).parent / "conf" / "tiny.yaml"
TASKS = {"xr_grade", "fl_objects", "ct_seg", "xr_det"}


def test_fit_progress_bar_counts_optimizer_steps(tmp_path, capsys):
    main(["fit", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.max_steps", "3", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step" in text and "3/3" in text, text[-2000:]
    assert "Epoch" not in text  # epochs mean little with max_steps and one task per step


def test_validate_prints_the_compact_table_and_writes_json_and_csv(tmp_path, capsys):
    cli = main(["validate", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "umedpt: val metrics per task" in out
    assert "DataLoader" not in out and "Validate metric" not in out  # no Lightning tables
    assert "Validation xr_det" in out  # the bar names the task
    text_lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(text_lines) <= 7, text_lines  # header, 4 task rows, the files written
    run_dir = Path(cli.trainer.log_dir)
    record = json.loads((run_dir / "metrics_val.json").read_text())
    assert record["split"] == "val" and record["stage"] == "validate"
    assert set(record["tasks"]) == TASKS
    assert record["tasks"]["xr_grade"]["kind"] == "classification"
    logged = cli.trainer.callback_metrics
    assert record["tasks"]["ct_seg"]["metrics"]["dice"] == pytest.approx(float(logged["val/ct_seg/dice"]))
    with (run_dir / "metrics_val.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == TASKS
    by_key = {(r["task"], r["metric"]): float(r["value"]) for r in rows}
    assert by_key[("xr_det", "map_50")] == pytest.approx(float(logged["val/xr_det/map_50"]), rel=1e-5, abs=1e-7)
    assert str(run_dir / "metrics_val.json") in out


def test_validate_verbose_brings_lightning_tables_back(tmp_path, capsys):
    main(["validate", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path), "--verbose", "true"])
    assert "DataLoader 0" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_fit_and_test_write_their_metrics_files(tmp_path, capsys):
    fitted = main(["fit", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.enable_progress_bar", "false"])
    fit_dir = Path(fitted.trainer.log_dir)
    record = json.loads((fit_dir / "metrics_val.json").read_text())
    assert record["stage"] == "fit" and record["step"] == fitted.trainer.global_step
    ckpt = sorted(fit_dir.glob("checkpoints/*.ckpt"))[-1]
    capsys.readouterr()
    tested = main(["test", "-c", str(CONF), "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "umedpt: test metrics per task" in out and "DataLoader" not in out
    record = json.loads((Path(tested.trainer.log_dir) / "metrics_test.json").read_text())
    assert set(record["tasks"]) == TASKS and record["ckpt_path"] == str(ckpt)


def test_predict_without_checkpoint_is_refused_unless_asked_for(tmp_path):
    with pytest.raises(SystemExit, match=r"no --ckpt_path given.*--untrained true"):
        main(["predict", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path)])
    assert not list(tmp_path.rglob("predictions"))  # nothing was written
    predicted = main(["predict", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path),
                      "--untrained", "true"])
    assert (Path(predicted.trainer.log_dir) / "predictions" / "xr_grade.pt").is_file()


@pytest.mark.parametrize("flag", ["--optimizer", "--lr_scheduler"])
def test_optimizer_flags_are_not_offered(flag, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(CONF), flag, "torch.optim.SGD"])
    assert flag in capsys.readouterr().err  # named as an unrecognised argument
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert flag not in capsys.readouterr().out


def test_precision_follows_the_device_unless_set(tmp_path, monkeypatch):
    config = "\n".join(line for line in CONF.read_text().splitlines() if "precision" not in line)
    (tmp_path / "noprec.yaml").write_text(config)  # accelerator: cpu, no precision
    cli = main(["-c", str(tmp_path / "noprec.yaml")], run=False)
    assert cli.trainer.precision == "32-true"
    cli = main(["-c", str(tmp_path / "noprec.yaml"), "--trainer.precision", "bf16-mixed"], run=False)
    assert cli.trainer.precision == "bf16-mixed"  # the user's choice wins

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_precision("auto") == "bf16-mixed"
    assert default_precision("gpu") == "bf16-mixed"
    assert default_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_precision("cuda") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("auto") == "32-true"


def test_top_level_help_lists_every_command(capsys):
    from umedpt.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    # help text is wrapped, also after the hyphen of a name such as mllm-evaluate
    out = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))
    for name in ("fit", "validate", "test", "predict", *COMMANDS):
        assert f"`{name}`" in out or f"{name}," in out or f"{name}}}" in out, name
    assert "replaces Lightning's own script" in out


def test_option_typo_gives_one_line_with_the_close_name(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(CONF), "--model.lrr", "1e-3"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err  # the error and where help is; no usage dump
    assert "model (umedpt.MultiTaskModule): option 'lrr' is not accepted (did you mean --model.lr?)" in err[0]
    assert "lightning fit --help" in err[1] or "--help" in err[1]


def test_trainer_command_without_config_says_to_pass_one():
    with pytest.raises(SystemExit, match=r"pass a config, e.g. `lightning fit -c configs/umedpt.yaml"):
        main(["fit"])


def test_console_errors_are_one_line_unless_debugging(tmp_path, monkeypatch, capsys):
    from umedpt.cli import run_cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(CONF.read_text().replace("num_classes: 3", "num_classes: 7", 1))
    monkeypatch.setattr("sys.argv", ["lightning", "fit", "-c", str(bad), "--trainer.default_root_dir", str(tmp_path)])
    monkeypatch.delenv("UMEDPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "umedpt: error (ValueError): task 'xr_grade': num_classes=7 but its train dataset has 3 classes" in err
    assert "Traceback" not in err
    monkeypatch.setenv("UMEDPT_DEBUG", "1")
    with pytest.raises(ValueError, match="num_classes=7"):
        run_cli()


def _fit(root: Path, *extra: str):
    return main(["fit", "-c", str(CONF), "--trainer.default_root_dir", str(root),
                 "--trainer.enable_progress_bar", "false", *extra])


def test_commands_from_a_checkpoint_write_into_its_run(tmp_path):
    fitted = _fit(tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    assert Path(fitted.trainer.log_dir) == run
    ckpt = sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    tested = main(["test", "-c", str(CONF), "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.enable_progress_bar", "false"])
    assert Path(tested.trainer.log_dir) == run and (run / "metrics_test.json").is_file()
    predicted = main(["predict", "-c", str(CONF), "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path),
                      "--trainer.enable_progress_bar", "false"])
    assert Path(predicted.trainer.log_dir) == run and (run / "predictions" / "xr_grade.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # no new folders


def test_fit_ckpt_path_last_resumes_the_newest_run_in_place(tmp_path, capsys):
    _fit(tmp_path)
    resumed = _fit(tmp_path, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert resumed.trainer.global_step == 4  # 2 steps per epoch: it went on from step 2
    run = tmp_path / "lightning_logs" / "version_0"
    assert Path(resumed.trainer.log_dir) == run
    assert "umedpt: --ckpt_path last is " + str(run / "checkpoints") in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]


def test_fit_ckpt_path_last_without_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no checkpoint in .*lightning_logs/version_\*/checkpoints/ - nothing to resume"):
        _fit(tmp_path, "--ckpt_path", "last")
    assert not (tmp_path / "lightning_logs").exists() or not list((tmp_path / "lightning_logs").rglob("*.ckpt"))


def test_checkpoints_are_written_atomically_beside_their_target(tmp_path, monkeypatch):
    from umedpt.runs import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)
    good = target.read_bytes()

    def killed_midway(obj, f, *args, **kwargs):
        f.write(good[: len(good) // 3])  # part of the file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    assert target.read_bytes() == good  # the old checkpoint is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary left
    assert int(io.load_checkpoint(target, weights_only=True)["step"]) == 1
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(RuntimeError, match=rf"checkpoint {broken} cannot be read: .*truncated"):
        io.load_checkpoint(broken, weights_only=True)  # the path Trainer.fit(ckpt_path=...) takes


def test_a_truncated_checkpoint_is_named_in_the_error(tmp_path):
    fitted = _fit(tmp_path)
    assert type(fitted.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    ckpt = sorted(Path(fitted.trainer.log_dir).glob("checkpoints/*.ckpt"))[-1]
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(RuntimeError, match=rf"checkpoint {ckpt} cannot be read: .*truncated"):
        _fit(tmp_path, "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2")


def test_a_checkpoint_of_another_model_is_refused_naming_the_fields(tmp_path):
    fitted = _fit(tmp_path)
    ckpt = sorted(Path(fitted.trainer.log_dir).glob("checkpoints/*.ckpt"))[-1]
    wider = ["--model.encoder.init_args.model_kwargs", "{embed_dim: 32, depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8], window_size: 4, drop_path_rate: 0.0}"]
    for ckpt_arg in (str(ckpt), "last"):
        with pytest.raises(ValueError, match=r"holds another model than the config: model.encoder model_kwargs.embed_dim: config 32, checkpoint 16"):
            _fit(tmp_path, *wider, "--ckpt_path", ckpt_arg, "--trainer.max_epochs", "2")
    other = tmp_path / "other.yaml"
    other.write_text(CONF.read_text().replace("num_classes: 3", "num_classes: 4", 1).replace("name: fl_objects", "name: fl_spots"))
    with pytest.raises(ValueError, match=r"model.tasks 'xr_grade' num_classes: config 4, checkpoint 3") as info:
        main(["test", "-c", str(other), "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path)])
    assert "'fl_spots' is in the config, not in the checkpoint" in str(info.value)
    assert "'fl_objects' is in the checkpoint, not in the config" in str(info.value)
    # asked for: the checkpoint's model configuration is used
    resumed = _fit(tmp_path, *wider, "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2", "--use_checkpoint_model", "true")
    assert resumed.model.encoder.config["model_kwargs"]["embed_dim"] == 16 and resumed.trainer.global_step == 4



def test_a_fit_s_console_shows_no_lightning_internal_warnings(tmp_path):
    """What a user sees of a fit with periodic checkpoints: not Lightning's page of example code
    about manually optimised checkpoints, its deprecated-pytree notice or its cloud-logging tip."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "umedpt", "fit", "-c", str(CONF), "--trainer.default_root_dir", str(tmp_path),
         "--checkpoint_every", "1", "--trainer.max_steps", "2", "--trainer.max_epochs", "-1",
         "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
    )
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    console = proc.stdout + proc.stderr
    assert "manual optimization" not in console and "LeafSpec" not in console, console[-3000:]
    assert "Tip:" not in console and "GPU available" in console  # Lightning's other lines stay
