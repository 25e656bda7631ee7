"""Tiny random models with the released architectures, built in memory (no download): a tiny VAR
(`build_tiny_var`), the tiny Infinity sizes (`TINY`) and a tiny T5 text encoder with a word-level tokenizer.

Used by `train_subject.py --tiny`, the tests and the CPU benchmark, so that the whole ARBooth
recipe runs end to end without any checkpoint. The tokenizer is a `transformers`
PreTrainedTokenizerFast over a fixed word list (unknown words map to <unk>), with T5's
conventions: pad id 0, eos "</s>" appended to every prompt.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from arbooth.models.var import VAR
from arbooth.models.vqvae import VQVAE
from arbooth.toy.text import word_level_tokenizer

if TYPE_CHECKING:  # transformers is imported only when a tiny T5 is built (`sample --tiny` stays light)
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

# A tiny model with the released architecture: for smoke runs, tests and benchmarks without weights.
TINY_VAE = {"vocab_size": 64, "z_channels": 8, "ch": 32, "share_quant_resi": 4, "patch_nums": (1, 2, 3, 4)}
TINY_VAR = {"num_classes": 10, "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4.0, "norm_eps": 1e-6,
            "shared_aln": False, "attn_l2_norm": True, "patch_nums": (1, 2, 3, 4)}

# The tiny random Infinity of `model.preset=tiny` (`train_subject.py --tiny`, tests, benchmarks): the
# released architecture at 2 blocks x 64 channels, a 3-level VAE and 128-channel text features.
TINY = {"vae": {"codebook_dim": 8, "base_ch": 32, "num_res_blocks": 1, "ch_mult": (1, 1, 2, 2, 2)},
        "model": {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4.0, "text_channels": 128,
                  "text_maxlen": 32, "block_chunks": 1}}

_WORDS = ["a", "an", "the", "of", "photo", "picture", "in", "on", "with", "and", "at", "top", "wearing", "is", "dog", "cat", "teapot", "toy", "vase", "clock", "sunglasses", "statue", "barn", "bear", "duck", "monster", "elephant", "red", "blue", "green", "pink", "black", "brown", "white", "jungle", "snow", "beach", "street", "fabric", "table", "grass", "city", "water", "floor", "santa", "hat", "sitting", "purple", "rainbow"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny T5's word-level tokenizer over `_WORDS` (punctuation split off)."""
    return word_level_tokenizer(_WORDS)


def build_tiny_t5(channels: int = 32, *, seed: int = 0) -> tuple[PreTrainedTokenizerFast, T5EncoderModel]:
    """(tokenizer, encoder) with `channels`-wide outputs, random weights from `seed`, eval mode, frozen."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_tokenizer()
    config = T5Config(vocab_size=len(tokenizer) + 8, d_model=channels, d_kv=8, d_ff=2 * channels,
                      num_layers=1, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(config).eval().requires_grad_(False)
    return tokenizer, encoder


def build_tiny_var(seed: int = 0, device: str | torch.device = "cpu", **overrides) -> VAR:
    """A tiny randomly initialised VAR (64x64 images, 10 classes) with its tokenizer at `var.vae`.
    Seeded without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VQVAE(**TINY_VAE)
        var = VAR(vae, **{**TINY_VAR, **overrides})
    return var.to(device).eval()


def tiny_infinity_base(model_cfg, model_kwargs: dict) -> tuple:
    """`model.preset=tiny`: (vae, model, tokenizer, t5_encoder, base_id), random weights drawn from
    `model_cfg.seed`, frozen, eval mode, on the CPU. `model_kwargs` go to `Infinity` (drop path,
    level-embedding quirk, gradient checkpointing)."""
    from arbooth.models.bsq_vae import BSQVAE
    from arbooth.models.infinity import Infinity

    torch.manual_seed(model_cfg.seed)
    vae = BSQVAE(**TINY["vae"]).eval().requires_grad_(False)
    model = Infinity(vae, **TINY["model"], **model_kwargs).eval().requires_grad_(False)
    tokenizer, encoder = build_tiny_t5(TINY["model"]["text_channels"], seed=model_cfg.seed)
    return vae, model, tokenizer, encoder, f"tiny-random seed={model_cfg.seed}"

