"""Our models with the seeded weights of a golden file in tests/golden (shared by the model tests, so
each file's constructor arguments are read in one place). The weights are rebuilt from the file's seed
in the official key layout (tests/golden/seeded.py) and must hash to the fingerprint the generator
recorded when it ran the official code."""
from __future__ import annotations

import torch
from golden.seeded import fingerprint, image_from_small, load_golden, seeded_state_dict

from arbooth.models import VAR, VQVAE
from arbooth.models.var_loading import official_state_dict

VAR_GOLDEN = ["var_tiny", "var_tiny_shared_aln"]


def seeded(layout: dict[str, torch.Tensor], seed: int, expected: str, what: str) -> dict[str, torch.Tensor]:
    """Seeded weights for `layout`, checked against the generator's fingerprint."""
    sd = seeded_state_dict(layout, seed)
    assert fingerprint(sd) == expected, (
        f"{what}: the seeded weights differ from those the official code ran with (key layout or torch's "
        "normal generator changed); regenerate with tests/golden/make_golden.py")
    return sd


def golden_vqvae(name: str) -> tuple[VQVAE, dict, dict]:
    """The golden file's VQVAE (strictly loaded, official ema_vocab_hit_SV buffer), its config and tensors."""
    config, t = load_golden(f"{name}.safetensors")
    c = config["model"]
    vae = VQVAE(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                share_quant_resi=c["share_quant_resi"], patch_nums=tuple(c["patch_nums"]))
    vae.load_state_dict(seeded(official_state_dict(vae, include_buffers=True), config["vae_seed"],
                               config["vae_fingerprint"], f"{name} VQVAE"))
    t["image"] = image_from_small(t["image_small_u8"], config["image_factor"])
    t["idx_Bl"] = list(t["idx"].split([p * p for p in c["patch_nums"]], 1))
    return vae, config, t


def golden_var(name: str) -> tuple[VAR, dict, dict]:
    """The golden file's VAR (its VQVAE at `var.vae`), strictly loaded in the official layout, eval mode."""
    vae, config, t = golden_vqvae(name)
    c = config["model"]
    var = VAR(vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["embed_dim"],
              num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], norm_eps=c["norm_eps"],
              shared_aln=c["shared_aln"], attn_l2_norm=c["attn_l2_norm"], patch_nums=tuple(c["patch_nums"]))
    var.load_state_dict(seeded(official_state_dict(var, include_buffers=True), config["var_seed"],
                               config["var_fingerprint"], f"{name} VAR"))
    return var.eval(), config, t
