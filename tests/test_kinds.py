"""Task kinds are plug-ins: the registry, and a kind defined only in this file (a regression: one
float per image, MSE loss, MAE / R2 metrics) trained, validated, predicted and checked through
the real command line with no library edit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import MeanAbsoluteError, MetricCollection, R2Score

from heads import DEFAULT_HEADS
from heads.base import TaskHead
from tests.conftest import fit_config
from umedpt.cli import main
from umedpt.curves import PRIMARY_METRIC
from umedpt.kinds import BUILTIN_KINDS, TaskKind, get_kind, kind_names, register_kind
from umedpt.tasks import Task


class Regression(TaskKind):
    """One float per image (``value``); not registered: tasks name it by class path."""

    name = "regression"
    default_head = "tests.test_kinds.RegressionHead"
    metric = "mae"
    target_keys = ("value",)


class RegressionHead(TaskHead):
    """Pooled coarsest level -> LayerNorm -> Linear: one value per image, MSE loss."""

    target_keys = ("value",)

    def __init__(self, in_channels: list[int], reductions: list[int], num_classes: int = 1) -> None:
        super().__init__(in_channels, reductions, num_classes)
        self.norm = nn.LayerNorm(self.in_channels[-1])
        self.fc = nn.Linear(self.in_channels[-1], 1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        return self.fc(self.norm(features[-1].mean(dim=(2, 3)))).squeeze(-1)

    def loss(self, outputs: Tensor, batch: dict[str, Any]) -> Tensor:
        return F.mse_loss(outputs, self.target(batch, "value").float())

    @property
    def default_loss_scale(self) -> float:
        return 1.0 / VALUE_VARIANCE

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"mae": MeanAbsoluteError(), "r2": R2Score()})

    def update_metrics(self, metrics: MetricCollection, outputs: Tensor, batch: dict[str, Any]) -> None:
        metrics.update(outputs.detach(), self.target(batch, "value").float())

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs


#: side of the bright square as a fraction of the image: uniform on [0.2, 0.8]
LOW, HIGH = 0.2, 0.8
VALUE_VARIANCE = (HIGH - LOW) ** 2 / 12


class SquareSize(Dataset):
    """Grey images with one bright square at a random place; ``value`` is its side / image side."""

    def __init__(self, split: str, num_samples: int = 64, image_size: int = 32) -> None:
        rng = np.random.default_rng({"train": 0, "val": 1, "test": 2}[split])
        self.values = rng.uniform(LOW, HIGH, num_samples).astype(np.float32)
        self.images = np.zeros((num_samples, 3, image_size, image_size), np.float32)
        for i, value in enumerate(self.values):
            side = max(1, round(float(value) * image_size))
            y, x = rng.integers(0, image_size - side + 1, 2)
            self.images[i, :, y : y + side, x : x + side] = 1.0
        self.images += rng.normal(0.0, 0.05, self.images.shape).astype(np.float32)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": torch.from_numpy(self.images[i]), "value": torch.tensor(self.values[i])}


def test_builtin_kinds_are_registered_with_their_facts():
    assert list(BUILTIN_KINDS) == ["classification", "multilabel", "segmentation", "detection"]
    assert kind_names()[:4] == list(BUILTIN_KINDS)
    assert get_kind("segmentation").metric == "dice" and get_kind("segmentation").dense
    assert get_kind("detection").list_keys == ("boxes", "box_labels")
    assert get_kind("detection").probe_metric is None and get_kind("detection").probed_metric == "map_50"
    assert get_kind("classification").probe_metric == "accuracy"
    # the tables other code imports are read from the kinds
    assert PRIMARY_METRIC == {"classification": "auroc", "multilabel": "auroc", "segmentation": "dice",
                              "detection": "map_50"}
    assert DEFAULT_HEADS["detection"] == "heads.detection.DetectionHead"
    assert get_kind(get_kind("multilabel")) is get_kind("multilabel")


def test_a_kind_is_found_by_class_path_and_bad_names_are_explained():
    kind = get_kind("tests.test_kinds.Regression")
    assert isinstance(kind, Regression) and kind.metric == "mae"
    assert "regression" not in kind_names()  # a class path needs no registration
    assert get_kind(Regression) is kind  # one instance per class
    with pytest.raises(ValueError, match=r"unknown task kind 'regresion'.*'classification'"):
        get_kind("regresion")
    with pytest.raises(TypeError, match="not a umedpt.kinds.TaskKind subclass"):
        get_kind("tests.test_kinds.RegressionHead")
    with pytest.raises(ImportError, match="cannot import module 'nowhere'"):
        get_kind("nowhere.Kind")
    with pytest.raises(ValueError, match=r"task 'age': unknown task kind 'regresion'"):
        Task(name="age", kind="regresion", num_classes=1)


def test_register_kind_refuses_a_second_class_under_a_taken_name():
    class Other(TaskKind):
        name = "segmentation"

    with pytest.raises(ValueError, match="already umedpt.kinds.builtin.Segmentation"):
        register_kind(Other)
    with pytest.raises(TypeError, match="not a TaskKind subclass"):
        register_kind(int)  # type: ignore[arg-type]
    assert type(get_kind("segmentation")).__name__ == "Segmentation"


def _config(tmp_path: Path, steps: int) -> Path:
    encoder = {
        "img_size": 32,
        "model_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                         "window_size": 2, "drop_path_rate": 0.0},
    }
    task = {
        "name": "square_size",
        "kind": "tests.test_kinds.Regression",
        "num_classes": 1,
        "batch_size": 16,
        "data": {"class_path": "tests.test_kinds.SquareSize", "init_args": {"num_samples": 128}},
    }
    return fit_config(tmp_path / "regression.yaml", steps, encoder, [task], {"num_workers": 0},
                      lr=2.0e-3, warmup_steps=0.1)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_kind_defined_in_a_test_file_fits_validates_predicts_and_checks_through_the_cli(tmp_path, capsys):
    config = _config(tmp_path, steps=120)
    untrained = main(["validate", "-c", str(config)])
    before = json.loads((Path(untrained.trainer.log_dir) / "metrics_val.json").read_text())

    fitted = main(["fit", "-c", str(config)])
    run = Path(fitted.trainer.log_dir)
    after = json.loads((run / "metrics_val.json").read_text())
    task = after["tasks"]["square_size"]
    assert task["kind"] == "tests.test_kinds.Regression"
    # the metric moves: from an untrained head (MAE 0.49-0.85 on seeds 0-2) to far below the MAE of
    # predicting the mean, 0.15 (measured 0.020-0.026, R2 0.96-0.98, on seeds 0-2)
    mean_mae = (HIGH - LOW) / 4
    assert before["tasks"]["square_size"]["metrics"]["mae"] > mean_mae
    assert task["metrics"]["mae"] < 0.3 * mean_mae, task
    assert task["metrics"]["r2"] > 0.8, task
    # learning curves plot the kind's own metric
    curves = json.loads((run / "learning_curves.json").read_text())
    assert any("val/square_size/mae" in point["metrics"] for point in curves["val"])

    ckpt = next((run / "checkpoints").glob("epoch=*.ckpt"))
    predicted = main(["predict", "-c", str(config), "--ckpt_path", str(ckpt)])
    values = torch.load(Path(predicted.trainer.log_dir) / "predictions" / "square_size.pt", weights_only=True)
    dataset = SquareSize("test", num_samples=128)
    predictions = values["predictions"] if isinstance(values, dict) else values
    assert predictions.shape == (len(dataset),)
    assert float((predictions - torch.from_numpy(dataset.values)).abs().mean()) < 0.3 * mean_mae

    capsys.readouterr()
    assert main(["data", "check", "-c", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["tasks"][0]["kind"] == "tests.test_kinds.Regression"

    # a probe of the kind: the frozen fitted encoder against a random one, the task's head trained
    probe = {
        "encoders": {"fitted": str(run / "encoder"), "random": "random"},
        "tasks": [yaml.safe_load(config.read_text())["model"]["tasks"][0]],
        "fractions": [1.0], "seeds": [0], "scratch": None, "progress": False, "cache_dir": None,
        "segmentation": {"steps": 120, "batch_size": 16, "lr": 3.0e-3},
        "output_dir": str(tmp_path / "probe"),
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(probe))
    assert main(["probe", "-c", str(tmp_path / "probe.yaml")]) == 0
    probed = json.loads((tmp_path / "probe" / "version_0" / "report.json").read_text())["tasks"]["square_size"]
    assert probed["metric"] == "mae" and probed["method"] == "regression probe"
    fitted_mae, random_mae = (probed["summary"][e]["1.0"]["mean"] for e in ("fitted", "random"))
    # the fitted encoder's features give the size away, a random encoder's much less (test MAE
    # 0.027 / 0.037 / 0.023 against 0.096 / 0.116 / 0.093 with seeds 0 / 1 / 2)
    assert fitted_mae < 0.5 * mean_mae and fitted_mae < 0.5 * random_mae, probed["summary"]


def test_same_kind_matches_a_name_and_its_class_path():
    from umedpt.kinds import same_kind

    assert same_kind("segmentation", "umedpt.kinds.builtin.Segmentation")
    assert same_kind("tests.test_kinds.Regression", Regression)
    assert not same_kind("segmentation", "detection")
    assert not same_kind("regresion", "regression")


def test_builtin_kinds_check_declared_targets_and_count_classes():
    cls, multi, seg, det = (get_kind(k) for k in BUILTIN_KINDS)
    assert cls.target_problems({"label": 2}, 3) == []
    assert cls.target_problems({"label": "2"}, 3) == [("label", "'2' is not a class index")]
    assert cls.target_problems({"label": True}, 3) == [("label", "True is not a class index")]
    assert cls.target_problems({"label": 3}, 3) == [("label", "3 is out of range 0..2")]
    assert cls.class_counts({"label": 1}, 3).tolist() == [0, 1, 0]
    assert cls.class_counts({"label": 5}, 3) is None
    assert multi.target_problems({"label": [1, 0.5, 0]}, 3, ["a", "b", "c"]) == [
        ("label", "multi-label values must be 0 or 1, got {'b': 0.5}")
    ]
    assert multi.target_problems({"label": [1, 0]}, 3)[0][1] == "has shape (2,), expected (3,)"
    assert multi.class_counts({"label": [1, 0, 1]}, 3).tolist() == [1, 0, 1]
    assert seg.target_problems({"mask": None}, 2) == [("mask", "no mask for this image")]
    assert seg.target_problems({"mask": "m.png"}, 2) == [] and seg.class_counts({"mask": "m.png"}, 2) is None
    boxes = [[0, 0, 4, 4], [2, 2, 2, 5], [0, 0, float("nan"), 1], [0, 0, 12, 5]]
    found = det.target_problems({"boxes": boxes, "box_labels": [0, 1, 1, 7]}, 2, size=(10, 10), what="image")
    assert found == [
        ("boxes", "box 1 is degenerate (xyxy [2.0, 2.0, 2.0, 5.0]: zero or negative size)"),
        ("boxes", "box 2 has non-finite coordinates [0.0, 0.0, nan, 1.0]"),
        ("boxes", "box 3 (xyxy [0.0, 0.0, 12.0, 5.0]) lies outside the image (10x10)"),
        ("box_labels", "box 3 has label 7, out of range 0..1"),
    ]
    # within the tolerance of annotation tools, and no size given: no problem
    assert det.target_problems({"boxes": [[0, 0, 10.5, 10]], "box_labels": [1]}, 2, size=(10, 10)) == []
    assert det.class_counts({"boxes": boxes, "box_labels": [0, 1, 1, 7]}, 2).tolist() == [1, 2]


def test_probes_take_every_kind_linear_ones_only_with_two_classes():
    from umedpt.probe.encoders import ProbeError
    from umedpt.probe.run import ProbeSettings, _method

    settings = ProbeSettings(
        encoders={"random": "random"},
        tasks=[Task(name="r", kind="tests.test_kinds.Regression", num_classes=1),
               Task(name="d", kind="detection", num_classes=2), Task(name="c", kind="classification", num_classes=2)],
    )
    assert [_method(t, settings)[0] for t in settings.tasks] == ["regression probe", "detection probe", "linear probe"]
    with pytest.raises(ProbeError, match=r"task 'c' has 1 class; a probe needs at least 2 classes"):
        ProbeSettings(encoders={"random": "random"}, tasks=[Task(name="c", kind="classification", num_classes=1)])


def test_builtin_kinds_turn_targets_into_annotations_and_back():
    """The annotation methods IMAX manifests, the world writer and pseudo-labelling use are inverse
    to each other, class names become indices, and resizing moves boxes and masks with the image."""
    cls, multi, seg, det = (get_kind(k) for k in BUILTIN_KINDS)
    mask = np.zeros((8, 12), np.int64)
    mask[2:6, 3:9] = 2
    cases = [
        (cls, {"label": torch.tensor(2)}),
        (multi, {"label": torch.tensor([1.0, 0.0, 1.0])}),
        (seg, {"mask": torch.from_numpy(mask)}),
        (det, {"boxes": torch.tensor([[1.0, 2.0, 5.0, 7.0]]), "box_labels": torch.tensor([1])}),
    ]
    for kind, targets in cases:
        fields = kind.annotation_from_targets(targets)
        assert set(fields) == set(kind.annotation_fields)
        written = {f: "file.png" if f in kind.file_fields else v for f, v in fields.items()}
        parsed, problems = kind.parse_annotation(written, 3, ["a", "b", "c"])
        assert problems == [], kind
        decoded = {f: fields[f] if f in kind.file_fields else v for f, v in parsed.items()}
        back = kind.annotation_targets(decoded, 3, (8, 12))
        assert back.keys() == targets.keys() and all(torch.equal(back[k], targets[k]) for k in targets), kind
    assert cls.parse_annotation({"label": "b"}, 3, ["a", "b", "c"]) == ({"label": 1}, [])
    assert cls.parse_annotation({"label": "b"}) == ({"label": "b"}, [])  # no task: names stay names
    assert multi.parse_annotation({"labels": [0, 5]}, 3)[1] == [("labels[1]", "class 5 is outside [0, 2]")]
    assert det.parse_annotation({"boxes": [[4, 4, 2, 6]], "box_labels": [0]}, 3)[1] == [
        ("boxes[0]", "needs 0 <= x1 < x2 and 0 <= y1 < y2, got [4, 4, 2, 6]")
    ]
    missing = [k.annotation_targets(None, 3, (4, 6), ignore_index=9) for k in (cls, multi, seg, det)]
    assert int(missing[0]["label"]) == 0 and missing[1]["label"].tolist() == [0.0, 0.0, 0.0]
    assert bool((missing[2]["mask"] == 9).all()) and missing[3]["boxes"].shape == (0, 4)
    half = det.resize_targets(cases[3][1], (8, 12), (4, 6))
    assert half["boxes"].tolist() == [[0.5, 1.0, 2.5, 3.5]]
    assert seg.resize_targets(cases[2][1], (8, 12), (4, 6))["mask"].tolist() == mask[::2, ::2].tolist()
    with pytest.raises(ValueError, match="a box reaches beyond the 4x3 image"):
        det.annotation_targets({"boxes": [[0, 0, 5, 2]], "box_labels": [0]}, 3, (3, 4))
    # the label cells of a CSV row, as ManifestDataset reads them
    assert cls.table_label(["b"], ["a", "b"]) == (1, None) and cls.table_label(["1"], ["a", "b"]) == (1, None)
    assert cls.table_label(["z"], ["a", "b"])[1] == "'z' is neither a class index nor a class name ['a', 'b']"
    label, problem = multi.table_label(["a;c"], ["a", "b", "c"])
    assert label.tolist() == [1.0, 0.0, 1.0] and problem is None
    assert multi.table_class_names(["finding"], ["b;a", "", "c"]) == ["a", "b", "c"]
    assert cls.table_class_names(["label"], ["2", "0"]) == ["0", "1", "2"]
    with pytest.raises(NotImplementedError, match="'segmentation' has no table form"):
        seg.table_label(["x"], [])
