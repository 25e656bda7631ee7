"""VQVAE against the official implementation's outputs (tests/golden/var_tiny*.safetensors) and its checkpoint layout."""
from __future__ import annotations

import json

import pytest
import torch
from _golden import VAR_GOLDEN as GOLDEN
from _golden import golden_vqvae as _golden_vae
from golden.seeded import GOLDEN_DIR, assert_probe_close

from arbooth.models import VQVAE
from arbooth.models.var import VAE_PRESET
from arbooth.models.var_loading import official_state_dict
from arbooth.models.vqvae import ImageSizeError


@pytest.mark.parametrize("name", GOLDEN)
def test_tokenizer_reproduces_official_outputs(name):
    vae, _config, g = _golden_vae(name)
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(g["image"])
        assert len(idx_Bl) == len(g["idx_Bl"])
        for ours, ref in zip(idx_Bl, g["idx_Bl"]):
            assert ours.dtype == torch.long and torch.equal(ours, ref)
        torch.testing.assert_close(vae.idxBl_to_var_input(g["idx_Bl"]), g["var_input"], atol=1e-4, rtol=0)
        assert_probe_close(vae.idxBl_to_img(g["idx_Bl"]), g, "decoded", 1e-4)
        assert_probe_close(vae.reconstruct(g["image"]), g, "reconstructed", 1e-4)


def test_wrong_image_size_is_a_clear_error():
    vae, _config, g = _golden_vae(GOLDEN[0])
    with pytest.raises(ImageSizeError, match=r"\(B, 3, 64, 64\).*\(2, 3, 48, 48\)"):
        vae.img_to_idxBl(g["image"][:, :, :48, :48])
    with pytest.raises(ImageSizeError):
        vae.reconstruct(g["image"][0])  # no batch dimension


def test_strict_load_still_rejects_real_mismatches():
    vae, _config, _g = _golden_vae(GOLDEN[0])
    sd = official_state_dict(vae, include_buffers=True)
    sd.pop("quant_conv.bias")
    sd["quantize.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="quant_conv.bias") as e:
        vae.load_state_dict(sd)
    assert "quantize.extra" in str(e.value)


def test_released_tokenizer_layout_on_meta():
    manifest = json.loads((GOLDEN_DIR / "manifests" / "vae_ch160v4096z32.manifest.json").read_text())
    with torch.device("meta"):
        vae = VQVAE(**VAE_PRESET)
    got = {k: list(v.shape) for k, v in official_state_dict(vae, include_buffers=True).items()}
    assert got == {k: v["shape"] for k, v in manifest["state_dict"].items()}
    params = {k: list(v.shape) for k, v in official_state_dict(vae).items()}
    assert params == {k: v["shape"] for k, v in manifest["state_dict"].items() if not v["buffer"]}
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
