"""Pseudo-IMAX stage 2: cross-task pseudo labels (``umedpt pseudo-label``) and their use in stage 3."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_imax import NAMES, make_module, make_world, tiny_tasks
from umedpt.cli import main
from umedpt.commands.pseudo import Thresholds, pseudo_label
from umedpt.data.imax import (
    ImageCentricDataModule,
    annotation_counts,
    dmax_view,
    read_manifest,
    write_manifest,
)
from umedpt.data.readers import read_image
from umedpt.testing import quiet_trainer


@pytest.fixture(scope="module")
def dmax(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DMAX view (2 train images per task, 8 in all) of a tiny world."""
    root = tmp_path_factory.mktemp("world")
    world = make_world(root)
    return write_manifest(dmax_view(read_manifest(world), NAMES, 2), root / "dmax.jsonl")


def confident_model():
    """A model whose heads give spread-out confidences (fresh heads predict uniform probabilities)."""
    model = make_module()
    torch.manual_seed(1)
    with torch.no_grad():
        for name in ("grade", "objects"):
            model.heads[name].fc.weight.normal_(0, 3.0)
        model.heads["segmentation"].classifier.weight.normal_(0, 0.1)
        model.heads["detection"].fcos.head.classification_head.cls_logits.bias.zero_()
    return model.eval()


def midpoint_threshold(values: list[float]) -> float:
    """A threshold between the two middle values, so about half pass and none sits on the edge."""
    ordered = sorted(values)
    k = len(ordered) // 2
    return (ordered[k - 1] + ordered[k]) / 2


def test_pseudo_labels_only_above_threshold_and_marked(dmax, tmp_path):
    model = confident_model()
    records = read_manifest(dmax, tiny_tasks())
    builder = ImageCentricDataModule(str(dmax), tiny_tasks()).builder
    candidates = {n: [r for r in records if r.split == "train" and n not in r.annotations] for n in NAMES}
    assert all(len(c) == 6 for c in candidates.values())

    # the confidence of each candidate, computed straight from the heads (one batch per task)
    expected: dict[str, dict[str, tuple[object, object]]] = {n: {} for n in NAMES}
    with torch.no_grad():
        for name, recs in candidates.items():
            head = model.heads[name]
            images = torch.stack([builder.image(r)[0] for r in recs])
            out = head(model.encoder(images), (64, 64))
            if name == "grade":
                p = out.softmax(1)
                values = zip(p.max(1).values.tolist(), p.argmax(1).tolist(), strict=True)
            elif name == "objects":
                p = out.sigmoid()
                conf = torch.maximum(p, 1 - p).min(1).values.tolist()
                values = zip(conf, [(q >= 0.5).nonzero().flatten().tolist() for q in p], strict=True)
            elif name == "segmentation":
                values = zip(*out.softmax(1).max(1), strict=True)
            else:
                dets = head.predict(out)
                values = [(float(d["scores"].max()) if len(d["scores"]) else 0.0, d) for d in dets]
            expected[name] = {r.id: v for r, v in zip(recs, values, strict=True)}
    thresholds = Thresholds(
        classification=midpoint_threshold([v[0] for v in expected["grade"].values()]),
        multilabel=midpoint_threshold([v[0] for v in expected["objects"].values()]),
        segmentation=midpoint_threshold([float(c.max()) for c, _ in expected["segmentation"].values()]),
        detection=midpoint_threshold([v[0] for v in expected["detection"].values()]),
    )

    labelled, summary = pseudo_label(model, records, builder, tmp_path / "masks", thresholds, batch_size=4)

    by_id = {r.id: r for r in labelled}
    for original in records:  # real annotations, val and test images are untouched
        for name, a in original.annotations.items():
            assert by_id[original.id].annotations[name] == a and not a.pseudo
        if original.split != "train":
            assert by_id[original.id] == original
    for name in NAMES:
        threshold = getattr(thresholds, tiny_tasks()[NAMES.index(name)].kind)
        written = {i for i in expected[name] if name in by_id[i].annotations}
        if name == "segmentation":
            should = {i for i, (conf, _) in expected[name].items() if bool((conf >= threshold).any())}
        else:
            should = {i for i, (conf, _) in expected[name].items() if conf >= threshold}
        assert written == should and 0 < len(written) < 6, (name, threshold)
        assert summary[name]["candidates"] == 6 and summary[name]["written"] == len(written)
        for i in written:
            a = by_id[i].annotations[name]
            assert a.pseudo is True and a.score >= threshold - 1e-6
            conf, value = expected[name][i]
            if name == "grade":
                assert a.label == value and math.isclose(a.score, conf, rel_tol=1e-5)
            elif name == "objects":
                assert a.labels == value and math.isclose(a.score, conf, rel_tol=1e-5)
            elif name == "segmentation":
                mask = torch.from_numpy(read_image(builder.root / a.mask).astype(np.int64))
                sure = conf >= threshold
                assert torch.equal(mask[sure], value[sure]) and bool((mask[~sure] == 255).all())
                assert math.isclose(a.score, float(conf[sure].mean()), rel_tol=1e-5)
            else:
                keep = value["scores"] >= threshold
                torch.testing.assert_close(torch.tensor(a.boxes), value["boxes"][keep], atol=0.01, rtol=0)
                assert a.box_labels == value["labels"][keep].tolist()
                assert math.isclose(a.score, float(value["scores"][keep].min()), rel_tol=1e-5)


def test_pseudo_label_command_from_a_checkpoint_then_stage_3_data(dmax, tmp_path, capsys):
    # stage 1 (one step is enough to get a real Lightning checkpoint)
    model = make_module()
    data = ImageCentricDataModule(str(dmax), tiny_tasks(), sampling="task", image_size=64)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, data)
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)

    # stage 2, configured by a YAML file
    out = tmp_path / "pseudo" / "pseudo.jsonl"
    config = tmp_path / "pseudo.yaml"
    config.write_text(
        f"checkpoint: {ckpt}\nmanifest: {dmax}\noutput: {out}\n"
        "thresholds: {classification: 0.0, multilabel: 0.0, segmentation: 0.0, detection: 0.0}\n"
    )
    assert main(["pseudo-label", "-c", str(config), "--thresholds.detection", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert f"pseudo labels written to {out}" in printed and "segmentation" in printed
    labelled = read_manifest(out, tiny_tasks())  # paths rebased, every mask file exists
    counts = annotation_counts(labelled)
    for name in ("grade", "objects", "segmentation"):  # threshold 0: every candidate gets a label
        assert counts[name] == {"real": 2, "pseudo": 6}
    assert counts["detection"]["real"] == 2
    assert all(
        a.score >= 0.2 for r in labelled for n, a in r.annotations.items() if n == "detection" and a.pseudo
    )
    assert len(list((out.parent / "pseudo_masks").glob("*.png"))) == 6
    only = tmp_path / "only_grade.jsonl"
    assert main(["pseudo-label", "-c", str(config), "--output", str(only), "--tasks", "[grade]"]) == 0
    pseudo = {n for r in read_manifest(only, tiny_tasks()) for n, a in r.annotations.items() if a.pseudo}
    assert pseudo == {"grade"}
    with pytest.raises(ValueError, match=r"tasks \['nope'\] are not tasks of the model"):
        main(["pseudo-label", "-c", str(config), "--tasks", "[nope]"])

    # stage 3: the image-centric loader sees real and pseudo labels, flagged
    stage3 = ImageCentricDataModule(str(out), tiny_tasks(), batch_size=8)
    stage3.setup("fit")
    batch = next(iter(stage3.train_dataloader()))
    assert batch["grade"]["present"].all() and int(batch["grade"]["pseudo"].sum()) == 6
    assert [len(dl.dataset) for dl in stage3.val_dataloader()] == [4, 4, 4, 4]


def test_pseudo_label_help_and_bad_threshold(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pseudo-label", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--checkpoint" in text and "--thresholds" in text and "--config" in text
    with pytest.raises(ValueError, match=r"thresholds.detection must be in \[0, 1\], got 1.5"):
        Thresholds(detection=1.5)
