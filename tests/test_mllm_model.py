"""MLLMModule: loss masking, padding sides, greedy generation, frozen parts, LoRA, local LLM paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.conftest import TINY_ENCODER
from umedpt.mllm import MLLMModule
from umedpt.mllm.data import InstructionDataset, collate_instructions, read_records
from umedpt.mllm.model import IGNORE_INDEX
from umedpt.mllm.synthetic import generate_instructions

TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def build(**kw: Any) -> MLLMModule:
    torch.manual_seed(0)
    defaults = {"encoder": TINY_ENCODER, "llm": TINY_LLM, "resample_rate": 2, "max_new_tokens": 6}
    return MLLMModule(**{**defaults, **kw})


@pytest.fixture(scope="module")
def model() -> MLLMModule:
    return build().eval()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("instructions")
    paths = generate_instructions(root, {"train": 4}, styles=("radiograph",), image_size=64)
    return read_records(paths["train"])


def batch_of(records: list[dict[str, Any]], dataset: str, size: int = 3) -> dict[str, Any]:
    chosen = [r for r in records if r["dataset"] == dataset][:size]
    return collate_instructions(InstructionDataset(chosen, image_size=64)[list(range(len(chosen)))])


def test_only_the_connector_and_lora_adapters_train(model):
    trainable = model.trainable_parameters()
    assert trainable and all(n.startswith("connector.") or ".lora_" in n for n in trainable)
    assert all(p.requires_grad for p in model.connector.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    config = model.llm.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    adapted = {n.split(".")[-1] for n, m in model.llm.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not hasattr(model.llm.get_output_embeddings(), "lora_A")


def test_encoder_stays_in_eval_mode():
    model = build()
    model.train()
    assert not model.encoder.training and model.connector.training
    model.eval()


def test_visual_tokens_are_patches_of_the_last_level_in_raster_order(model):
    fmap = torch.arange(2 * 128 * 2 * 2, dtype=torch.float32).reshape(2, 128, 2, 2)

    class Stub(nn.Module):
        def forward(self, x):
            return [torch.zeros(1), fmap]

    encoder, model.encoder = model.encoder, Stub()
    try:
        out = model.visual_tokens(torch.zeros(2, 3, 64, 64))
    finally:
        model.encoder = encoder
    assert out.shape == (2, 2, 256)  # 4 patches, rate 2
    assert torch.equal(out[:, 0], torch.cat([fmap[:, :, 0, 0], fmap[:, :, 0, 1]], dim=1))
    assert torch.equal(out[:, 1], torch.cat([fmap[:, :, 1, 0], fmap[:, :, 1, 1]], dim=1))


def test_loss_only_on_answer_and_eos_with_right_padding(model, records):
    batch = batch_of(records, "radiograph-caption", 2)
    batch["answer"] = ["overall pattern: clear.", "no"]
    image_embeds, _ = model.encode_images(batch["image"], batch["task"])
    inputs = model.build_inputs(batch, image_embeds, answers=True)
    labels, mask = inputs["labels"], inputs["attention_mask"]
    eos = model.tokenizer.eos_token_id
    for row, answer in enumerate(batch["answer"]):
        expected = model.tokenizer.encode(answer, add_special_tokens=False) + [eos]
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        assert labels[row, length - len(expected) : length].tolist() == expected
        assert (labels[row, : length - len(expected)] == IGNORE_INDEX).all()
        assert (labels[row, length:] == IGNORE_INDEX).all()
    # the image embeddings sit right after "<s><img>" in both rows
    start = len(model._prompt_ids("caption", batch["instruction"][0], True)[0])
    assert torch.allclose(inputs["inputs_embeds"][:, start : start + 2], image_embeds)
    logits = model.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask).logits
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(model.loss(batch)[0], manual, atol=1e-5)


def test_generation_is_left_padded_greedy_and_batch_independent(model, records):
    batch = batch_of(records, "radiograph-refer", 3)
    batch["instruction"] = ["nodule", "where can i locate the mass?", "give me the location of cavity."]
    inputs = model.build_inputs(batch, model.encode_images(batch["image"], "refer")[0], answers=False)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]  # left padding: prompts end at the last position
    together, weights = model.generate(batch)
    assert weights.shape == (3, 2, 5)
    for i in range(3):
        single = {**batch, "image": batch["image"][i : i + 1], "instruction": batch["instruction"][i : i + 1]}
        assert model.generate(single)[0] == [together[i]]
    again, _ = model.generate(batch)
    assert again == together  # greedy decoding is deterministic


def test_text_only_batches_skip_the_image(model, records):
    batch = batch_of(records, "synthetic-qa", 2)
    assert batch["image"] is None
    loss, weights = model.loss(batch)
    assert torch.isfinite(loss) and weights is None
    assert len(model.generate(batch)[0]) == 2


def test_training_lowers_the_loss(records):
    model = build(lr=3e-3).train()
    batches = [batch_of(records, name, 4) for name in ("radiograph-cls", "radiograph-vqa", "synthetic-qa")]
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, _ = model.loss(batches[step % 3])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-6:]) < 0.5 * sum(losses[:6]), losses


def test_local_llm_directory_and_checkpoints_without_its_frozen_weights(tmp_path, records):
    source = build()
    base = source.llm.get_base_model()
    base.save_pretrained(tmp_path / "llm")
    source.tokenizer.save_pretrained(tmp_path / "llm")
    model = build(llm=str(tmp_path / "llm")).eval()
    assert model.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    assert len(model.generate(batch_of(records, "radiograph-cls", 2))[0]) == 2
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    kept = [k for k in checkpoint["state_dict"] if k.startswith("llm.")]
    assert kept and all(".lora_" in k for k in kept)
    assert any(k.startswith("encoder.") for k in checkpoint["state_dict"])  # not from a path: kept
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def test_tokenizer_directory_must_exist(tmp_path):
    with pytest.raises(OSError):
        build(tokenizer=str(tmp_path / "missing"))


def write_records(path: Path, rows: list[dict[str, Any]]) -> None:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_vocabulary_files_extend_the_built_tokenizer(tmp_path):
    path = tmp_path / "extra.jsonl"
    row = {
        "image": None,
        "task": "qa",
        "instruction": "what is a zebrafish?",
        "answer": "a fish",
        "dataset": "x",
    }
    write_records(path, [row])
    model = build(vocabulary_files=[str(path)])
    ids = model.tokenizer.encode("what is a zebrafish?", add_special_tokens=False)
    assert model.tokenizer.unk_token_id not in ids
