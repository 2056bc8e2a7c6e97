"""Self-supervised kinds: masking, the masked-pixel loss, the EMA teacher, and fits that learn."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from heads.ssl import FeatureReconstructionHead, MaskedImageHead, random_patch_mask
from tests.conftest import TINY_ENCODER, fit_config, synthetic_task
from umedpt import MultiTaskModule, SwinEncoder, Task
from umedpt.cli import main
from umedpt.data import MultiTaskDataModule
from umedpt.data.readers import ImageCollectionDataset
from umedpt.data.synthetic import SyntheticTaskDataset
from umedpt.kinds import SSL_KINDS, get_kind


def tiny_encoder() -> SwinEncoder:
    return SwinEncoder(**TINY_ENCODER).eval()


def ssl_task(name: str, kind: str, style: str = "histology", family: str = "grade", **kw) -> Task:
    return Task(
        name=name, kind=kind,
        data={"class_path": "umedpt.data.synthetic.SyntheticTaskDataset", "init_args": {"style": style, "family": family}},
        **kw,
    )


def test_ssl_kinds_are_image_only_and_need_no_classes():
    assert SSL_KINDS == ("mim", "feature_mim")
    assert get_kind("mim").image_only and get_kind("feature_mim").image_only
    assert not get_kind("classification").image_only
    assert Task(name="m", kind="mim").num_classes == 1
    with pytest.raises(ValueError, match="task 'c': num_classes is required for kind 'classification'"):
        Task(name="c", kind="classification")


def test_an_ssl_task_takes_the_images_of_a_dataset_of_any_kind():
    # a detection world and a classification world serve masked image modelling: their labels are ignored
    tasks = [ssl_task("det_mim", "mim", "radiograph", "detection", batch_size=4),
             ssl_task("grade_feat", "feature_mim", "ct", "grade", batch_size=4)]
    dm = MultiTaskDataModule(tasks=tasks, dataset_defaults={"image_size": 64, "num_samples": 8})
    dm.setup("fit")
    assert all(dm.spec_errors(t, "train", dm.build_dataset(t, "train")) == [] for t in tasks)
    batch = next(iter(dm.train_dataloader()))[0]  # CombinedLoader: (batch, index, loader index)
    assert batch["det_mim"]["image"].shape == (4, 3, 64, 64)


def test_random_patch_mask_hides_exactly_the_ratio_of_whole_patches():
    g = torch.Generator().manual_seed(0)
    mask = random_patch_mask(5, (16, 16), 2, 0.6, generator=g)
    assert mask.shape == (5, 16, 16) and mask.dtype == torch.bool
    cells = mask.view(5, 8, 2, 8, 2)
    # each 2 x 2 cell is hidden or seen as a whole
    assert torch.equal(cells.all(dim=4).all(dim=2), cells.any(dim=4).any(dim=2))
    # round(0.6 * 64) = 38 of the 64 cells in every image, in different places per image
    assert cells.all(dim=4).all(dim=2).sum(dim=(1, 2)).tolist() == [38] * 5
    assert not torch.equal(mask[0], mask[1])
    # a grid that the cells do not divide: cut at the edge, still that many cells drawn
    assert random_patch_mask(2, (15, 13), 4, 0.5).shape == (2, 15, 13)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        random_patch_mask(1, (4, 4), 1, 1.0)


def test_the_encoder_without_mask_is_unchanged_and_hidden_pixels_do_not_reach_it():
    encoder = tiny_encoder()
    x = torch.randn(2, 3, 64, 64)
    token = torch.randn(encoder.out_channels[0])
    grid = encoder.token_grid((64, 64))
    assert grid == (16, 16)
    with torch.no_grad():
        plain = encoder(x)
        nothing_hidden = encoder(x, mask=torch.zeros(2, *grid, dtype=torch.bool), mask_token=token)
        assert all(torch.equal(a, b) for a, b in zip(plain, nothing_hidden, strict=True))
        mask = random_patch_mask(2, grid, 2, 0.6, generator=torch.Generator().manual_seed(1))
        masked = encoder(x, mask=mask, mask_token=token)
        # the patch embedding is a non-overlapping convolution and the token replaces its output:
        # new pixel values under the hidden patches change no output of any level
        pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(x)
        changed = torch.where(pixels, torch.randn_like(x) * 5, x)
        again = encoder(changed, mask=mask, mask_token=token)
        assert all(torch.equal(a, b) for a, b in zip(masked, again, strict=True))
        # ... while the same change without the mask changes every level
        assert all(not torch.allclose(a, b) for a, b in zip(plain, encoder(changed), strict=True))
    with pytest.raises(ValueError, match="a mask needs a mask_token"):
        encoder(x, mask=mask)
    with pytest.raises(ValueError, match=r"expected \(2, 16, 16\)"):
        encoder(x, mask=mask[:, :8], mask_token=token)
    # the encoder's weights are the same whether or not it is ever masked: exports do not change
    assert "mask_token" not in " ".join(encoder.state_dict())


def test_the_masked_pixel_loss_ignores_the_pixels_that_were_seen():
    encoder = tiny_encoder()
    head = MaskedImageHead(encoder.out_channels, encoder.reductions, mask_patch_size=8)
    x = torch.randn(3, 3, 64, 64)
    out = head.forward_image(encoder, x)
    seen = out.pixel_mask.expand_as(x) == 0
    assert 0.55 < float(out.pixel_mask.mean()) < 0.65  # 38 of 64 squares of 8 px
    loss = head.loss(out, {"image": x})
    # targets changed where the encoder saw the image: the loss is the same ...
    other = torch.where(seen, torch.randn_like(x), x)
    assert torch.allclose(head.loss(out, {"image": other}), loss)
    # ... and changed under the hidden squares it is not
    hidden = torch.where(seen, x, torch.randn_like(x))
    assert not torch.allclose(head.loss(out, {"image": hidden}), loss)
    # the hand-written masked L1 of normalised 8 x 8 patches
    target = x.reshape(3, 3, 8, 8, 8, 8)
    target = (target - target.mean(dim=(1, 3, 5), keepdim=True)) / (target.var(dim=(1, 3, 5), keepdim=True, unbiased=False) + 1e-6).sqrt()
    target = target.reshape(3, 3, 64, 64)
    m = out.pixel_mask.expand_as(x)
    expected = ((out.reconstruction - target).abs() * m).sum() / m.sum()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_fresh_ssl_losses_are_about_one_after_scaling():
    encoder = SwinEncoder(**TINY_ENCODER)
    images = torch.stack([SyntheticTaskDataset("dermoscopy", "grade", image_size=64, num_samples=8)[i]["image"] for i in range(8)])
    mim = MaskedImageHead(encoder.out_channels, encoder.reductions)
    feat = FeatureReconstructionHead(encoder.out_channels, encoder.reductions)
    feat.attach(encoder)
    with torch.no_grad():
        scaled = [float(h.loss(h.forward_image(encoder, images), {"image": images})) * h.default_loss_scale for h in (mim, feat)]
    assert all(0.7 < s < 1.3 for s in scaled), scaled
    assert mim.default_loss_scale == pytest.approx(math.sqrt(math.pi / 2))


def test_the_teacher_gets_no_gradient_follows_the_encoder_by_ema_and_is_saved():
    tasks = [Task(name="feat", kind="feature_mim", head_args={"momentum": 0.9}),
             Task(name="grade", kind="classification", num_classes=3)]
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER))
    head = model.heads["feat"]
    assert head.level == 1  # the finest level whose stride (8) covers a hidden square of 8 px
    teacher = dict(head.teacher.named_parameters())
    # the teacher starts as the encoder and is not trained
    assert all(torch.equal(teacher[n], p) for n, p in model.encoder.named_parameters())
    assert all(not p.requires_grad for p in teacher.values())
    optimizer, _ = model.build_optimizer(10)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.values()}
    model.train()
    x = torch.randn(4, 3, 64, 64)
    model.accumulate({"feat": {"image": x}, "grade": {"image": x, "label": torch.tensor([0, 1, 2, 0])}})
    assert all(p.grad is None for p in teacher.values())
    assert head.mask_token.grad is not None and model.encoder.model.patch_embed.proj.weight.grad is not None
    before = {n: t.detach().clone() for n, t in teacher.items()}
    optimizer.step()
    student = dict(model.encoder.named_parameters())
    assert any(not torch.equal(before[n], student[n]) for n in before)
    head.after_step(model.encoder)
    for name, value in head.teacher.named_parameters():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * student[name], atol=1e-7), name
    # the teacher is part of the module's state: checkpoints carry it and restore it exactly
    state = model.state_dict()
    assert any(k.startswith("heads.feat.teacher.") for k in state)
    fresh = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.heads["feat"].teacher.parameters(), head.teacher.parameters(), strict=True))


def test_ssl_and_supervised_tasks_in_one_step_give_the_gradient_of_the_summed_loss():
    tasks = [Task(name="mim", kind="mim"), Task(name="feat", kind="feature_mim"),
             synthetic_task("grade", "radiograph", "grade", "classification", 3)]
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER))
    g = torch.Generator().manual_seed(0)
    batch = {name: {"image": torch.randn(4, 3, 64, 64, generator=g)} for name in ("mim", "feat", "grade")}
    batch["grade"]["label"] = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(5)  # the masks are drawn from torch's generator, in task order
    model.accumulate(batch)
    looped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    sum(model.task_loss(name, batch[name]) for name in ("mim", "feat", "grade")).backward()
    summed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert looped.keys() == summed.keys()
    assert any(n.startswith("heads.mim.") for n in looped) and any(n.startswith("heads.feat.") for n in looped)
    for name in summed:
        assert torch.allclose(looped[name], summed[name], atol=1e-6, rtol=1e-5), name


def _ssl_config(tmp_path: Path, steps: int) -> Path:
    def task(name: str, kind: str, family: str) -> dict:
        return {"name": name, "kind": kind, "batch_size": 16,
                "data": {"class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
                         "init_args": {"style": "ct", "family": family}}}

    data = {"num_workers": 0,
            "dataset_defaults": {"image_size": 64, "num_samples": {"train": 256, "val": 32, "test": 32}, "cache": True}}
    tasks = [task("ct_mim", "mim", "segmentation"), task("ct_feature", "feature_mim", "grade")]
    return fit_config(tmp_path / "ssl.yaml", steps, TINY_ENCODER, tasks, data, lr=2.0e-3, warmup_steps=0.1)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_an_ssl_only_fit_through_the_cli_lowers_both_losses(tmp_path):
    config = _ssl_config(tmp_path, steps=150)
    before = main(["validate", "-c", str(config)])
    untrained = json.loads((Path(before.trainer.log_dir) / "metrics_val.json").read_text())["tasks"]
    fitted = main(["fit", "-c", str(config)])
    run = Path(fitted.trainer.log_dir)
    after = json.loads((run / "metrics_val.json").read_text())["tasks"]
    mim_before, mim_after = untrained["ct_mim"]["metrics"]["l1"], after["ct_mim"]["metrics"]["l1"]
    feat_before, feat_after = untrained["ct_feature"]["metrics"]["distance"], after["ct_feature"]["metrics"]["distance"]
    assert after["ct_mim"]["kind"] == "mim"
    assert mim_after < 0.85 * mim_before, (mim_before, mim_after)
    assert feat_after < 0.85 * feat_before, (feat_before, feat_after)
    # the exported encoder is a plain encoder (no mask token, no teacher)
    exported = run / "encoder"
    assert (exported / "model.safetensors").exists() or any(exported.iterdir())



def _ssl_mix(init_seed: int = 0) -> tuple[MultiTaskModule, MultiTaskDataModule]:
    torch.manual_seed(init_seed)
    tasks = [synthetic_task("grade", "radiograph", "grade", "classification", 3, batch_size=8),
             ssl_task("ct_mim", "mim", "ct", batch_size=8),
             ssl_task("ct_feature", "feature_mim", "ct", batch_size=8, head_args={"momentum": 0.9})]
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER), export_encoder=False)
    data = MultiTaskDataModule(tasks=tasks, num_workers=0, dataset_defaults={"image_size": 64, "num_samples": 16})
    return model, data


def test_a_run_with_ssl_tasks_resumed_from_a_checkpoint_is_the_uninterrupted_run(tmp_path):
    """Masks, the teacher's EMA and its weights all come back: bitwise the same final state."""
    from tests.test_train import StopAndSave, trainer

    full, data = _ssl_mix()
    trainer(tmp_path / "full", max_epochs=4).fit(full, data)
    ckpt = tmp_path / "half.ckpt"
    first, data = _ssl_mix()
    trainer(tmp_path / "first", max_epochs=4, callbacks=[StopAndSave(2, ckpt)]).fit(first, data)
    torch.manual_seed(999)
    resumed, data = _ssl_mix(init_seed=123)
    trainer(tmp_path / "resumed", max_epochs=4).fit(resumed, data, ckpt_path=ckpt)
    assert resumed.global_step == full.global_step == 8
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert any(k.startswith("heads.ct_feature.teacher.") for k in full_state)
    for key, value in full_state.items():
        assert torch.equal(resumed_state[key], value), key
    # the teacher moved during the run, and differs from the encoder it follows
    teacher = full.heads["ct_feature"].teacher.state_dict()
    assert not torch.equal(teacher["model.patch_embed.proj.weight"], first.heads["ct_feature"].teacher.state_dict()["model.patch_embed.proj.weight"])
    assert not torch.equal(teacher["model.patch_embed.proj.weight"], full.encoder.state_dict()["model.patch_embed.proj.weight"])

# ------------------------------------------------------------------ unlabelled image collections
def _collection(root: Path) -> list[Path]:
    """Real files in nested folders: scikit-image photographs (RGB JPEG, RGB and grey PNG) and
    pydicom's MR files (one single-frame, one enhanced MR with 10 frames)."""
    from pydicom.data import get_testdata_file

    from tests.test_real_files import skimage_file

    files = []
    for sub, name in (("photos", "retina.jpg"), ("photos", "ihc.png"), ("photos/grey", "cell.png"),
                      ("photos/grey", "camera.png"), ("photos", "coffee.png"), ("photos", "astronaut.png")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        files.append(Path(shutil.copy(skimage_file(name), root / sub / name)))
    for name in ("MR_small.dcm", "emri_small.dcm"):
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.fail(f"pydicom test file {name} is not installed: pip install -e '.[dev]' brings pydicom-data")
        (root / "mr").mkdir(exist_ok=True)
        files.append(Path(shutil.copy(path, root / "mr" / name)))
    (root / "notes.txt").write_text("not an image")
    return files


def test_an_image_collection_reads_folders_globs_and_lists_into_disjoint_splits(tmp_path):
    files = _collection(tmp_path / "archive")
    held = {"val": 0.25, "test": 0.25}
    splits = {s: ImageCollectionDataset(str(tmp_path / "archive"), s, held_out=held, image_size=32) for s in ("train", "val", "test")}
    sources = {s: {d.source(i) for i in range(len(d))} for s, d in splits.items()}
    # every image exactly once (the 10 frames of the enhanced MR are 10 samples), no text file
    assert sum(len(v) for v in sources.values()) == len(files) - 1 + 10
    assert not sources["train"] & sources["val"] and not sources["train"] & sources["test"] and not sources["val"] & sources["test"]
    assert all(sources.values()), sources
    case = splits["train"][0]
    assert set(case) == {"image"} and case["image"].shape == (3, 32, 32) and torch.isfinite(case["image"]).all()
    # a file keeps its split when the collection grows
    shutil.copy(files[0], tmp_path / "archive" / "photos" / "copy.jpg")
    grown = ImageCollectionDataset(str(tmp_path / "archive"), "train", held_out=held, image_size=32)
    assert sources["train"] <= {grown.source(i) for i in range(len(grown))}
    # a glob pattern and a list file
    pngs = ImageCollectionDataset(str(tmp_path / "archive" / "**" / "*.png"), "train", held_out={}, image_size=32)
    assert len(pngs) == 5 and all(pngs.source(i).endswith(".png") for i in range(len(pngs)))
    listing = tmp_path / "archive" / "list.txt"
    listing.write_text("# two images\nphotos/ihc.png\n\nmr/MR_small.dcm\n")
    listed = ImageCollectionDataset(str(listing), "train", held_out={}, image_size=32)
    assert [Path(listed.source(i)).name for i in range(len(listed))] == ["ihc.png", "MR_small.dcm"]
    with pytest.raises(ValueError, match="serve the image-only kinds, not 'classification'"):
        ImageCollectionDataset(str(tmp_path / "archive"), kind="classification")
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        ImageCollectionDataset(str(tmp_path / "nowhere"))


def test_an_image_collection_gives_one_sample_per_slice_of_its_nifti_volumes(tmp_path):
    import nibabel as nib
    from nibabel.testing import data_path

    from umedpt.data.readers.volume import volume_slice

    archive = tmp_path / "scans"
    archive.mkdir()
    for name in ("anatomical.nii", "standard.nii.gz", "example4d.nii.gz"):  # 3D, 3D compressed, a 4D series
        shutil.copy(Path(data_path) / name, archive / name)
    axial = ImageCollectionDataset(str(archive), "train", held_out={}, image_size=32)
    # canonical axial slices: 25 of the anatomical volume, 7 of the standard one; the 4D series is skipped, with a note
    assert len(axial) == 25 + 7
    assert sorted({axial.source(i).split(" [")[0] for i in range(len(axial))}) == [
        str(archive / "anatomical.nii"), str(archive / "standard.nii.gz")]
    assert [str(n.source) for n in axial.notes] == [str(archive / "example4d.nii.gz")]
    assert "4D series" in axial.notes[0].message
    for i in (0, 13, 30):
        path, k = axial.items[i].image, axial.slices[i]
        assert axial.source(i) == f"{path} [slice {k}]"
        image, _ = axial.read(i)
        np.testing.assert_array_equal(image, volume_slice(nib.load(path), 2, k))
        case = axial[i]
        assert case["image"].shape == (3, 32, 32) and torch.isfinite(case["image"]).all()
    sagittal = ImageCollectionDataset(str(archive), "train", held_out={}, image_size=32, volume_axis=0)
    assert len(sagittal) == 33 + 4
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2, got 3"):
        ImageCollectionDataset(str(archive), "train", volume_axis=3)


def test_an_image_collection_trains_an_ssl_task_and_passes_the_data_check(tmp_path, capsys):
    from umedpt.data.check import main as check_main

    _collection(tmp_path / "archive")
    spec = {"name": "archive_mim", "kind": "mim", "batch_size": 2,
            "data": {"class_path": "umedpt.data.readers.ImageCollectionDataset",
                     "init_args": {"root": str(tmp_path / "archive"), "held_out": {"val": 0.2, "test": 0.2}}}}
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump({"model": {"tasks": [spec]}, "data": {"dataset_defaults": {"image_size": 64}}}))
    assert check_main(["check", "-c", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["tasks"][0]["kind"] == "mim"
    dm = MultiTaskDataModule(tasks=[Task(**spec)], dataset_defaults={"image_size": 64})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]["archive_mim"]
    model = MultiTaskModule(tasks=[Task(**spec)], encoder=SwinEncoder(**TINY_ENCODER))
    losses = model.accumulate({"archive_mim": batch})
    assert 0.3 < float(losses["archive_mim"]) < 2.0


# ------------------------------------------------------------------ TD-Calib
def test_calibration_trains_a_copy_on_the_task_images_and_is_probed_beside_the_original(tmp_path):
    from umedpt import save_encoder
    from umedpt.probe import main as probe_main
    from umedpt.probe.calibrate import Calibration, calibrate
    from umedpt.probe.encoders import ProbeError

    torch.manual_seed(3)
    encoder = SwinEncoder(**TINY_ENCODER).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    images = SyntheticTaskDataset("histology", "dominant", "train", num_samples=64, image_size=64, channels=1)
    calibrated, record = calibrate(encoder, images, Calibration(steps=40, batch_size=16, lr=1e-3))
    # the given encoder is untouched, the copy has moved, and both SSL losses fell
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in calibrated.state_dict().items())
    first_last = record["loss_first_last"]
    assert set(first_last) == {"calibrate_mim", "calibrate_feature_mim"} and record["images"] == 640
    assert all(last < first for first, last in first_last.values()), first_last
    with pytest.raises(ProbeError, match="'classification' is not a self-supervised"):
        Calibration(kinds=["classification"])

    # through `umedpt probe`: the calibrated copy of each chosen encoder is probed as <name>+calib
    path = save_encoder(encoder, tmp_path / "encoder")
    config = {
        "encoders": {"pretrained": str(path), "random": "random"},
        "tasks": [{"name": "hist_dominant", "kind": "classification", "num_classes": 5,
                   "data": {"class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
                            "init_args": {"style": "histology", "family": "dominant", "num_samples": 60}}}],
        "fractions": [1.0], "seeds": [0], "scratch": None, "progress": False, "cache_dir": None,
        "dataset_defaults": {"image_size": 64},
        "calibrate": {"steps": 5, "batch_size": 8, "encoders": ["pretrained"]},
        "output_dir": str(tmp_path / "probe"),
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(config))
    assert probe_main(["-c", str(tmp_path / "probe.yaml")]) == 0
    task = json.loads((tmp_path / "probe" / "version_0" / "report.json").read_text())["tasks"]["hist_dominant"]
    assert list(task["summary"]) == ["pretrained", "pretrained+calib", "random"]
    assert task["calibration"]["pretrained"]["steps"] == 5
    config["calibrate"]["encoders"] = ["missing"]
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(config))
    assert probe_main(["-c", str(tmp_path / "probe.yaml")]) != 0
