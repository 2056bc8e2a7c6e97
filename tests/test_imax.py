"""Image-centric manifests, the image-centric step and its data module."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import HEAD_ARGS, TINY_ENCODER
from umedpt import SwinEncoder
from umedpt.cli import main
from umedpt.data.imax import (
    Annotation,
    ImageCentricDataModule,
    ImageCentricDataset,
    ImageRecord,
    ManifestError,
    ManifestTaskDataset,
    annotation_counts,
    collate_image_centric,
    dmax_view,
    imax_view,
    read_manifest,
    synthetic_tasks,
    write_manifest,
    write_synthetic_world,
)
from umedpt.data.synthetic import SyntheticTaskDataset
from umedpt.image_centric import ImageCentricModule, select_samples
from umedpt.module import MultiTaskModule, NonFiniteLossError
from umedpt.tasks import Task

CONFIGS = Path(__file__).parents[1] / "configs"
FAMILIES = {"grade": "grade", "objects": "objects", "segmentation": "segmentation", "detection": "detection"}
NAMES = list(FAMILIES)


def tiny_tasks() -> list[Task]:
    """The four trained families of the radiograph world, with small heads."""
    tasks = synthetic_tasks("radiograph", FAMILIES, batch_size=2)
    for task in tasks:
        task.head_args = dict(HEAD_ARGS.get(task.kind, {}))
    return tasks


def make_world(root: Path) -> Path:
    """A fully annotated 64 px radiograph world: 8 train, 4 val, 4 test images."""
    return write_synthetic_world(root, "radiograph", {"train": 8, "val": 4, "test": 4}, image_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


def make_module(**kw: Any) -> ImageCentricModule:
    torch.manual_seed(0)
    return ImageCentricModule(tasks=tiny_tasks(), encoder=SwinEncoder(**TINY_ENCODER), **kw)


def image_batch(manifest: Path, size: int = 4, drop: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """One image-centric batch of the first ``size`` train images; ``drop`` removes annotations."""
    records = [r for r in read_manifest(manifest, tiny_tasks()) if r.split == "train"][:size]
    for task, rows in (drop or {}).items():
        for row in rows:
            del records[row].annotations[task]
    builder = ImageCentricDataModule(str(manifest), tiny_tasks()).builder
    dataset = ImageCentricDataset(records, builder)
    return collate_image_centric([dataset[i] for i in range(len(dataset))])


def assert_same_gradients(model: torch.nn.Module, reference: torch.nn.Module) -> int:
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    return checked


# ------------------------------------------------------------------ manifest format


def test_manifest_round_trip_jsonl_and_csv(world, tmp_path):
    records = read_manifest(world, tiny_tasks())
    records[0].text = 'free text, with "quotes"\nand a new line'
    records[1].annotations["grade"] = Annotation(label=2, pseudo=True, score=0.93)
    for suffix in ("jsonl", "csv"):
        path = write_manifest(records, tmp_path / "sub" / f"m.{suffix}", source_root=world.parent)
        again = read_manifest(path, tiny_tasks())  # also checks that every rebased file exists
        assert len(again) == len(records) == 16
        assert [r.id for r in again] == [r.id for r in records]
        for a, b in zip(again, records, strict=True):
            assert a.split == b.split and a.text == b.text
            assert a.annotations == {
                n: replace(x, mask=f"../../{world.parent.name}/{x.mask}") if x.mask else x
                for n, x in b.annotations.items()
            }
        assert (path.parent / again[0].image).resolve() == (world.parent / records[0].image).resolve()
    assert again[1].annotations["grade"].pseudo and again[1].annotations["grade"].score == 0.93


def test_csv_short_forms_and_class_names_resolve_to_indices(world, tmp_path):
    (tmp_path / "images").symlink_to(world.parent / "images")
    (tmp_path / "masks").symlink_to(world.parent / "masks")
    (tmp_path / "m.csv").write_text(
        "image,split,grade,objects,segmentation,detection\n"
        'images/train_00000.npy,train,reticular,"[""mass"", 3]",masks/train_00000.png,'
        '"{""boxes"": [[1, 2, 10, 12]], ""box_labels"": [""cavity""]}"\n'
        "images/train_00001.npy,val,1,,,\n"
    )
    first, second = read_manifest(tmp_path / "m.csv", tiny_tasks())
    assert first.annotations["grade"].label == 1
    assert first.annotations["objects"].labels == [1, 3]
    assert first.annotations["segmentation"].mask == "masks/train_00000.png"
    assert first.annotations["detection"].box_labels == [2]
    assert second.split == "val" and set(second.annotations) == {"grade"}


GOOD = '{"image": "images/train_00000.npy", "annotations": {"grade": {"label": 1}}}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ('{"image": "images/train_00000.npy", "spilt": "val"}', r"line 2: unknown field\(s\) \['spilt'\]"),
        ('{"image": "images/nope.npy"}', r"line 2, field 'image': file .*nope.npy does not exist"),
        ('{"image": "images/train_00001.npy", "split": "dev"}', r"line 2, field 'split': 'dev'"),
        (GOOD, r"line 2, field 'id': 'images/train_00000.npy' is already used on line 1"),
        (
            '{"image": "images/train_00001.npy", "annotations": {"grade": {"label": 3}}}',
            r"line 2, field 'annotations.grade.label': class 3 is outside \[0, 2\]",
        ),
        (
            '{"image": "images/train_00001.npy", "annotations": {"grade": {"labels": [1]}}}',
            r"line 2, field 'annotations.grade': task 'grade' is classification \(label\), got labels",
        ),
        (
            '{"image": "images/train_00001.npy", "annotations": {"objects": {"labels": ["tumour"]}}}',
            r"line 2, field 'annotations.objects.labels\[0\]': unknown class name 'tumour'",
        ),
        (
            '{"image": "images/train_00001.npy", "annotations": {"detection": '
            '{"boxes": [[1, 2, 3, 4], [5, 6, 5, 9]], "box_labels": [0, 1]}}}',
            r"line 2, field 'annotations.detection.boxes\[1\]': needs 0 <= x1 < x2",
        ),
        (
            '{"image": "images/train_00001.npy", "annotations": {"detection": {"boxes": [[1, 2, 3, 4]], "box_labels": []}}}',
            r"line 2, field 'annotations.detection.box_labels': 0 labels for 1 boxes",
        ),
        (
            '{"image": "images/train_00001.npy", "annotations": {"segmentation": {"mask": "masks/nope.png"}}}',
            r"line 2, field 'annotations.segmentation.mask': file .*nope.png does not exist",
        ),
        (
            '{"image": "images/train_00001.npy", "annotations": {"grade": {"label": 1, "pseudo": "yes"}}}',
            r"line 2, field 'annotations.grade.pseudo': expected true or false",
        ),
        (
            '{"image": "images/train_00001.npy", "split": "trian"}',
            r"line 2, field 'split': 'trian' is not one of \['train', 'val', 'test'\] \(did you mean 'train'\?\)",
        ),
    ],
)
def test_bad_entries_name_line_and_field(world, line, message):
    path = world.parent / "bad.jsonl"
    path.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=rf"bad.jsonl {message}"):
        read_manifest(path, tiny_tasks())


def test_mask_and_box_problems_found_at_load_name_line_and_field(world, tmp_path):
    (tmp_path / "images").symlink_to(world.parent / "images")
    cv2.imwrite(str(tmp_path / "bad.png"), np.full((64, 64), 7, np.uint8))
    (tmp_path / "m.jsonl").write_text(
        '{"image": "images/train_00000.npy", "annotations": {"segmentation": {"mask": "bad.png"}}}\n'
        '{"image": "images/train_00001.npy", "annotations": {"detection": '
        '{"boxes": [[10, 10, 70, 20]], "box_labels": [0]}}}\n'
    )
    tasks = {t.name: t for t in tiny_tasks()}
    builder = ImageCentricDataModule(str(tmp_path / "m.jsonl"), list(tasks.values())).builder
    records = read_manifest(tmp_path / "m.jsonl", list(tasks.values()))
    with pytest.raises(
        ManifestError, match=r"m.jsonl line 1 .*'annotations.segmentation'.*values \[7\] outside"
    ):
        ManifestTaskDataset(records, "segmentation", builder)[0]
    with pytest.raises(
        ManifestError, match=r"m.jsonl line 2 .*'annotations.detection'.*beyond the 64x64 image"
    ):
        ManifestTaskDataset(records, "detection", builder)[0]


# ------------------------------------------------------------------ datasets and views


def test_manifest_cases_equal_the_synthetic_datasets(world):
    records = read_manifest(world, tiny_tasks())
    builder = ImageCentricDataModule(str(world), tiny_tasks()).builder
    for name, family in FAMILIES.items():
        ours = ManifestTaskDataset([r for r in records if r.split == "val"], name, builder)
        theirs = SyntheticTaskDataset("radiograph", family, split="val", num_samples=4, image_size=64)
        for i in (0, 3):
            a, b = ours[i], theirs[i]
            assert a["pseudo"] is False
            for key, value in b.items():
                torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(value), rtol=0, atol=1e-6)


def test_augmentation_moves_every_task_s_mask_and_boxes_with_the_image_in_one_draw(world):
    """IMAX cases go through the readers' pipeline: one draw of the training augmentation moves
    the image and the targets of all its tasks together; evaluation splits are not augmented."""
    tasks = tiny_tasks()
    datamodule = ImageCentricDataModule(str(world), tasks, batch_size=4, transform=[{"name": "HorizontalFlip", "p": 1.0}])
    record = next(r for r in read_manifest(world, tasks) if r.split == "train" and len(r.annotations[NAMES[3]].boxes))
    plain_image, plain = datamodule.builder_for("val").case(record, NAMES)
    image, flipped = datamodule.builder_for("train").case(record, NAMES)
    torch.testing.assert_close(image, plain_image.flip(-1), rtol=0, atol=0)
    assert torch.equal(flipped["segmentation"]["mask"], plain["segmentation"]["mask"].flip(-1))
    width = image.shape[-1]
    boxes = plain["detection"]["boxes"]
    mirrored = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(flipped["detection"]["boxes"], mirrored)
    assert torch.equal(flipped["detection"]["box_labels"], plain["detection"]["box_labels"])
    for name in ("grade", "objects"):  # image-level targets are not spatial
        assert torch.equal(flipped[name]["label"], plain[name]["label"])
    # the image-centric training dataset draws them; its evaluation views do not
    datamodule.setup("fit")
    assert datamodule.image_dataset.builder.train and not datamodule.builder.train


def test_a_manifest_image_and_a_reader_s_image_become_the_same_case(tmp_path):
    """One path from stored pixels to a case: the same PNG and mask through an IMAX manifest and
    through SegmentationDataset give bitwise the same image and mask (same scaling and size)."""
    import cv2

    from umedpt.data.imax import Annotation, ImageRecord, write_manifest
    from umedpt.data.readers import SegmentationDataset

    rng = np.random.default_rng(0)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "train" / "a.png"), rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "train" / "a.png"), rng.integers(0, 3, (48, 40), dtype=np.uint8))
    task = Task(name="seg", kind="segmentation", num_classes=3)
    write_manifest([ImageRecord(id="a", image="images/train/a.png", split="train", line=1,
                                annotations={"seg": Annotation(mask="masks/train/a.png")})],
                   tmp_path / "m.jsonl", source_root=tmp_path)  # fmt: skip
    imax = ImageCentricDataModule(str(tmp_path / "m.jsonl"), [task], image_size=32, normalize="auto").builder
    image, targets = imax.case(read_manifest(tmp_path / "m.jsonl", [task])[0], ["seg"])
    reader = SegmentationDataset(str(tmp_path / "images"), str(tmp_path / "masks"), split="train", num_classes=3,
                                 image_size=32, normalize="auto")[0]  # fmt: skip
    assert torch.equal(image, reader["image"])
    assert torch.equal(targets["seg"]["mask"], torch.as_tensor(reader["mask"]))


def test_views_give_equal_label_budgets_on_nested_image_sets(world):
    records = read_manifest(world)
    imax, dmax = imax_view(records, NAMES, 2), dmax_view(records, NAMES, 2)
    budget = {n: {"real": 2, "pseudo": 0} for n in NAMES}
    assert annotation_counts(imax) == annotation_counts(dmax) == budget
    imax_train = [r for r in imax if r.split == "train"]
    dmax_train = [r for r in dmax if r.split == "train"]
    assert len(imax_train) == 2 and all(set(r.annotations) == set(NAMES) for r in imax_train)
    assert len({r.id for r in dmax_train}) == 8 and all(len(r.annotations) == 1 for r in dmax_train)
    assert {r.id for r in imax_train} < {r.id for r in dmax_train}
    assert [r for r in imax if r.split != "train"] == [r for r in records if r.split != "train"]
    with pytest.raises(ValueError, match="has 8 train images; this view needs 12"):
        dmax_view(records, NAMES, 3)


def test_image_centric_batch_shares_one_image_and_flags_missing_annotations(world):
    batch = image_batch(world, drop={"segmentation": [1, 2], "grade": [0]})
    assert list(batch) == NAMES
    assert len({id(b["image"]) for b in batch.values()}) == 1
    assert batch["segmentation"]["present"].tolist() == [True, False, False, True]
    assert batch["grade"]["present"].tolist() == [False, True, True, True]
    assert (batch["segmentation"]["mask"][1] == 255).all()  # placeholder: every pixel ignored
    assert not batch["grade"]["pseudo"].any()


@pytest.mark.parametrize("workers", [0, 1])
def test_data_module_image_sampling_keeps_images_shared_through_workers(world, workers):
    data = ImageCentricDataModule(str(world), tiny_tasks(), batch_size=4, num_workers=workers)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len({id(b["image"]) for b in batch.values()}) == 1
    moved = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert len({id(b["image"]) for b in moved.values()}) == 1 and moved["grade"]["image"].is_meta
    assert moved["grade"]["present"].device.type == "cpu"  # flags stay on the host
    assert [len(dl.dataset) for dl in data.val_dataloader()] == [4, 4, 4, 4]


def test_data_module_task_sampling_and_validation_use_real_labels_only(world, tmp_path):
    records = dmax_view(read_manifest(world), NAMES, 2)
    val = next(r for r in records if r.split == "val")
    val.annotations["grade"] = Annotation(label=0, pseudo=True)
    path = write_manifest(records, tmp_path / "dmax.jsonl", source_root=world.parent)
    data = ImageCentricDataModule(str(path), tiny_tasks(), sampling="task")
    data.setup("fit")
    batch, _, _ = next(iter(data.train_dataloader()))
    assert list(batch) == NAMES and len({id(b["image"]) for b in batch.values()}) == 4
    assert [len(data.datasets["train"][n]) for n in NAMES] == [2, 2, 2, 2]
    assert len(data.datasets["val"]["grade"]) == 3  # the pseudo-labelled val image is left out
    data = ImageCentricDataModule(
        str(path), [*tiny_tasks(), Task(name="other", kind="classification", num_classes=2)]
    )
    with pytest.raises(ValueError, match=r"task 'other': manifest .*dmax.jsonl has no train image annotated"):
        data.setup("fit")


# ------------------------------------------------------------------ the image-centric step


def test_image_centric_gradient_equals_sum_of_separate_task_losses(world):
    batch = image_batch(world)
    model = make_module()
    reference = copy.deepcopy(model)
    losses = model.accumulate(batch)
    # each task separately through MultiTaskModule's own task loss: one encoder pass per task
    separate = {n: MultiTaskModule.task_loss(reference, n, batch[n]) for n in NAMES}
    sum(separate.values()).backward()
    for name in NAMES:
        torch.testing.assert_close(losses[name], separate[name].detach(), rtol=1e-5, atol=1e-6)
    assert assert_same_gradients(model, reference) >= len(list(model.encoder.parameters()))


def test_missing_annotations_do_not_count_in_a_task_loss(world):
    drop = {"grade": [0, 3], "segmentation": [1], "detection": [0, 1, 2, 3]}
    batch = image_batch(world, drop=drop)
    model = make_module()
    reference = copy.deepcopy(model)
    losses = model.accumulate(batch)
    total = 0
    for name in NAMES:
        keep = [i for i in range(4) if i not in drop.get(name, [])]
        if keep:
            total = total + MultiTaskModule.task_loss(reference, name, select_samples(batch[name], keep))
    total.backward()
    assert float(losses["detection"]) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.heads["detection"].parameters())
    assert_same_gradients(model, reference)


def test_per_task_mode_gives_the_same_gradients_as_image_centric(world):
    batch = image_batch(world, drop={"objects": [2]})
    a, b = make_module(), make_module(step_mode="per_task")
    a.accumulate(batch)
    b.accumulate(batch)
    assert_same_gradients(a, b)


def count_encoder_calls(model: ImageCentricModule, batch: dict[str, Any]) -> int:
    calls = []
    handle = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    model.accumulate(batch)
    handle.remove()
    return len(calls)


def test_encoder_runs_once_per_image_batch(world):
    batch = image_batch(world)
    assert count_encoder_calls(make_module(), batch) == 1
    assert count_encoder_calls(make_module(step_mode="per_task"), batch) == 4
    # tasks with their own images (decentralised batches): one pass per task
    separate = {n: {**b, "image": b["image"].clone()} for n, b in batch.items()}
    assert count_encoder_calls(make_module(), separate) == 4
    # two groups: grade+objects share one tensor, segmentation+detection another
    mixed = {
        n: {**b, "image": separate["grade" if i < 2 else "detection"]["image"]}
        for i, (n, b) in enumerate(batch.items())
    }
    assert count_encoder_calls(make_module(), mixed) == 2


def test_pseudo_weight_scales_the_loss_of_pseudo_samples(world):
    batch = image_batch(world)
    model = make_module(pseudo_weight={"grade": 0.25, "segmentation": 0.5})
    feats = model.encode(batch["grade"]["image"])

    def loss(name: str, pseudo: list[bool]) -> torch.Tensor:
        task_batch = {**batch[name], "pseudo": torch.tensor(pseudo)}
        return model.head_loss(name, feats, (64, 64), task_batch)

    for name, weight in (("grade", 0.25), ("segmentation", 0.5), ("objects", 1.0)):
        real, pseudo = loss(name, [False] * 4), loss(name, [True] * 4)
        torch.testing.assert_close(pseudo, weight * real)
        # mixed: (n_real * L_real + w * n_pseudo * L_pseudo) / n, each part on its own samples
        mixed = loss(name, [True, False, True, False])
        parts = [
            MultiTaskModule.task_loss(model, name, select_samples(batch[name], rows))
            for rows in ([1, 3], [0, 2])
        ]
        torch.testing.assert_close(mixed, (2 * parts[0] + weight * 2 * parts[1]) / 4, rtol=1e-5, atol=1e-6)
    off = make_module(pseudo_weight=0.0)
    all_pseudo = {**batch["grade"], "pseudo": torch.ones(4, dtype=torch.bool)}
    assert float(off.head_loss("grade", feats, (64, 64), all_pseudo).detach()) == 0.0


def test_nonfinite_task_loss_in_an_image_group_raises_or_is_skipped(world):
    batch = image_batch(world)
    model = make_module()
    model.heads["segmentation"].loss = lambda outputs, b: outputs.sum() * float("nan")  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match=r"segmentation.*step 0"):
        model.accumulate(batch)
    model = make_module(nonfinite="skip")
    model.heads["segmentation"].loss = lambda outputs, b: outputs.sum() * float("inf")  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="segmentation"):
        losses = model.accumulate(batch)
    assert float(losses["segmentation"]) == 0.0 and float(losses["grade"]) > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.encoder.parameters())


def test_pseudo_weight_is_checked_and_saved():
    with pytest.raises(ValueError, match=r"pseudo_weight names unknown tasks \['nope'\]"):
        make_module(pseudo_weight={"nope": 1.0})
    with pytest.raises(ValueError, match="pseudo_weight must be >= 0"):
        make_module(pseudo_weight=-1.0)
    model = make_module(pseudo_weight=0.3, step_mode="per_task")
    assert model.hparams.pseudo_weight == 0.3 and model.hparams.step_mode == "per_task"
    assert model.hparams.tasks[0]["name"] == "grade"  # MultiTaskModule's hyper-parameters kept


# ------------------------------------------------------------------ configs through the CLI


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_imax_and_dmax_configs_run_through_the_cli(tmp_path):
    root = tmp_path / "syn"
    world = make_world(root)
    records = read_manifest(world)
    for name, view in (("imax", imax_view), ("dmax", dmax_view)):
        write_manifest(view(records, NAMES, 2), root / f"{name}.jsonl")
    common = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
    cli = main(
        [
            "fit",
            "-c",
            str(CONFIGS / "imax_quick.yaml"),
            "--data.init_args.manifest",
            str(root / "imax.jsonl"),
            "--data.init_args.batch_size",
            "2",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.check_val_every_n_epoch",
            "2",
            *common,
        ]
    )
    assert type(cli.model) is ImageCentricModule and cli.trainer.global_step == 2
    assert [t.name for t in cli.datamodule.tasks] == cli.model.task_names == NAMES  # interpolated
    assert "val/segmentation/dice" in cli.trainer.callback_metrics
    stacked = main(
        ["-c", str(CONFIGS / "imax_quick.yaml"), "-c", str(CONFIGS / "dmax_quick.yaml"), *common], run=False
    )
    assert stacked.datamodule.sampling == "task" and stacked.datamodule.manifest.name == "dmax.jsonl"
    assert [t.name for t in stacked.datamodule.tasks] == NAMES
    saved = json.loads(json.dumps(cli.datamodule.hparams))
    assert saved["image_size"] == 64 and saved["manifest"].endswith("imax.jsonl")


def test_record_defaults_and_forms():
    record = ImageRecord("a.png", annotations={"g": Annotation(label=1, pseudo=True, score=0.5)})
    assert record.id == "a.png" and record.split == "train"
    assert record.to_dict() == {
        "image": "a.png",
        "split": "train",
        "id": "a.png",
        "annotations": {"g": {"label": 1, "pseudo": True, "score": 0.5}},
    }


def test_manifest_and_task_data_errors_are_data_errors(tmp_path):
    from umedpt.data import TaskDataError
    from umedpt.data.problems import DataError
    from umedpt.data.readers.problems import DataError as OldPath

    assert OldPath is DataError and issubclass(TaskDataError, DataError)
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "split": "trian"}\n')
    with pytest.raises(DataError, match=r"m.jsonl line 1, field 'split'") as caught:
        read_manifest(path)
    assert isinstance(caught.value, ManifestError) and isinstance(caught.value, ValueError)
