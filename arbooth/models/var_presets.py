"""The released VAR family as constructor arguments: the one table `load_var`, VAR's tokenizer and the class
recipe's `model` section (arbooth/adapt/finetuned.py ModelConfig) all read (FoundationVision/VAR
models/__init__.py build_vae_var). Plain Python, no torch: a config imports it without the model."""
from __future__ import annotations

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map sides of the ten scales (256x256 images)


def var_arch(depth: int) -> dict:
    """VAR's constructor arguments for the released architecture at `depth` (official models/__init__.py
    build_vae_var): width 64 * depth, `depth` heads, 1000 ImageNet classes. The one place these numbers
    live: `VAR_PRESETS` (load_var) and the class recipe's `model` section (adapt/finetuned.py ModelConfig)
    both read it."""
    return {"depth": depth, "embed_dim": 64 * depth, "num_heads": depth, "mlp_ratio": 4.0, "norm_eps": 1e-6,
            "shared_aln": False, "attn_l2_norm": True, "num_classes": 1000, "patch_nums": PATCH_NUMS}


# VAR's sampling default (official var.py autoregressive_infer_cfg cfg=1.5; 0 = no guidance, see
# models/sampling.py): train-class's sample grids, sample, eval-class and the toy class evaluator read it.
VAR_GUIDANCE = 1.5

VAR_PRESETS = {d: var_arch(d) for d in (16, 20, 24, 30)}  # the released sizes (var_d{depth}.pth)
# The released tokenizer vae_ch160v4096z32.pth (vq-f16: five levels, 16x down-sampling).
VAE_PRESET = {"vocab_size": 4096, "z_channels": 32, "ch": 160, "share_quant_resi": 4, "patch_nums": PATCH_NUMS,
              "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2}
