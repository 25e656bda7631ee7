"""Builders for the models behind the official reference vectors in ../shared/golden (shared by the
model tests, so each golden file's constructor arguments are read in one place)."""
from __future__ import annotations

from pathlib import Path

import torch

from arbooth.models import BSQVAE, VAR, VQVAE, Infinity

VAR_GOLDEN = ["var_tiny.pt", "var_tiny_shared_aln.pt"]


def golden_vqvae(shared_dir: Path, name: str) -> tuple[VQVAE, dict]:
    """The golden file's VQVAE, strictly loaded (with the official ema_vocab_hit_SV buffer), and the file."""
    g = torch.load(shared_dir / "golden" / "var" / name, weights_only=False)
    c = g["config"]
    vae = VQVAE(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                share_quant_resi=c["share_quant_resi"], patch_nums=tuple(c["patch_nums"]))
    vae.load_state_dict(g["vae_state_dict"])
    return vae, g


def golden_var(shared_dir: Path, name: str) -> tuple[VAR, dict]:
    """The golden file's VAR (its VQVAE at `var.vae`), strictly loaded in the official layout, eval mode."""
    vae, g = golden_vqvae(shared_dir, name)
    c = g["config"]
    var = VAR(vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["embed_dim"],
              num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], norm_eps=c["norm_eps"],
              shared_aln=c["shared_aln"], attn_l2_norm=c["attn_l2_norm"], patch_nums=tuple(c["patch_nums"]))
    var.load_state_dict(g["var_state_dict"])
    return var.eval(), g


def infinity_golden(shared_dir: Path) -> dict:
    return torch.load(shared_dir / "golden/infinity/infinity_tiny.pt", weights_only=True)


def golden_bsq_vae(golden: dict) -> BSQVAE:
    vae = BSQVAE(codebook_dim=16, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2)).eval()
    vae.load_state_dict(dict(golden["vae_state_dict"]), strict=True)
    return vae


def golden_infinity(golden: dict) -> tuple[BSQVAE, Infinity]:
    vae = golden_bsq_vae(golden)
    kw = golden["config"]["infinity"]["constructor_kwargs"]
    model = Infinity(vae, depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
                     mlp_ratio=kw["mlp_ratio"], text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                     block_chunks=kw["block_chunks"]).eval()
    model.load_state_dict(dict(golden["infinity_state_dict"]), strict=True)
    return vae, model
