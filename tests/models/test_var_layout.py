"""Released VAR sizes: meta builds match the official checkpoints' manifests, official state dicts load
strictly, and a wrong or missing checkpoint is a clear error."""
from __future__ import annotations

import json
import re

import pytest
import torch
from golden.seeded import GOLDEN_DIR
from safetensors.torch import save_file

from arbooth.errors import CheckpointError, ConfigError
from arbooth.models import VAR, VQVAE, load_var, official_state_dict
from arbooth.models.var import VAE_PRESET, VAR_PRESETS
from arbooth.models.var_loading import load_official_weights
from arbooth.toy.tiny import TINY_VAE, TINY_VAR, build_tiny_var


def _manifest(depth):
    return json.loads((GOLDEN_DIR / "manifests" / f"var_d{depth}.manifest.json").read_text())


def _meta_var(depth):
    with torch.device("meta"):
        return VAR(VQVAE(**VAE_PRESET), **VAR_PRESETS[depth])


@pytest.mark.parametrize("depth", [16, 30])
def test_class_model_config_builds_the_same_release_as_load_var(depth):
    """One release table (models/var_presets.py): the class recipe's `model` section at its defaults builds
    exactly the architecture load_var builds (every official key and shape, every hyperparameter)."""
    from arbooth.adapt.finetuned import ModelConfig, build_vae_var

    vae, var = build_vae_var(ModelConfig(depth=depth), device="meta")
    ref = _meta_var(depth)
    shapes = {k: v.shape for k, v in official_state_dict(var, include_buffers=True).items()}
    assert shapes == {k: v.shape for k, v in official_state_dict(ref, include_buffers=True).items()}
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in ref.vae.state_dict().items()}
    for attr in ("depth", "C", "num_heads", "num_classes", "patch_nums", "V", "Cvae", "shared_aln"):
        assert getattr(var, attr) == getattr(ref, attr), attr
    assert ModelConfig(depth=depth).image_size == 256


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_meta_build_matches_released_layout(depth):
    manifest = _manifest(depth)
    for key in ("depth", "embed_dim", "num_heads", "shared_aln", "attn_l2_norm", "num_classes"):
        assert VAR_PRESETS[depth][key] == manifest["config"][key]
    var = _meta_var(depth)
    entries = manifest["state_dict"]
    params = {k: list(v.shape) for k, v in official_state_dict(var).items()}
    assert params == {k: e["shape"] for k, e in entries.items() if not e["buffer"]}
    with_buffers = {k: list(v.shape) for k, v in official_state_dict(var, include_buffers=True).items()}
    assert with_buffers == {k: e["shape"] for k, e in entries.items()}
    assert sum(p.numel() for p in var.parameters()) == sum(v.numel() for v in official_state_dict(var).values())
    assert not list(var.buffers())
    if depth == 16:
        assert round(sum(p.numel() for p in var.parameters()) / 1e6, 2) == 310.28


def test_d16_official_state_dict_loads_strictly_on_cpu():
    entries = _manifest(16)["state_dict"]
    var = _meta_var(16).to_empty(device="cpu")  # real CPU storage, without spending time on initialisation
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    # zero-stride tensors of the manifest's shapes: the official key set without 1.2 GB of data
    sd = {k: torch.full((), 0.25, dtype=dtypes[e["dtype"]]).expand(e["shape"]) for k, e in entries.items()}
    var.load_state_dict(sd)  # strict
    assert var.pos.pos_1LC.device.type == "cpu"
    assert var.blocks[15].attn.qkv_bias.v_bias[0].item() == 0.25 and var.head.bias[-1].item() == 0.25


@pytest.fixture
def tiny_files(tmp_path):
    var = build_tiny_var(seed=3)
    vae_path, var_path = tmp_path / "vae.safetensors", tmp_path / "var.pth"
    save_file(official_state_dict(var.vae), str(vae_path))
    torch.save(official_state_dict(var, include_buffers=True), var_path)
    return var, vae_path, var_path


def test_official_checkpoints_round_trip_into_a_meta_model(tiny_files):
    var, vae_path, var_path = tiny_files
    with torch.device("meta"):
        fresh = VAR(VQVAE(**TINY_VAE), **TINY_VAR)
    fresh = load_official_weights(fresh, vae_ckpt=vae_path, var_ckpt=var_path)
    assert not fresh.training and not any(p.requires_grad for p in fresh.vae.parameters())
    assert all(p.requires_grad for p in fresh.parameters())
    labels = torch.tensor([1, 7])
    torch.testing.assert_close(fresh.generate(labels, top_k=1, decode=False), var.generate(labels, top_k=1, decode=False),
                               atol=0, rtol=0)


def test_wrong_depth_checkpoint_names_the_keys(tiny_files):
    _, vae_path, var_path = tiny_files
    with pytest.raises(CheckpointError) as e:
        load_var(depth=16, vae_ckpt=vae_path, var_ckpt=var_path)
    msg = str(e.value)
    assert "var.pth does not match VAR d16" in msg and "a d2 checkpoint?" in msg
    assert re.search(r"\d+ missing: blocks\.2\.", msg)
    assert re.search(r"\d+ mis-shaped: word_embed\.weight: checkpoint \(64, 8\) vs model \(1024, 32\)", msg)


def test_missing_checkpoint_and_unknown_depth(tiny_files, tmp_path):
    _, vae_path, var_path = tiny_files
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_var(depth=16, vae_ckpt=vae_path, var_ckpt=tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="no released VAR of depth 12"):
        load_var(depth=12, vae_ckpt=vae_path, var_ckpt=var_path)


def test_strict_load_rejects_missing_unexpected_and_misshaped_keys():
    var = build_tiny_var()
    good = official_state_dict(var, include_buffers=True)
    var.load_state_dict(good)
    for broken, needle in (
        ({k: v for k, v in good.items() if k != "blocks.1.attn.q_bias"}, "blocks.1.attn.qkv_bias.q_bias"),
        ({**good, "blocks.0.attn.k_bias": torch.zeros(64)}, "blocks.0.attn.k_bias"),
        ({**good, "pos_start": torch.zeros(1, 2, 64)}, "pos.pos_start"),
    ):
        with pytest.raises(RuntimeError, match=needle.replace(".", r"\.")):
            var.load_state_dict(broken)
    var.load_state_dict(var.state_dict())  # our own layout loads too


def test_bf16_weights_load_and_sample(tiny_files):
    var, vae_path, var_path = tiny_files
    with torch.device("meta"):
        fresh = VAR(VQVAE(**TINY_VAE), **TINY_VAR)
    fresh = load_official_weights(fresh, vae_ckpt=vae_path, var_ckpt=var_path, dtype="bf16")
    assert fresh.head.weight.dtype == torch.bfloat16 and fresh.vae.decoder.conv_in.weight.dtype == torch.float32
    f_hat = fresh.generate([1, 7], top_k=1, decode=False)
    assert f_hat.dtype == torch.float32 and f_hat.shape == (2, var.Cvae, 4, 4) and torch.isfinite(f_hat).all()
