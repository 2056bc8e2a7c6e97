"""Transfer evaluation: linear probes, stratified fractions, the feature cache, bad input, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY_ENCODER
from umedpt import SwinEncoder, save_encoder
from umedpt.data.synthetic import SyntheticTaskDataset
from umedpt.probe import (
    FeatureCache,
    ProbeError,
    ProbeSettings,
    cached_features,
    evaluate,
    fit_linear_probe,
    load_encoders,
    main,
    stratified_subset,
    weights_hash,
)
from umedpt.probe.features import check_channels
from umedpt.probe.report import mean_std
from umedpt.probe.subsets import check_labels
from umedpt.tasks import Task

SYNTHETIC = "umedpt.data.synthetic.SyntheticTaskDataset"


def blobs(
    n: int, classes: int, dim: int = 8, spread: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around ``classes`` well separated centres, and their classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = 4.0 * np.eye(classes, dim)
    return (centres[y] + spread * rng.standard_normal((n, dim))).astype(np.float32), y


# ----------------------------------------------------------------------------------------------
# linear probes


def test_linear_probe_on_separable_features_is_perfect():
    x, y = blobs(240, 4)
    probe = fit_linear_probe(x[:80], y[:80], x[80:160], y[80:160])
    metrics = evaluate(probe, x[160:], y[160:])
    assert metrics["accuracy"] == 1.0 and metrics["balanced_accuracy"] == 1.0 and metrics["f1"] == 1.0


def test_linear_probe_on_noise_is_at_chance():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((900, 8)), rng.integers(0, 3, 900)
    probe = fit_linear_probe(x[:300], y[:300], x[300:600], y[300:600])
    assert abs(evaluate(probe, x[600:], y[600:])["accuracy"] - 1 / 3) < 0.08


def test_multilabel_probe_on_separable_labels():
    rng = np.random.default_rng(2)
    y = (rng.random((300, 3)) < 0.4).astype(np.float32)
    x = np.hstack([4.0 * y, rng.standard_normal((300, 5))]).astype(np.float32)
    probe = fit_linear_probe(x[:100], y[:100], x[100:200], y[100:200])
    metrics = evaluate(probe, x[200:], y[200:])
    assert metrics["auroc"] > 0.99 and metrics["f1"] > 0.95


def test_regularisation_is_the_best_on_validation():
    x, y = blobs(300, 3, spread=2.5, seed=3)  # overlapping classes: C matters
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    chosen = fit_linear_probe(x[:60], y[:60], x[60:180], y[60:180], grid)
    scores = [fit_linear_probe(x[:60], y[:60], x[60:180], y[60:180], [c]).val_score for c in grid]
    assert chosen.val_score == pytest.approx(max(scores), abs=1e-9)
    assert chosen.c == grid[int(np.argmax(scores))]


def test_mean_std_uses_the_sample_deviation():
    assert mean_std([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "n": 3}
    assert mean_std([0.4])["std"] == 0.0


# ----------------------------------------------------------------------------------------------
# fractions


def test_stratified_subset_keeps_every_class_and_the_shares():
    labels = np.repeat([0, 1, 2, 3], [900, 80, 15, 5])
    one = stratified_subset(labels, 0.01, seed=0)
    assert len(one) == 10 and (np.bincount(labels[one], minlength=4) >= 1).all()
    half = stratified_subset(labels, 0.5, seed=0)
    assert len(np.unique(half)) == 500
    assert np.abs(np.bincount(labels[half]) - [450, 40, 7.5, 2.5]).max() <= 0.5
    np.testing.assert_array_equal(
        stratified_subset(labels, 0.05, seed=4), stratified_subset(labels, 0.05, seed=4)
    )
    assert not np.array_equal(
        stratified_subset(labels, 0.05, seed=4), stratified_subset(labels, 0.05, seed=5)
    )
    np.testing.assert_array_equal(stratified_subset(labels, 1.0, seed=9), np.arange(1000))


def test_fraction_that_empties_a_class_is_an_error():
    labels = np.arange(200) % 4
    with pytest.raises(
        ProbeError, match=r"fraction 0.01 keeps 2 of 200 training samples, fewer than the 4 classes"
    ):
        stratified_subset(labels, 0.01, seed=0)
    with pytest.raises(ProbeError, match=r"fractions must be in \(0, 1\], got 1.5"):
        stratified_subset(labels, 1.5, seed=0)


def test_multilabel_subset_has_a_positive_and_a_negative_per_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 4)) < [0.5, 0.3, 0.02, 0.98]).astype(np.float32)
    for seed in range(5):
        chosen = labels[stratified_subset(labels, 0.02, seed)]
        assert len(chosen) == 10
        assert (chosen.max(0) == 1).all() and (chosen.min(0) == 0).all()


def test_single_class_and_missing_class_are_errors():
    with pytest.raises(ProbeError, match=r"single class \('a'\)"):
        check_labels(np.zeros(10, dtype=int), 2, "t", ["a", "b"])
    with pytest.raises(ProbeError, match=r"classes \['c'\] have no sample in the train split"):
        check_labels(np.arange(10) % 2, 3, "t", ["a", "b", "c"])
    task = Task(name="one", kind="classification", num_classes=1, data={"class_path": SYNTHETIC})
    with pytest.raises(ProbeError, match=r"task 'one' has 1 class; a probe needs at least 2 classes"):
        ProbeSettings(encoders={"e": "random"}, tasks=[task])


# ----------------------------------------------------------------------------------------------
# encoders and features


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(5)
    return save_encoder(SwinEncoder(**TINY_ENCODER), tmp_path_factory.mktemp("enc") / "encoder")


def test_unknown_encoder_path_is_an_error(tmp_path):
    missing = tmp_path / "nowhere" / "encoder"
    with pytest.raises(ProbeError, match=rf"encoder 'pre': {missing} does not exist"):
        load_encoders({"pre": str(missing)})
    with pytest.raises(ProbeError, match=r"encoder 'pre': no file or folder matches"):
        load_encoders({"pre": str(tmp_path / "version_*" / "encoder")})
    with pytest.raises(ProbeError, match=r"'random' takes the config of another encoder"):
        load_encoders({"r": "random"})


def test_random_encoder_has_the_config_of_the_other(exported):
    encoders = load_encoders({"pre": str(exported), "random": "random"})
    assert encoders["random"].config == encoders["pre"].config
    assert weights_hash(encoders["random"]) != weights_hash(encoders["pre"])
    again = load_encoders({"pre": str(exported), "random": "random"})
    assert weights_hash(again["random"]) == weights_hash(encoders["random"])


def test_channel_mismatch_is_an_error():
    gray = SwinEncoder(**{**TINY_ENCODER, "in_chans": 1})
    check_channels({"gray": gray}, "t", 1)
    with pytest.raises(
        ProbeError, match=r"encoder 'gray' takes 1-channel images but task 't' gives 3-channel"
    ):
        check_channels({"gray": gray}, "t", 3)
    check_channels({"rgb": SwinEncoder(**TINY_ENCODER)}, "t", 1)  # gray input is repeated


def test_cache_hit_does_not_extract_again(exported, tmp_path, monkeypatch):
    encoders = load_encoders({"pre": str(exported), "random": "random"})
    hashes = {n: weights_hash(e) for n, e in encoders.items()}
    calls: list[int] = []
    embed = SwinEncoder.embed
    monkeypatch.setattr(SwinEncoder, "embed", lambda self, x: calls.append(len(x)) or embed(self, x))
    dataset = SyntheticTaskDataset("ct", "count_bin", num_samples=24, image_size=32)
    spec = {"class_path": SYNTHETIC, "init_args": {"style": "ct", "num_samples": 24}, "split": "train"}
    cache = FeatureCache(tmp_path)
    first = cached_features(encoders, hashes, dataset, spec, "t", cache, batch_size=10, progress=False)
    assert calls == [10, 10, 10, 10, 4, 4]  # one pass over 3 batches, both encoders
    assert first["pre"].x.shape == (24, encoders["pre"].embed_dim) and first["pre"].y.shape == (24,)
    second = cached_features(encoders, hashes, dataset, spec, "t", FeatureCache(tmp_path), progress=False)
    assert len(calls) == 6  # nothing embedded again
    for name in encoders:
        np.testing.assert_array_equal(second[name].x, first[name].x)
    np.testing.assert_array_equal(second["pre"].y, [dataset[i]["label"] for i in range(24)])
    cached_features(encoders, hashes, dataset, {**spec, "split": "val"}, "t", cache, progress=False)
    assert len(calls) == 8  # another spec is another key
    assert (cache.hits, cache.misses) == (0, 4)


# ----------------------------------------------------------------------------------------------
# the command


def _task(name: str, style: str, family: str, kind: str, classes: int, n: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "num_classes": classes,
        "data": {"class_path": SYNTHETIC, "init_args": {"style": style, "family": family, "num_samples": n}},
    }


def _config(tmp_path: Path, encoder: Path, tasks: list[dict[str, Any]], **extra: Any) -> Path:
    config = {
        "encoders": {"pretrained": str(encoder), "random": "random"},
        "tasks": tasks,
        "fractions": [0.1, 1.0],
        "seeds": [0, 1],
        "dataset_defaults": {"image_size": 32},
        "segmentation": {"steps": 3, "batch_size": 4},
        "scratch": {"steps": 2, "batch_size": 8},
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        **extra,
    }
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_probe_command_writes_report_and_reuses_features(exported, tmp_path, capsys):
    tasks = [
        _task("ct_count", "ct", "count_bin", "classification", 4, 40),
        _task("ct_objects", "ct", "objects", "multilabel", 4, 100),
        _task("fl_seg", "fluorescence", "segmentation", "segmentation", 5, 8),
    ]
    tasks[2]["data"]["init_args"]["image_size"] = 64  # the decoder's GroupNorm needs 2 x 2 maps
    config = _config(tmp_path, exported, tasks)
    assert main(["-c", str(config)]) == 0
    run = tmp_path / "out" / "version_0"
    report = json.loads((run / "report.json").read_text())
    assert report["feature_cache"] == {"directory": str(tmp_path / "cache"), "hits": 0, "misses": 12}
    count = report["tasks"]["ct_count"]
    assert count["metric"] == "accuracy" and count["n_per_fraction"] == {"0.1": 4, "1.0": 40}
    for encoder in ("pretrained", "random"):
        runs = count["runs"][encoder]
        assert [(r["fraction"], r["seed"]) for r in runs] == [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
        low = [r["metrics"]["accuracy"] for r in runs[:2]]
        assert count["summary"][encoder]["0.1"]["mean"] == pytest.approx(np.mean(low))
        assert count["summary"][encoder]["0.1"]["std"] == pytest.approx(np.std(low, ddof=1))
    assert report["tasks"]["ct_objects"]["metric"] == "auroc"
    seg = report["tasks"]["fl_seg"]
    assert seg["method"] == "segmentation probe" and 0.0 <= seg["summary"]["pretrained"]["1.0"]["mean"] <= 1.0
    assert (
        set(count["scratch"]["budget"]) >= {"steps", "lr", "encoder_lr"}
        and len(count["scratch"]["runs"]) == 1
    )
    markdown = (run / "report.md").read_text()
    mean, std = count["summary"]["pretrained"]["0.1"]["mean"], count["summary"]["pretrained"]["0.1"]["std"]
    assert f"| 10% | 4 | {mean:.3f} ± {std:.3f} |" in markdown and "scratch@100%" in markdown
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report written to" in capsys.readouterr().out

    # the same features again: all from the cache, into the next version folder
    again = _config(tmp_path, exported, tasks[:2], scratch=None)
    assert main(["-c", str(again), "--seeds", "[3]"]) == 0
    second = json.loads((tmp_path / "out" / "version_1" / "report.json").read_text())
    assert second["feature_cache"]["hits"] == 12 and second["feature_cache"]["misses"] == 0
    assert second["tasks"]["ct_count"]["scratch"] is None


def test_probe_command_reports_bad_input(exported, tmp_path, capsys):
    tasks = [_task("ct_count", "ct", "count_bin", "classification", 4, 40)]
    config = _config(tmp_path, exported, tasks)
    assert main(["-c", str(config), "--encoders", '{"pre": "/no/such/encoder"}']) == 2
    assert "error: encoder 'pre': /no/such/encoder does not exist" in capsys.readouterr().err
    assert main(["-c", str(config), "--fractions", "[0.01]"]) == 2
    assert "fewer than the 4 classes" in capsys.readouterr().err
    one_channel = save_encoder(SwinEncoder(**{**TINY_ENCODER, "in_chans": 1}), tmp_path / "gray")
    rgb = _config(tmp_path, one_channel, tasks)
    assert main(["-c", str(rgb)]) == 2
    assert "takes 1-channel images but task 'ct_count' gives 3-channel images" in capsys.readouterr().err


def test_probe_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--encoders" in out and "--fractions" in out and "--scratch" in out


def test_probe_reports_every_phase_on_stderr(exported, tmp_path, capsys):
    tasks = [_task("ct_count", "ct", "count_bin", "classification", 4, 40)]
    config = _config(tmp_path, exported, tasks, progress=True, seeds=[0])
    assert main(["-c", str(config)]) == 0
    err = capsys.readouterr().err
    for phase in (
        "umedpt probe: task ct_count (classification): building its splits",
        "umedpt probe: task ct_count: train 40",
        "features ct_count",  # extraction bar per split
        "linear probes ct_count",  # one bar over the probe fits
        "umedpt probe: task ct_count: 4 probes in",
        "umedpt probe: task ct_count: scratch baseline, 1 run(s)",
    ):
        assert phase in err, phase
