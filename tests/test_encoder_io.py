"""SwinEncoder shapes and inputs; export and load_encoder round trips and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY_ENCODER
from umedpt import SwinEncoder, load_encoder, save_encoder
from umedpt.encoder import find_batchnorm


@pytest.fixture
def encoder() -> SwinEncoder:
    torch.manual_seed(0)
    return SwinEncoder(**TINY_ENCODER).eval()


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (50, 70)])
def test_pyramid_is_nchw_at_strides_4_to_32_for_any_size(encoder, size):
    h, w = size
    feats = encoder(torch.randn(2, 3, h, w))
    assert encoder.reductions == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == encoder.out_channels == [16, 32, 64, 128]
    for f, r in zip(feats, encoder.reductions, strict=True):
        assert f.shape[0] == 2
        assert (f.shape[2], f.shape[3]) == (-(-h // r), -(-w // r))  # ceil: padded, never cropped


def test_embed_pools_last_level_and_accepts_grayscale(encoder):
    gray = torch.randn(3, 1, 64, 64)
    emb = encoder.embed(gray)
    assert emb.shape == (3, encoder.embed_dim)
    torch.testing.assert_close(emb, encoder.embed(gray.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(emb, encoder(gray)[-1].mean(dim=(2, 3)))


def test_single_channel_encoder_and_channel_errors():
    enc = SwinEncoder(**{**TINY_ENCODER, "in_chans": 1})
    assert enc.embed(torch.randn(2, 1, 64, 64)).shape == (2, 128)
    with pytest.raises(ValueError, match="built for 1-channel images, got 3 channels"):
        enc(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expects a \(B, C, H, W\) tensor"):
        enc(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="in_chans must be 1 or 3"):
        SwinEncoder(**{**TINY_ENCODER, "in_chans": 4})
    with pytest.raises(ValueError, match="timm Swin model"):
        SwinEncoder(name="resnet18")


def test_default_encoder_is_swin_tiny_with_layernorm_only():
    enc = SwinEncoder()
    assert enc.config["name"] == "swin_tiny_patch4_window7_224"
    assert enc.out_channels == [96, 192, 384, 768]
    assert find_batchnorm(enc) == []


def test_save_and_load_round_trip(tmp_path, encoder):
    path = save_encoder(encoder, tmp_path / "enc")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "umedpt-encoder" and config["embed_dim"] == 128
    x = torch.randn(2, 3, 64, 64)
    for source in (path, path / "model.safetensors", str(path)):
        loaded = load_encoder(source)
        assert not loaded.training
        torch.testing.assert_close(loaded.embed(x), encoder.embed(x))


def test_load_encoder_errors(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_encoder(tmp_path / "empty")

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="not a umedpt MultiTaskModule checkpoint"):
        load_encoder(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_encoder(text)

    path = save_encoder(encoder, tmp_path / "enc")
    config = json.loads((path / "config.json").read_text())
    config["encoder"]["model_kwargs"]["embed_dim"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shapes differ"):
        load_encoder(path)

    config["format"] = "something-else"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a umedpt encoder config"):
        load_encoder(path)

    other = save_encoder(encoder, tmp_path / "other")
    save_file({"unrelated": torch.zeros(2)}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_encoder(other)
