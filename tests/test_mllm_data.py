"""Prompts, the box format, the demo tokenizer, the synthetic instruction data and the batch sampler."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from umedpt.data.synthetic import GRADE_NAMES, SPLIT_OFFSETS, render_scene
from umedpt.mllm.data import (
    DatasetBatchSampler,
    InstructionDataset,
    collate_instructions,
    load_image,
    read_records,
)
from umedpt.mllm.llm import build_word_tokenizer
from umedpt.mllm.prompts import GRID, IMAGE_PLACEHOLDER, build_prompt, format_box, parse_box
from umedpt.mllm.synthetic import generate_instructions, synthetic_vocabulary


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = generate_instructions(
        root, {"train": 6, "test": 2}, styles=("radiograph", "histology"), image_size=64
    )
    return root, {split: read_records(path) for split, path in paths.items()}


def test_prompt_format():
    assert build_prompt("vqa", " is there a mass? ") == "<Img><ImageHere></Img> [vqa] is there a mass?"
    assert build_prompt("qa", "why?", has_image=False) == "[qa] why?"
    assert build_prompt("cls", "which?", template="[INST] {} [/INST]") == (
        "[INST] <Img><ImageHere></Img> [cls] which? [/INST]"
    )


def test_box_format_and_parse_round_trip():
    rng = random.Random(0)
    width, height = 128.0, 96.0
    for _ in range(200):
        cells = [rng.randint(0, GRID) for _ in range(4)]
        text = "{" + "".join(f"<{c}>" for c in cells) + "}"
        assert format_box(parse_box(text, width, height), width, height) == text
        box = [rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0, height)]
        back = parse_box(format_box(box, width, height), width, height)
        assert all(
            abs(a - b) <= 0.5 * size / GRID + 1e-9
            for a, b, size in zip(back, box, (width, height) * 2, strict=True)
        )
    assert format_box([0, 0, 64, 32], 64, 64) == "{<0><0><100><50>}"
    assert parse_box("it is at { <10> <20><30><40> } here") == (10.0, 20.0, 30.0, 40.0)
    assert parse_box("<1><2><3><4>") == (1.0, 2.0, 3.0, 4.0)
    for text in ("left lung", "<1><2><3>", "{<1><2><3><101>}"):
        assert parse_box(text) is None


def test_word_tokenizer_round_trip_and_full_coverage(generated):
    _, splits = generated
    tokenizer = build_word_tokenizer(synthetic_vocabulary())
    text = "where is the nodule? {<12><0><100><7>}, overall pattern: clear."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert (
        tokenizer.decode(tokenizer.encode("Where  IS\nthe mass", add_special_tokens=False))
        == "where is the mass"
    )
    for record in splits["train"]:
        for text in (
            *build_prompt(record["task"], record["instruction"]).split(IMAGE_PLACEHOLDER),
            record["answer"],
        ):
            assert tokenizer.unk_token_id not in tokenizer.encode(text, add_special_tokens=False), text


def test_synthetic_records_agree_with_the_scenes(generated):
    root, splits = generated
    records = splits["train"]
    assert {r["task"] for r in records} == {"vqa", "refer", "identify", "caption", "cls", "qa"}
    pools = json.loads((root / "templates.json").read_text())
    for record in records:
        if record["task"] == "qa":
            assert record["image"] is None and record["dataset"] == "synthetic-qa"
            continue
        style, index = record["dataset"].split("-")[0], int(record["id"].split("/")[-1])
        scene = render_scene(style, 0, SPLIT_OFFSETS["train"] + index, 64)
        names = [b.replace("_", " ") for b in GRADE_NAMES[style]]
        if record["task"] == "cls":
            assert record["answer"] == names[scene.labels["grade"]]
        if record["task"] == "refer":
            boxes = {format_box(b.tolist(), 64, 64) for b in scene.boxes}
            assert record["answer"] in boxes
        if record["task"] == "identify":
            assert parse_box(record["instruction"]) is not None
        assert any(
            t.replace("{}", record["query"]) == record["instruction"] for t in pools[record["dataset"]]
        )
    answers = Counter(r["answer"] for r in records if r["task"] == "vqa")
    assert set(answers) <= {"yes", "no"} and len(answers) == 2


def test_images_load_from_synthetic_uris_and_files(tmp_path):
    import cv2

    image = load_image("synthetic://ct/val/3?size=64&seed=1", 32)
    expected = render_scene("ct", 1, SPLIT_OFFSETS["val"] + 3, 64).image
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image.mean(), torch.tensor((expected.mean() - 0.5) * 4.0), atol=0.05)
    cv2.imwrite(str(tmp_path / "a.png"), (expected * 255).astype("uint8")[..., ::-1])
    from_file = load_image("a.png", 64, root=tmp_path)
    assert torch.allclose(from_file, load_image("synthetic://ct/val/3?size=64&seed=1", 64), atol=0.02)
    with pytest.raises(FileNotFoundError):
        load_image("missing.png", 64, root=tmp_path)


def test_instructions_are_redrawn_from_the_pool_in_training(generated):
    root, splits = generated
    pools = json.loads((root / "templates.json").read_text())
    refer = [r for r in splits["train"] if r["dataset"] == "radiograph-refer"][:1]
    dataset = InstructionDataset(refer, image_size=32, templates=pools, resample_instructions=True)
    torch.manual_seed(0)
    drawn = {dataset[0]["instruction"] for _ in range(40)}
    assert len(drawn) > 3
    assert (
        InstructionDataset(refer, image_size=32, templates=pools)[0]["instruction"] == refer[0]["instruction"]
    )


def test_read_records_checks_the_schema(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": None, "task": "qa", "answer": "x", "dataset": "d"}) + "\n")
    with pytest.raises(ValueError, match="missing keys \\['instruction'\\]"):
        read_records(path)
    rows = [
        {"image": None, "task": t, "instruction": "q", "answer": "a", "dataset": "d"} for t in ("qa", "vqa")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="mixes tasks"):
        read_records(path)


def test_batches_hold_one_dataset_and_follow_the_ratios():
    names = ["a"] * 10 + ["b"] * 30 + ["c"] * 5
    sampler = DatasetBatchSampler(
        names, 4, shuffle=True, ratios={"a": 1.0, "b": 3.0, "c": 0.0}, num_batches=400
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 400
    picked = Counter(names[b[0]] for b in batches)
    assert all(len({names[i] for i in b}) == 1 for b in batches) and picked["c"] == 0
    assert 2.4 < picked["b"] / picked["a"] < 3.6
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ordered = list(DatasetBatchSampler(names, 4))
    assert sorted(i for b in ordered for i in b) == list(range(45))
    assert all(len({names[i] for i in b}) == 1 for b in ordered)
    with pytest.raises(ValueError, match="unknown datasets"):
        DatasetBatchSampler(names, 4, ratios={"z": 1.0})


def test_collate_builds_one_dataset_batches(generated):
    _, splits = generated
    cls = [r for r in splits["test"] if r["task"] == "cls"]
    batch = collate_instructions(InstructionDataset(cls, image_size=32)[[0, 1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["task"] == "cls"
    assert batch["answer"] == [r["answer"] for r in cls[:2]]
    mixed = InstructionDataset(splits["test"], image_size=32)
    with pytest.raises(ValueError, match="one dataset"):
        collate_instructions(mixed[[0, len(mixed) - 1]])


class _Batches(torch.utils.data.Dataset):
    """Returns the batch of indices it is asked for (as InstructionDataset is, with whole batches)."""

    def __getitem__(self, indices: list[int]) -> list[int]:
        return list(indices)


def test_batch_sampler_resumed_part_way_serves_the_rest_of_its_epoch():
    """A resumable loader over the MLLM batch sampler continues an epoch from a checkpoint's state."""
    from umedpt.data.loading import ResumableDataLoader

    names = ["a"] * 7 + ["b"] * 5

    def loader() -> ResumableDataLoader:
        sampler = DatasetBatchSampler(names, 2, shuffle=True, num_batches=6, seed=4)
        return ResumableDataLoader(_Batches(), batch_size=None, sampler=sampler, collate_fn=list)

    original = loader()
    original.sampler.set_epoch(3)
    served = iter(original)
    [next(served) for _ in range(2)]
    state = original.state_dict()
    assert state == {"epoch": 3, "pass": 0, "batches": 2}
    rest = list(served)
    original.sampler.set_epoch(4)
    rest += list(original)

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)
    again = list(resumed)
    resumed.sampler.set_epoch(4)
    again += list(resumed)
    assert again == rest and len(rest) == 4 + 6
