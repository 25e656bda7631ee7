"""Sharded checkpoint folders (the Infinity-8B release's `checkpoint_type='torch_shard'` layout: an index
json + shard files, safetensors or torch), the 8B builders' schedule, and `arbooth generate` from a tiny
sharded 8B-style folder (spatial-patchify VAE)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _infinity_8b_tiny import MODEL_KW, VAE_KW, write_sharded
from PIL import Image

from arbooth.cli import main as cli_main
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models import BSQVAE, Infinity
from arbooth.models.bsq_vae import official_vae_state_dict
from arbooth.models.infinity_loading import (
    INDEX_NAMES,
    infinity_8b_512_schedule,
    load_infinity,
    official_state_dict,
    released_preset,
)


@pytest.fixture(scope="module")
def tiny_8b():
    torch.manual_seed(0)
    vae = BSQVAE(**{**VAE_KW, "ch_mult": tuple(VAE_KW["ch_mult"])}).eval()
    return Infinity(vae, **MODEL_KW).eval()


@pytest.fixture(scope="module")
def files(tiny_8b, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    torch.save({"vae": official_vae_state_dict(tiny_8b.vae)}, root / "vae.pth")
    write_sharded(root / "weights", official_state_dict(tiny_8b), 3)
    return root


def _load(folder, vae):
    return load_infinity(folder, vae, vae_kwargs=VAE_KW, model_kwargs=MODEL_KW)


@pytest.mark.parametrize("kind,layout", [("safetensors", "official"), ("bin", "ours")])
def test_sharded_folder_loads_exactly(tiny_8b, files, tmp_path, kind, layout):
    sd = official_state_dict(tiny_8b) if layout == "official" else tiny_8b.state_dict()
    if kind == "bin":  # a bf16 writer: loaded back to fp32 as the official fp32 model would copy them
        sd = {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}
    write_sharded(tmp_path / "w", sd, 4, kind)
    loaded = _load(tmp_path / "w", files / "vae.pth")
    ours = tiny_8b.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and v.device.type == "cpu", k
        want = ours[k].bfloat16().float() if kind == "bin" else ours[k]
        assert torch.equal(v, want), k
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_sharded_model_generates_the_same(tiny_8b, files):
    loaded = _load(files / "weights", files / "vae.pth")
    text, mask = torch.randn(1, 3, 128), torch.ones(1, 3, dtype=torch.bool)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    a = tiny_8b.generate(text, mask, schedule, seed=5)
    b = loaded.generate(text, mask, schedule, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.images, b.images)
    assert a.bits[-1].shape == (1, 4, 4, 16) and a.images.shape == (1, 3, 64, 64)  # 4d bits, 16 px per token


def _error(folder, vae) -> str:
    with pytest.raises(CheckpointError) as e:
        _load(folder, vae)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_partial_or_wrong_folders_are_one_line_errors(tiny_8b, files, tmp_path):
    sd = official_state_dict(tiny_8b)
    weight_map = write_sharded(tmp_path / "a", sd, 3)
    gone = sorted(set(weight_map.values()))[1]
    (tmp_path / "a" / gone).unlink()
    msg = _error(tmp_path / "a", files / "vae.pth")
    assert gone in msg and "missing" in msg

    dropped = dict(sd)
    dropped.pop("head.weight")
    dropped["head.extra"] = torch.zeros(1)
    write_sharded(tmp_path / "b", dropped, 2)
    msg = _error(tmp_path / "b", files / "vae.pth")
    assert "1 missing key(s): head.weight" in msg and "1 unexpected key(s): head.extra" in msg

    (tmp_path / "c").mkdir()
    assert "model.safetensors.index.json" in _error(tmp_path / "c", files / "vae.pth")

    write_sharded(tmp_path / "d", sd, 2)  # the index and a shard disagree on where a key lives
    index = json.loads((tmp_path / "d" / INDEX_NAMES[0]).read_text())
    first = next(iter(index["weight_map"]))
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][first])
    index["weight_map"][first] = other
    (tmp_path / "d" / INDEX_NAMES[0]).write_text(json.dumps(index))
    assert first in _error(tmp_path / "d", files / "vae.pth")

    bigger = {**MODEL_KW, "embed_dim": 128}
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_infinity(files / "weights", files / "vae.pth", vae_kwargs=VAE_KW, model_kwargs=bigger)


def test_zero_k_bias_may_be_left_out(tiny_8b, tmp_path, files):
    sd = {k: v for k, v in official_state_dict(tiny_8b).items() if not k.endswith("zero_k_bias")}
    write_sharded(tmp_path / "w", sd, 2)
    loaded = _load(tmp_path / "w", files / "vae.pth")
    assert torch.equal(loaded.head.weight, tiny_8b.head.weight)


def test_release_is_recognised_from_the_vae_file():
    assert released_preset({"quantize.lfq.mask": torch.zeros(14)}) == "infinity_8b"
    assert released_preset({"quantizer.lfq.mask": torch.zeros(32)}) == "infinity_2b"
    assert released_preset({"quantizer.lfq.mask": torch.zeros(4)}) is None


def test_unknown_preset_is_an_error(files):
    with pytest.raises(ConfigError, match="infinity_8b"):
        load_infinity(files / "weights", files / "vae.pth", preset="infinity_9b")


def test_512_schedule():
    cfg = SimpleNamespace(pn="1M", h_div_w=1.0)
    s = infinity_8b_512_schedule(cfg)
    assert len(s) == 10 and s[-1] == (1, 32, 32)  # 32 tokens x 16 px = 512
    assert infinity_8b_512_schedule(SimpleNamespace(pn="0.06M", h_div_w=1.0))[-1] == (1, 16, 16)
    with pytest.raises(ConfigError, match="512"):
        infinity_8b_512_schedule(SimpleNamespace(pn="0.60M", h_div_w=1.0))


def test_generate_cli_from_a_sharded_8b_style_folder(files, tmp_path):
    from transformers import T5Config, T5EncoderModel

    from arbooth.toy.text import word_level_tokenizer

    fast = word_level_tokenizer(["a", "photo", "of", "dog"])
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(fast), d_model=128, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(tmp_path / "t5")
    fast.save_pretrained(tmp_path / "t5")
    args = ["generate", "--prompt", "a photo of dog", "--model-ckpt", str(files / "weights"),
            "--vae-ckpt", str(files / "vae.pth"), "--t5", str(tmp_path / "t5"), "--out", str(tmp_path / "dog.png"),
            "--pn", "0.06M", "--seed", "1", "--vae-kwargs", json.dumps(VAE_KW), "--model-kwargs", json.dumps(MODEL_KW)]
    assert cli_main(args) == 0
    assert Image.open(tmp_path / "dog.png").size == (256, 256)
