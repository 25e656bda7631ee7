"""Our models with the seeded weights of a golden file in tests/golden (shared by the model tests, so
each file's constructor arguments are read in one place). The weights are rebuilt from the file's seed
in the official key layout (tests/golden/seeded.py) and must hash to the fingerprint the generator
recorded when it ran the official code."""
from __future__ import annotations

import torch
from golden.seeded import fingerprint, image_from_small, int_to_bits, load_golden, seeded_state_dict

from arbooth.models import BSQVAE, VAR, VQVAE, Infinity
from arbooth.models.bsq_vae import official_vae_state_dict
from arbooth.models.infinity_loading import official_state_dict as infinity_official_state_dict
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


def infinity_golden() -> tuple[dict, dict]:
    """(config, tensors) of the Infinity golden (both files), with the inputs rebuilt: `image` (2, 3, 256, 256)
    in [-1, 1], padded `text` (B, T, C) and `text_mask` (B, T), and per-scale bit lists."""
    config, t = load_golden("infinity_tiny.safetensors")
    t.update(load_golden("infinity_tiny_generate.safetensors")[1])
    t["image"] = image_from_small(t["image_small_u8"], config["image_factor"])
    t["text"], t["text_mask"] = unpack_text(t["text_kv_f16"].float(), config["text_lens"])
    return config, t


def unpack_text(kv_compact: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Official packed text (sum(lens), C) -> padded features (B, max(lens), C) and mask (B, max(lens))."""
    text = kv_compact.new_zeros(len(lens), max(lens), kv_compact.shape[1])
    mask = torch.zeros(len(lens), max(lens), dtype=torch.bool)
    start = 0
    for i, n in enumerate(lens):
        text[i, :n], mask[i, :n] = kv_compact[start:start + n], True
        start += n
    return text, mask


def split_bits(bits_int: torch.Tensor, schedule: list[tuple[int, int, int]], d: int) -> list[torch.Tensor]:
    """Stored (B, L) ints -> per-scale bit maps (B, h, w, d) uint8."""
    sizes = [h * w for _, h, w in schedule]
    return [int_to_bits(x, d).reshape(x.shape[0], h, w, d)
            for x, (_, h, w) in zip(bits_int.split(sizes, 1), schedule)]


def golden_bsq_vae(config: dict) -> BSQVAE:
    v = config["vae"]
    vae = BSQVAE(codebook_dim=v["codebook_dim"], base_ch=v["base_ch"], num_res_blocks=v["num_res_blocks"],
                 ch_mult=tuple(v["ch_mult"])).eval()
    vae.load_state_dict(seeded(official_vae_state_dict(vae), config["vae_seed"], config["vae_fingerprint"],
                               "BSQ-VAE"), strict=True)
    return vae


def golden_infinity(config: dict, **switches) -> tuple[BSQVAE, Infinity]:
    vae = golden_bsq_vae(config)
    kw = config["infinity"]
    model = Infinity(vae, depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
                     mlp_ratio=kw["mlp_ratio"], text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                     block_chunks=kw["block_chunks"], **switches).eval()
    model.load_state_dict(seeded(infinity_official_state_dict(model), config["infinity_seed"],
                                 config["infinity_fingerprint"], "Infinity"), strict=True)
    return vae, model


def arbooth_golden() -> tuple[dict, dict]:
    """(config, tensors) of the ARBooth-fork golden (both files), inputs rebuilt: `image` (2, 3, 512, 512),
    `text_features` (2, 16, 2048), `reg_text`/`reg_mask` (the class prompt, padded) and `gt_BL` bits."""
    config, t = load_golden("arbooth_tiny.safetensors")
    t.update(load_golden("arbooth_tiny_distill.safetensors")[1])
    t["image"] = image_from_small(t["image_small_u8"], config["image_factor"])
    t["text_features"] = t["text_features_f16"].float()
    n = config["text"]["class_len"]
    t["reg_text"] = t["reg_text_f16"].float().expand(2, n, -1).clone()
    t["reg_mask"] = torch.ones(2, n, dtype=torch.bool)
    t["gt_BL"] = int_to_bits(t["train.gt_bits_int"], config["codebook_dim"])
    return config, t


def golden_arbooth(config: dict) -> tuple[BSQVAE, Infinity, torch.Tensor]:
    """Our Infinity with the fork's switches (lvl_embed every chunk) and the fork's seeded weights; the
    fork's only extra entry, `special_token` (P, 2048), is returned apart (the caller splices it in)."""
    vae = golden_bsq_vae(config)
    kw = config["infinity"]
    model = Infinity(vae, depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
                     mlp_ratio=kw["mlp_ratio"], text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                     block_chunks=kw["block_chunks"], lvl_embed_every_chunk=True).eval()
    layout = infinity_official_state_dict(model)
    layout["special_token"] = torch.zeros(config["text"]["text_prefix_length"], 2048)
    sd = seeded(layout, config["infinity_seed"], config["infinity_fingerprint"], "ARBooth Infinity")
    token_PC = sd.pop("special_token")
    model.load_state_dict(sd, strict=True)
    return vae, model, token_PC
