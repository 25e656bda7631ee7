"""Infinity-8B switches against the official code (tests/golden/infinity_8b_tiny*.safetensors: spatial
patchify VAE, 4d bits per token, several blocks per chunk, the 8B flags) and the released 8B layouts
(tests/golden/manifests/infinity_8b.manifest.json, infinity_vae_d56.manifest.json) at full size on the
meta device."""
from __future__ import annotations

import json

import pytest
import torch
from _golden import seeded, split_bits, unpack_text
from golden.seeded import GOLDEN_DIR, assert_probe_close, image_from_small, load_golden

from arbooth.models import BSQVAE, Infinity
from arbooth.models.bitwise_self_correction import flip_requant
from arbooth.models.bsq_vae import official_vae_state_dict
from arbooth.models.infinity import INFINITY_PRESETS
from arbooth.models.infinity_loading import official_state_dict


@pytest.fixture(scope="module")
def golden():
    config, t = load_golden("infinity_8b_tiny.safetensors")
    t.update(load_golden("infinity_8b_tiny_generate.safetensors")[1])
    t["image"] = image_from_small(t["image_small_u8"], config["image_factor"])
    t["text"], t["text_mask"] = unpack_text(t["text_kv_f16"].float(), config["text_lens"])
    return config, t


@pytest.fixture(scope="module")
def model(golden):
    config = golden[0]
    v, kw = config["vae"], config["infinity"]
    assert kw["apply_spatial_patchify"] == 1 and v["patch_size"] == 8
    vae = BSQVAE(codebook_dim=v["codebook_dim"], base_ch=v["base_ch"], num_res_blocks=v["num_res_blocks"],
                 ch_mult=tuple(v["ch_mult"]), patch_size=v["patch_size"], spatial_patchify=True).eval()
    vae.load_state_dict(seeded(official_vae_state_dict(vae), config["vae_seed"], config["vae_fingerprint"],
                               "patchify BSQ-VAE"), strict=True)
    m = Infinity(vae, depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
                 mlp_ratio=kw["mlp_ratio"], text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                 block_chunks=kw["block_chunks"]).eval()
    m.load_state_dict(seeded(official_state_dict(m), config["infinity_seed"], config["infinity_fingerprint"],
                             "8B-switch Infinity"), strict=True)
    return m


def _schedules(config):
    return [tuple(s) for s in config["scale_schedule"]], [tuple(s) for s in config["vae_scale_schedule"]]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_patchify_bit_order():
    """Token bit c*4 + 2i + j is latent bit c at (2y + i, 2x + j) (torch pixel_(un)shuffle, as released)."""
    vae = BSQVAE(codebook_dim=3, base_ch=32, num_res_blocks=1, ch_mult=(1, 1), patch_size=2, spatial_patchify=True)
    assert vae.token_dim == 12 and vae.latent_schedule([(1, 1, 1), (1, 2, 3)]) == [(1, 2, 2), (1, 4, 6)]
    latent = torch.randint(0, 2, (2, 4, 6, 3), dtype=torch.uint8)
    tokens = vae.bits_to_tokens(latent)
    assert tokens.shape == (2, 2, 3, 12) and torch.equal(vae.tokens_to_bits(tokens), latent)
    for c, i, j, y, x in [(0, 0, 0, 0, 0), (2, 1, 0, 1, 2), (1, 1, 1, 0, 1)]:
        assert torch.equal(tokens[:, y, x, c * 4 + 2 * i + j], latent[:, 2 * y + i, 2 * x + j, c])
    plain = BSQVAE(codebook_dim=3, base_ch=32, num_res_blocks=1, ch_mult=(1, 1), patch_size=2)
    assert plain.token_dim == 3 and torch.equal(plain.bits_to_tokens(latent), latent)


@torch.no_grad()
def test_tokenizer_matches_golden(golden, model):
    config, ref = golden
    schedule, latent = _schedules(config)
    vae, d = model.vae, config["codebook_dim"]
    assert vae.latent_schedule(schedule) == latent
    assert _max_diff(vae.encode_features(ref["image"]), ref["vae.raw_features"]) <= 1e-4
    z, bits, _ = vae.quantize(ref["vae.raw_features"], schedule)  # from the golden features: bits exact
    assert _max_diff(z, ref["vae.encode_z"]) <= 1e-4
    ref_latent = split_bits(ref["vae.encode_bits_int"], latent, d)
    ref_tokens = split_bits(ref["train.gt_bits_int"], schedule, 4 * d)  # flip_requant's patchified labels
    for si, (b, rl, rt) in enumerate(zip(bits, ref_latent, ref_tokens, strict=True)):
        assert b.shape[-1] == 4 * d
        assert torch.equal(vae.tokens_to_bits(b), rl.to(b.dtype)), f"scale {si}: latent bits differ"
        assert torch.equal(b, rt.to(b.dtype)), f"scale {si}: token bits differ"
    assert _max_diff(vae.bits_to_var_input(bits, schedule), ref["train.x_BLC_wo_prefix"]) <= 1e-5
    bsc = flip_requant(vae, ref["vae.raw_features"], schedule, strength=0.0)
    assert all(torch.equal(a, b) for a, b in zip(bsc.label_bits, bits, strict=True))
    assert _max_diff(bsc.x_BLd, ref["train.x_BLC_wo_prefix"]) <= 1e-5
    assert_probe_close(vae.decode(z), ref, "vae.recon", 1e-4)
    assert_probe_close(vae.decode_bits(bits, schedule), ref, "vae.recon", 1e-4)


@torch.no_grad()
def test_teacher_forced_logits_match_golden(golden, model):
    config, ref = golden
    schedule, _ = _schedules(config)
    logits = model(ref["text"], ref["text_mask"], ref["train.x_BLC_wo_prefix"], schedule)
    assert logits.shape[-1] == 2 * config["token_dim"]
    assert _max_diff(logits, ref["train.logits"]) <= 1e-5
    B, L, _ = logits.shape
    gt = torch.cat([b.reshape(B, -1, config["token_dim"])
                    for b in split_bits(ref["train.gt_bits_int"], schedule, config["token_dim"])], 1).long()
    loss = torch.nn.functional.cross_entropy(logits.view(B, L, -1, 2).permute(0, 3, 1, 2), gt, reduction="none")
    assert _max_diff(loss.mean(-1), ref["train.loss_per_token"]) <= 1e-5


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_generation_matches_golden(golden, model, mode):
    config, ref = golden
    schedule, latent = _schedules(config)
    gen, g = config["generation"], config["generation"][mode]
    out = model.generate(ref["text"], ref["text_mask"], schedule, cfg=gen["cfg_list"], tau=gen["tau_list"],
                         top_k=g["top_k"], top_p=g["top_p"], seed=g["g_seed"], return_logits=True)
    ref_bits = split_bits(ref[f"generate.{mode}.latent_bits_int"], latent, config["codebook_dim"])
    for si, (bits, rb) in enumerate(zip(out.bits, ref_bits, strict=True)):
        assert bits.shape[-1] == config["token_dim"]
        assert torch.equal(model.vae.tokens_to_bits(bits), rb.to(bits.dtype)), f"scale {si}: bits differ"
    stride = config["logits_stride"]
    ours = torch.cat([lg[:, ::stride] for lg in out.logits], 1)
    assert _max_diff(ours, ref[f"generate.{mode}.logits_strided"]) <= 1e-5
    assert _max_diff(out.summed_codes, ref[f"generate.{mode}.summed_codes"].squeeze(2)) <= 1e-5
    assert_probe_close(out.images * 2 - 1, ref, f"generate.{mode}.image", 1e-4)


def test_cached_equals_no_cache_with_patchify(model):
    text, mask = torch.randn(2, 3, 256), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]
    kw = {"cfg": 3.0, "tau": 0.7, "top_k": 1, "top_p": 0.0, "return_logits": True}
    a = model.generate(text, mask, schedule, use_cache=True, **kw)
    b = model.generate(text, mask, schedule, use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert a.images.shape == (2, 3, 64, 64)  # 16 pixels per token: stride 8 x patch 2


def test_8b_meta_matches_manifest():
    manifest = json.loads((GOLDEN_DIR / "manifests" / "infinity_8b.manifest.json").read_text())
    vae_manifest = json.loads((GOLDEN_DIR / "manifests" / "infinity_vae_d56.manifest.json").read_text())
    p = INFINITY_PRESETS["infinity_8b"]
    with torch.device("meta"):
        vae = BSQVAE(**p["vae"])
        model = Infinity(vae, **p["model"])
    got = {k: list(v.shape) for k, v in official_state_dict(model).items()}
    assert got == {e["key"]: e["shape"] for e in manifest["entries"]}
    assert sum(q.numel() for q in model.parameters()) == manifest["num_parameters"] == 8_375_791_824
    got = {k: list(v.shape) for k, v in official_vae_state_dict(vae).items()}
    assert got == {e["key"]: e["shape"] for e in vae_manifest["entries"]}
    assert sum(q.numel() for q in vae.parameters()) == vae_manifest["num_parameters"]
    assert model.d == manifest["derived"]["d_vae"] == 56 and model.head.out_features == manifest["derived"]["V"]
    assert vae.token_stride == 16 and vae.latent_schedule([(1, 64, 64)]) == [(1, 128, 128)]  # 1024 px at 1M
