"""``umedpt data check``: finds every planted problem, reports clean data as clean, exit codes, JSON."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from umedpt.cli import main as cli_main
from umedpt.data.check import load_tasks, main
from umedpt.tasks import import_class

pytest_plugins = ["tests.data"]  # the data_files session fixture

TINY = Path(__file__).parent / "conf" / "tiny.yaml"
EXAMPLES = sorted((Path(__file__).parents[1] / "configs" / "examples").glob("*.yaml"))


def _task(name: str, kind: str, classes: int, reader: str, /, **init_args: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "num_classes": classes, "batch_size": 2,
            "data": {"class_path": f"umedpt.data.readers.{reader}", "init_args": init_args}}


def write_config(path: Path, files: dict[str, Any]) -> Path:
    """A config with one task per reader over ``files`` (the output of the fixture generators)."""
    seg, coco = files["segmentation"], files["coco"]
    tasks = [
        _task("tissue", "classification", 3, "MedMNISTDataset", path=str(files["medmnist"]["multiclass"]),
              num_classes=3),
        _task("diagnosis", "classification", 3, "ManifestDataset", manifest=str(files["manifest"]["manifest"]),
              label_column="diagnosis"),
        _task("organs", "segmentation", 3, "SegmentationDataset", images=str(seg["images"]), masks=str(seg["masks"]),
              num_classes=3, mask_suffix="_mask"),
        _task("lesions", "detection", 2, "CocoDetectionDataset", annotations=coco["annotations"],
              images=coco["images"]),
    ]
    path.write_text(yaml.safe_dump({"model": {"tasks": tasks}, "data": {"dataset_defaults": {"image_size": 32}}}))
    return path


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["check", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def problems_of(report: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return next(t for t in report["tasks"] if t["name"] == task)["problems"]


def test_checker_finds_every_planted_problem(tmp_path, capsys, data_files):
    config = write_config(tmp_path / "broken.yaml", data_files["broken"])
    code, report = run_json(capsys, "-c", str(config))
    assert code == 1 and report["ok"] is False
    errors = [(t["name"], p["split"], Path(p["source"]).name, p["field"], p["message"])
              for t in report["tasks"] for p in t["problems"] if p["severity"] == "error"]
    expected = [
        ("tissue", "val", "multiclass.npz:val_labels[1]", "label", "7 is out of range 0..2"),
        ("tissue", "test", "multiclass.npz:test_images[0]", "image", "same pixels as multiclass.npz:train_images[0]"),
        ("diagnosis", "train", "missing.png", "file", "file not found"),
        ("diagnosis", "train", "corrupt.png", "image", "cannot decode as an image"),
        ("organs", "train", "case_0_mask.png", "mask", "size 44x64 differs from the image's 48x64"),
        ("lesions", "train", "instances_train.json image id 101", "boxes", "annotation 900 (xyxy [70.0, 50.0, 100.0"),
        ("lesions", "train", "instances_train.json image id 101", "boxes", "annotation 901 is degenerate"),
    ]
    assert len(errors) == len(expected), errors
    for task, split, source, field, message in expected:
        assert any(e[:4] == (task, split, source, field) and message in e[4] for e in errors), (task, message, errors)
    assert report["errors"] == len(expected)


def test_clean_data_passes_with_summaries(tmp_path, capsys, data_files):
    config = write_config(tmp_path / "clean.yaml", data_files)
    code, report = run_json(capsys, "-c", str(config))
    assert code == 0 and report["ok"] is True and report["errors"] == 0
    tasks = {t["name"]: t for t in report["tasks"]}
    tissue = tasks["tissue"]["splits"]
    assert {s: v["count"] for s, v in tissue.items()} == {"train": 8, "val": 4, "test": 4}
    assert tissue["train"]["class_counts"] == [3, 3, 2] and tissue["train"]["sizes"] == {"28x28": 8}
    diagnosis = tasks["diagnosis"]["splits"]["train"]
    assert diagnosis["dtypes"] == {"uint8": 4, "uint16": 2} and diagnosis["channels"] == {"1": 4, "3": 2}
    assert tasks["organs"]["splits"]["train"]["value_range"] == [1000.0, 50003.0]
    lesions = tasks["lesions"]
    assert lesions["info"]["train"]["category_mapping"] == {"3": [0, "nodule"], "7": [1, "mass"]}
    assert lesions["splits"]["train"]["images_without_boxes"] == 2
    assert cli_main(["data", "check", "-c", str(config), "--tasks", "lesions"]) == 0  # the CLI route, tables
    out = capsys.readouterr().out
    assert "umedpt data check" in out and "3 -> 0 (nodule), 7 -> 1 (mass)" in out and "class balance" in out


def test_quick_mode_checks_declarations_only(tmp_path, capsys, data_files):
    config = write_config(tmp_path / "broken.yaml", data_files["broken"])
    code, report = run_json(capsys, "-c", str(config), "--quick", "--tasks", "diagnosis", "lesions")
    assert code == 1
    fields = sorted((Path(p["source"]).name, p["field"]) for t in report["tasks"] for p in t["problems"])
    # no decoding: the corrupt file and duplicates are not seen; declared boxes are
    assert fields == [("instances_train.json image id 101", "boxes")] * 2 + [("missing.png", "file")]


def test_synthetic_config_is_counted(capsys):
    code, report = run_json(capsys, "-c", str(TINY))
    assert code == 0 and len(report["tasks"]) == 4
    split = report["tasks"][0]["splits"]["train"]
    assert split["count"] == 8 and split["inspected"] is False


def test_spec_and_build_failures_are_reported(tmp_path, capsys, data_files):
    config = write_config(tmp_path / "c.yaml", data_files)
    spec = yaml.safe_load(config.read_text())
    spec["model"]["tasks"][0]["num_classes"] = 5
    spec["model"]["tasks"][1]["data"]["init_args"]["manifest"] = str(tmp_path / "nowhere.csv")
    spec["model"]["tasks"] = spec["model"]["tasks"][:2]
    config.write_text(yaml.safe_dump(spec))
    code, report = run_json(capsys, "-c", str(config), "--splits", "train")
    assert code == 1
    assert any(p["field"] == "spec" and "num_classes=5 but its train dataset has 3" in p["message"]
               for p in problems_of(report, "tissue"))
    assert any(p["field"] == "data" and "nowhere.csv not found" in p["message"]
               for p in problems_of(report, "diagnosis"))


def test_category_mapping_must_agree_across_splits(tmp_path, capsys, data_files):
    coco = data_files["coco"]
    val = json.loads(Path(coco["annotations"].format(split="val")).read_text())
    val["categories"] = [{"id": 3, "name": "mass"}, {"id": 7, "name": "nodule"}]
    for split, data in (("train", json.loads(Path(coco["annotations"].format(split="train")).read_text())),
                        ("val", val)):
        (tmp_path / f"inst_{split}.json").write_text(json.dumps(data))
    task = _task("lesions", "detection", 2, "CocoDetectionDataset", annotations=str(tmp_path / "inst_{split}.json"),
                 images=coco["images"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"tasks": [task]}}))
    code, report = run_json(capsys, "-c", str(tmp_path / "c.yaml"), "--splits", "train", "val", "--quick")
    assert code == 1
    assert any(p["field"] == "categories" for p in problems_of(report, "lesions"))


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["check", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err
    assert main(["check", "-c", str(TINY), "--tasks", "nope"]) == 2
    assert main([]) == 2
    assert main(["check", "--help"]) == 0


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_name_readers_and_their_arguments(config):
    tasks, defaults = load_tasks([config])
    assert tasks and defaults["image_size"] == 224
    for task in tasks:
        cls = import_class(task.data["class_path"], task.name)
        inspect.signature(cls).bind(split="train", **task.data["init_args"])  # every argument exists


def test_nonfinite_voxels_are_errors_or_warnings_with_nonfinite_zero(tmp_path, capsys):
    import nibabel as nib
    import numpy as np
    from nibabel.testing import data_path

    volume = Path(data_path) / "resampled_anat_moved.nii"  # bundled with NaN voxels in every slice
    image = nib.load(volume)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), tmp_path / "labels.nii.gz")
    (tmp_path / "v.csv").write_text(f"image,mask,split\n{volume},labels.nii.gz,train\n")
    task = _task("brain", "segmentation", 2, "NiftiSliceDataset", manifest=str(tmp_path / "v.csv"), num_classes=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"tasks": [task]}}))
    code, report = run_json(capsys, "-c", str(config), "--splits", "train")
    found = [p for p in problems_of(report, "brain") if p["severity"] == "error"]
    assert code == 1 and len(found) == 3
    assert all(p["field"] == "image" and "resampled_anat_moved.nii [slice" in p["source"]
               and "values are not finite" in p["message"] for p in found)
    assert report["tasks"][0]["splits"]["train"]["value_range"] is not None  # finite values only, valid JSON
    assert run_json(capsys, "-c", str(config), "--splits", "train", "--quick")[0] == 0  # not decoded
    task["data"]["init_args"]["nonfinite"] = "zero"
    config.write_text(yaml.safe_dump({"model": {"tasks": [task]}}))
    code, report = run_json(capsys, "-c", str(config), "--splits", "train")
    assert code == 0 and report["warnings"] == 3
    assert all("replaced by 0" in p["message"] for p in problems_of(report, "brain"))


def test_binary_mask_without_mask_values_is_reported(tmp_path, capsys):
    import cv2
    import numpy as np

    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 4:] = 255
    for value, name in enumerate(("a", "b")):
        cv2.imwrite(str(tmp_path / f"images/train/{name}.png"), np.full((16, 16), value, np.uint8))
        cv2.imwrite(str(tmp_path / f"masks/train/{name}.png"), mask)
    task = _task("nuclei", "segmentation", 2, "SegmentationDataset", images=str(tmp_path / "images"),
                 masks=str(tmp_path / "masks"), num_classes=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": {"tasks": [task]}}))
    code, report = run_json(capsys, "-c", str(tmp_path / "c.yaml"), "--splits", "train")
    assert code == 0 and report["warnings"] == 2
    for problem, name in zip(problems_of(report, "nuclei"), ("a", "b"), strict=True):
        assert problem["source"].endswith(f"masks/train/{name}.png") and problem["field"] == "mask"
        assert "75% of the pixels are ignore_index=255" in problem["message"] and "mask_values" in problem["message"]


def test_base_install_provides_every_import():
    """`pip install -e .` must bring every package umedpt imports; the modules of the llm extra
    (the language model, the Uni-Med protocol, the COCO caption metrics) may use that extra too."""
    import ast
    import importlib.metadata as metadata
    import re
    import sys

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[1]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def closure(requirements: list[str]) -> set[str]:
        """The distributions that the requirements and everything they pull in install."""
        todo = [Requirement(r) for r in requirements]
        installed: set[str] = set()
        seen: set[tuple[str, frozenset[str]]] = set()
        while todo:
            requirement = todo.pop()
            key = (norm(requirement.name), frozenset(requirement.extras))
            if key in seen:
                continue
            seen.add(key)
            installed.add(key[0])
            for text in metadata.requires(requirement.name) or []:
                dependency = Requirement(text)
                extras = requirement.extras or {""}
                if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in extras):
                    todo.append(dependency)
        return installed

    base = closure(project["dependencies"])
    # the modules of an optional extra may import it (they name the extra when it is missing)
    extra_of = {
        **{root / "umedpt" / "mllm" / name: "llm" for name in ("llm.py", "unimed.py", "coco_caption.py")},
        root / "umedpt" / "data" / "streaming.py": "streaming",
    }
    with_extra = {e: closure(project["dependencies"] + project["optional-dependencies"][e]) for e in set(extra_of.values())}
    distributions = metadata.packages_distributions()
    missing = []
    for path in sorted((root / "umedpt").rglob("*.py")):
        installed = with_extra[extra_of[path]] if path in extra_of else base
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"umedpt", "heads"}:
                if not {norm(d) for d in distributions.get(top, [])} & installed:
                    missing.append(f"{path.relative_to(root)}:{node.lineno}: {top}")
    assert not missing, f"imports that the base install does not provide: {missing}"
