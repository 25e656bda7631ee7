"""BSQ-VAE against the official golden (tests/golden/infinity_tiny.safetensors) and the d32 manifest."""
from __future__ import annotations

import json

import pytest
import torch
from _golden import golden_bsq_vae, infinity_golden, split_bits
from golden.seeded import GOLDEN_DIR, assert_probe_close

from arbooth.errors import CheckpointError, ConfigError
from arbooth.models import BSQVAE, infinity_scale_schedule
from arbooth.models.bsq_vae import official_vae_state_dict


@pytest.fixture(scope="module")
def golden():
    return infinity_golden()


@pytest.fixture(scope="module")
def vae(golden):
    return golden_bsq_vae(golden[0])


def _close(a, b, tol):
    assert a.shape == b.shape
    assert (a.float() - b.float()).abs().max().item() <= tol


@torch.no_grad()
def test_encode_matches_golden(golden, vae):
    config, ref = golden
    schedule = [tuple(s) for s in config["scale_schedule"]]
    d = config["codebook_dim"]
    h = vae.encode_features(ref["image"])
    _close(h, ref["vae.raw_features"], 1e-4)
    z, bits, var_inputs = vae.quantize(ref["vae.raw_features"], schedule)  # from the golden features: bits exact
    _close(z, ref["vae.encode_z"], 1e-4)
    assert len(bits) == len(schedule)
    for b, rb in zip(bits, split_bits(ref["vae.encode_bits_int"], schedule, d), strict=True):
        assert torch.equal(b, rb.to(b.dtype))
    ref_inputs = ref["vae.encode_var_inputs"].split([h * w for _, h, w in schedule[1:]], 2)
    for v, rv in zip(var_inputs, ref_inputs, strict=True):
        _close(v.reshape(v.shape[0], d, -1), rv, 1e-4)
    _close(vae.bits_to_var_input(bits, schedule), ref["train.x_BLC_wo_prefix"], 1e-5)
    assert_probe_close(vae.decode(z), ref, "vae.recon", 1e-4)
    assert_probe_close(vae.decode_bits(bits, schedule), ref, "vae.recon", 1e-4)


def test_official_layout_round_trip(golden, vae):
    sd = official_vae_state_dict(vae)
    fresh = BSQVAE(codebook_dim=16, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2))
    fresh.load_state_dict(sd, strict=True)  # the official layout loads ...
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), vae.state_dict().values()))
    fresh.load_state_dict(vae.state_dict(), strict=True)  # ... and so does our own
    bad = dict(sd)
    bad["quantize.lfq.mask"] = bad["quantize.lfq.mask"].flip(0)
    with pytest.raises(CheckpointError, match="lfq.mask"):
        fresh.load_state_dict(bad)


@torch.no_grad()
def test_other_aspect_ratio_round_trip():
    torch.manual_seed(0)
    vae = BSQVAE(codebook_dim=8, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 1, 1, 1)).eval()
    schedule = infinity_scale_schedule(h_div_w=0.5, pn="0.06M")  # 1:2 template, last map 11 x 22
    assert schedule[-1] == (1, 11, 22)
    img = torch.rand(1, 3, 11 * 16, 22 * 16) * 2 - 1
    z, bits, _ = vae.quantize(vae.encode_features(img), schedule)
    assert [tuple(b.shape) for b in bits] == [(1, h, w, 8) for _, h, w in schedule]
    assert set(torch.cat([b.flatten() for b in bits]).tolist()) <= {0, 1}
    # the quantizer's output is exactly the sum of its bits' codes
    _close(vae.summed_codes(bits, schedule).squeeze(2), z, 1e-6)
    x = vae.bits_to_var_input(bits, schedule)
    assert x.shape == (1, sum(h * w for _, h, w in schedule) - 1, 8)
    assert vae.decode_bits(bits, schedule).shape == img.shape


def test_bad_inputs():
    vae = BSQVAE(codebook_dim=8, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 1, 1, 1))
    with pytest.raises(ConfigError):
        vae.encode_features(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="last scale"):
        vae.quantize(torch.zeros(1, 8, 4, 4), [(1, 1, 1), (1, 2, 2)])
    with pytest.raises(ConfigError):
        BSQVAE(patch_size=12)


def test_d32_meta_matches_manifest():
    manifest = json.loads((GOLDEN_DIR / "manifests" / "infinity_vae_d32.manifest.json").read_text())
    with torch.device("meta"):
        vae = BSQVAE()
    got = {k: list(v.shape) for k, v in official_vae_state_dict(vae).items()}
    assert got == {e["key"]: e["shape"] for e in manifest["entries"]}
    assert sum(p.numel() for p in vae.parameters()) == manifest["num_parameters"]
