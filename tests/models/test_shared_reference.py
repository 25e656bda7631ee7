"""Optional: our models against the earlier reference files in ../shared/golden (full random weights
stored in the file), where that folder exists (ARBOOTH_SHARED or ../shared beside the repository). The
repository's own golden tests (tests/golden) do not need it; this checks that nothing drifted from the
vectors the project was first verified on."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _golden import unpack_text

from arbooth.models import BSQVAE, VAR, VQVAE, Infinity

SHARED = Path(os.environ.get("ARBOOTH_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
pytestmark = pytest.mark.skipif(not (SHARED / "golden").is_dir(), reason=f"no reference folder {SHARED}/golden")


def _infinity(g: dict, **switches) -> Infinity:
    vae = BSQVAE(codebook_dim=16, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2)).eval()
    vae.load_state_dict(dict(g["vae_state_dict"]), strict=True)
    kw = g["config"]["infinity"]["constructor_kwargs"]
    model = Infinity(vae, depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
                     mlp_ratio=kw["mlp_ratio"], text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                     block_chunks=kw["block_chunks"], **switches).eval()
    sd = dict(g["infinity_state_dict"])
    sd.pop("special_token", None)
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("name", ["var_tiny.pt", "var_tiny_shared_aln.pt"])
def test_var_matches_the_shared_reference(name: str) -> None:
    g = torch.load(SHARED / "golden/var" / name, weights_only=False)
    c = g["config"]
    vae = VQVAE(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                share_quant_resi=c["share_quant_resi"], patch_nums=tuple(c["patch_nums"]))
    vae.load_state_dict(g["vae_state_dict"])
    var = VAR(vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["embed_dim"], num_heads=c["num_heads"],
              mlp_ratio=c["mlp_ratio"], norm_eps=c["norm_eps"], shared_aln=c["shared_aln"],
              attn_l2_norm=c["attn_l2_norm"], patch_nums=tuple(c["patch_nums"])).eval()
    var.load_state_dict(g["var_state_dict"])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(vae.img_to_idxBl(g["image"]), g["idx_Bl"]))
        torch.testing.assert_close(var(g["labels"], g["var_input"]), g["logits"], atol=1e-4, rtol=0)
    images = var.generate(g["labels"], cfg=1.5, top_k=1, seed=0)
    torch.testing.assert_close(images, g["greedy_cfg1.5_images"], atol=1e-4, rtol=0)


def test_infinity_matches_the_shared_reference() -> None:
    g = torch.load(SHARED / "golden/infinity/infinity_tiny.pt", weights_only=True)
    model = _infinity(g)
    text, mask = unpack_text(g["inputs"]["text_cond_tuple"][0], g["inputs"]["text_cond_tuple"][1])
    schedule = [tuple(s) for s in g["config"]["scale_schedule"]]
    with torch.no_grad():
        logits = model(text, mask, g["train"]["x_BLC_wo_prefix"], schedule)
    assert (logits - g["train"]["logits"]).abs().max().item() <= 1e-5
    gen, ref = g["config"]["generation"], g["generate"]["sampled"]
    out = model.generate(text, mask, schedule, cfg=gen["cfg_list"], tau=gen["tau_list"], top_k=gen["sampled"]["top_k"],
                         top_p=gen["sampled"]["top_p"], seed=gen["sampled"]["g_seed"])
    assert all(torch.equal(b, r.to(b.dtype)) for b, r in zip(out.bits, ref["bits_per_scale"], strict=True))
    assert (out.images * 2 - 1 - ref["image_float"]).abs().max().item() <= 1e-4


def test_arbooth_fork_matches_the_shared_reference() -> None:
    g = torch.load(SHARED / "golden/infinity/arbooth_tiny.pt", weights_only=True)
    model = _infinity(g, lvl_embed_every_chunk=True)
    schedule = [tuple(s) for s in g["config"]["scale_schedule"]]
    text, mask = unpack_text(g["inputs"]["text_cond_train"][0], g["inputs"]["text_cond_train"][1])
    with torch.no_grad():
        logits = model(text, mask, g["train"]["x_BLC_wo_prefix"], schedule)
    assert (logits - g["train"]["logits"]).abs().max().item() <= 1e-5
