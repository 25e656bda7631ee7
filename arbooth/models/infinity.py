"""Infinity: bitwise next-scale text-to-image transformer (FoundationVision/Infinity, 2B and 8B releases).

Same math as infinity/models/infinity.py + basic.py at commit 4c27bbb with the released inference
flags (shared AdaLN, cosine self-attention with 2-D RoPE `rope2d_normalized_by_hw=2` in every block,
cross-attention to T5 features, plain GELU-tanh FFN, AdaLN before the head, bit labels), in eval and
train mode, without flash-attn: every attention is `F.scaled_dot_product_attention`, and text of
different lengths is a padded batch with a bool mask (the release packs it for a varlen kernel).

The 2B and 8B releases use the same flags (tools/run_infinity.py, scripts/infer.sh,
tools/interactive_infer_8b.ipynb): `rope2d_each_sa_layer=1`, `rope2d_normalized_by_hw=2`,
`add_lvl_embeding_only_first_block=1`, `use_bit_label=1`; `use_scale_schedule_embedding=0` is parsed
but never reaches the constructor and `sampling_per_bits=1` is accepted but unused by
`autoregressive_infer_cfg`, so neither changes anything. What 8B adds is `apply_spatial_patchify=1`:
the transformer's tokens carry k = 4d bits of a 2 x 2 patch of the latent grid (word_embed k -> C,
head C -> 2k); the tokenizer owns that mapping (`BSQVAE(spatial_patchify=True)`, see
arbooth/models/bsq_vae.py), so the model reads k as `vae.token_dim` and the latent grid as
`vae.latent_schedule`. Sizes of both releases: `INFINITY_PRESETS` at the end of this file.

Internal names differ from the release where Opacus/peft need plain layers: q/k/v are separate
nn.Linear (the release fuses them with loose bias tensors), blocks are `blocks.{i}` (the release:
`block_chunks.{c}.module.{j}`), and every raw tensor of the release (`cfg_uncond`, `pos_start`, the
pool query, `scale_mul_1H11`, `ada_gss`) lives in a leaf module with a registered Opacus grad sampler,
as in VAR, so every trainable tensor has a per-sample gradient (DP text-to-image tuning needs no
patches; tests/privacy/test_infinity_grad_sample.py). `load_state_dict` accepts the released layout
(arbooth/models/infinity_keys.py lists the renames); `arbooth.models.infinity_loading.official_state_dict`
gives it back.

Shape letters: B batch (2B with classifier-free guidance), L tokens of a schedule, l tokens of one
scale, C model width, D condition width (= C), T text tokens, Ct text width, H heads, c head width,
d bits per token (`vae.token_dim`: 4 x the VAE's bits with spatial patchify); V = 2d logits per token, a
(bit = 0, bit = 1) pair per bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from torch import nn
from torch.utils.checkpoint import checkpoint

from arbooth.errors import ConfigError
from arbooth.models.infinity_keys import UNCOND_KEY, from_official_keys
from arbooth.models.infinity_schedule import Schedule, rope_grid_size
from arbooth.models.kv_cache import KVCache
from arbooth.models.leaf_params import AdaGSS, HeadScale
from arbooth.models.sampling import check_sampling_args, sample_bits, seed_generators
from arbooth.models.tokenizer_holder import TokenizerHolder
from arbooth.precision import autocast

# ----------------------------------------------------------------------------- helpers


def rope_cos_sin(schedule: Schedule, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, c/2) of the released 2-D RoPE (basic.py precompute_rope2d_freqs_grid, mode 2):
    each scale's (h, w) grid is spread over the template's final 1M map by rounded index striding;
    the first c/4 rotation pairs encode the row, the last c/4 the column."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.int64).float() / (head_dim // 2)))
    uph, upw = rope_grid_size(schedule)
    parts = []
    for _, ph, pw in schedule:
        rows = (torch.arange(ph) * (uph / ph)).round().int().float()
        cols = (torch.arange(pw) * (upw / pw)).round().int().float()
        ang_h = torch.outer(rows, inv_freq)[:, None, :].expand(ph, pw, quarter)
        ang_w = torch.outer(cols, inv_freq)[None, :, :].expand(ph, pw, quarter)
        parts.append(torch.cat([ang_h, ang_w], -1).reshape(ph * pw, 2 * quarter))
    ang = torch.cat(parts)
    return ang.cos().to(device), ang.sin().to(device)


def apply_rope(x_BHLc: torch.Tensor, cos_Lc: torch.Tensor, sin_Lc: torch.Tensor) -> torch.Tensor:
    x = x_BHLc.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack([cos_Lc * x0 - sin_Lc * x1, sin_Lc * x0 + cos_Lc * x1], -1).flatten(-2)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    # fused_op.py fused_ada_layer_norm: non-affine LayerNorm in fp32, then (1 + scale), + shift.
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)


# ----------------------------------------------------------------------------- leaf modules owning raw parameters
# The release keeps these as loose nn.Parameters on the model or the attention pool; each lives in a leaf
# module here, with an Opacus grad sampler below, so per-sample gradients (DP) need no patches. The
# shared ones (HeadScale, AdaGSS) are in arbooth/models/leaf_params.py; renames: infinity_keys.py.
class UncondText(nn.Module):
    """The unconditional prompt of classifier-free guidance, `cfg_uncond` (text_maxlen, Ct): rows of the
    text (B, T, Ct) where the bool `drop_B` (B,) is True are replaced by its first T rows."""

    def __init__(self, init_TC: torch.Tensor):
        super().__init__()
        self.cfg_uncond = nn.Parameter(init_TC)

    def forward(self, text_BTC: torch.Tensor, drop_B: torch.Tensor) -> torch.Tensor:
        T = text_BTC.shape[1]
        if T > self.cfg_uncond.shape[0]:
            if bool(drop_B.any()):
                raise ConfigError(f"prompt of {T} tokens is longer than text_maxlen={self.cfg_uncond.shape[0]}")
            return text_BTC
        return torch.where(drop_B.view(-1, 1, 1).bool(), self.cfg_uncond[:T].to(text_BTC), text_BTC)


class StartToken(nn.Module):
    """The first scale's input: pooled text condition (B, C) + `pos_start` (1, 1, C) -> (B, 1, C)."""

    def __init__(self, C: int, std: float):
        super().__init__()
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        nn.init.trunc_normal_(self.pos_start, std=std)

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return cond_BD.unsqueeze(1) + self.pos_start


class PoolQuery(nn.Module):
    """The attention pool's learnt query `mat_q` (1, H, c), expanded to the batch of the text mask
    `mask_BT` (B, T) as (B, H, 1, c). The input gives only the batch size; it is the mask because a
    tensor that needs no gradient makes Opacus' backward hook fire on the output's gradient (an input
    that needs one but does not reach the output, like the text features, would never fire it)."""

    def __init__(self, H: int, c: int, std: float):
        super().__init__()
        self.mat_q = nn.Parameter(torch.empty(1, H, c))
        nn.init.trunc_normal_(self.mat_q, std=std)

    def forward(self, mask_BT: torch.Tensor) -> torch.Tensor:
        return self.mat_q.expand(mask_BT.shape[0], -1, -1).unsqueeze(2)


@register_grad_sampler(UncondText)
def _uncond_grad_sample(layer: UncondText, activations, backprops: torch.Tensor) -> dict:
    w = layer.cfg_uncond
    if not w.requires_grad:
        return {}
    drop_B = activations[1].view(-1, 1, 1).to(backprops.dtype)
    g_BTC = backprops * drop_B  # rows that kept their prompt do not touch cfg_uncond
    return {w: F.pad(g_BTC, (0, 0, 0, w.shape[0] - g_BTC.shape[1])).to(w.dtype)}


@register_grad_sampler(StartToken)
def _start_grad_sample(layer: StartToken, activations, backprops: torch.Tensor) -> dict:
    p = layer.pos_start
    return {p: backprops.reshape(-1, *p.shape).to(p.dtype)} if p.requires_grad else {}


@register_grad_sampler(PoolQuery)
def _pool_query_grad_sample(layer: PoolQuery, activations, backprops: torch.Tensor) -> dict:
    p = layer.mat_q
    return {p: backprops.reshape(-1, *p.shape).to(p.dtype)} if p.requires_grad else {}


# ----------------------------------------------------------------------------- attention, blocks


class SelfAttention(nn.Module):
    """Cosine attention: q, k l2-normalised, q scaled by a learnt per-head exp(scale_mul) <= 100 (`head_scale`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.head_scale = HeadScale(num_heads, cast_to_input=False)  # bf16 q * fp32 scale -> fp32, as released
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLC, cos_Lc, sin_Lc, mask_LL=None, cache: KVCache | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q, k, v = (f(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        q = self.head_scale(F.normalize(q, dim=-1, eps=1e-12))
        k = F.normalize(k, dim=-1, eps=1e-12)
        # RoPE runs in fp32 (fp32 tables); attention takes q, k in v's dtype, so the cache keeps k in
        # that dtype too (half the cache under bf16 autocast, no re-cast of the whole cache each scale)
        q, k = apply_rope(q, cos_Lc, sin_Lc).to(v.dtype), apply_rope(k, cos_Lc, sin_Lc).to(v.dtype)
        if cache is not None:  # generation: earlier scales' keys/values (RoPE already applied)
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values from the (padded) text tokens."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(kv_dim, dim, bias=False), nn.Linear(kv_dim, dim)
        self.proj = nn.Linear(dim, dim)

    def attend(self, q_BHlc: torch.Tensor, kv_BTC: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        B, T, _ = kv_BTC.shape
        k = self.k(kv_BTC).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(kv_BTC).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q_BHlc.to(v.dtype), k.to(v.dtype), v, attn_mask=mask_BT[:, None, None, :])
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, x_BLC, kv_BTC, mask_BT) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        return self.attend(self.q(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2), kv_BTC, mask_BT)


class TextAttentivePool(CrossAttention):
    """One learnt query attends over the text: the pooled condition (and start token). Released head
    width: 128 (64 when D > 4096), heads = Ct // head width."""

    def __init__(self, text_dim: int, dim: int):
        head_width = 64 if dim > 4096 else 128
        if text_dim % head_width or dim % (text_dim // head_width):
            raise ConfigError(f"text_channels must be a multiple of {head_width} whose quotient divides "
                              f"embed_dim, got text_channels={text_dim}, embed_dim={dim}")
        super().__init__(dim, text_dim, text_dim // head_width)
        del self.q
        self.query = PoolQuery(self.num_heads, self.head_dim, std=math.sqrt(1 / dim / 3))

    def forward(self, kv_BTC, mask_BT) -> torch.Tensor:
        return self.attend(self.query(mask_BT), kv_BTC, mask_BT).squeeze(1)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtypes: what CUDA autocast does to
    layer_norm, spelled out so that bf16 blocks also run under CPU autocast (which leaves a bf16 weight
    next to an fp32 input and fails). Returns fp32. Opacus' LayerNorm sampler applies (registered below)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


@register_grad_sampler(FP32LayerNorm)
def _fp32_layer_norm_grad_sample(layer: FP32LayerNorm, activations, backprops: torch.Tensor) -> dict:
    grads = compute_layer_norm_grad_sample(layer, [activations[0].float()], backprops.float())
    return {p: g.to(p.dtype) for p, g in grads.items()}


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttnBlock(nn.Module):
    """AdaLN self-attention, LayerNorm cross-attention, AdaLN FFN (basic.py CrossAttnBlock, fused-norm
    branch). `ada_gss` is added to the shared AdaLN output: gamma1, gamma2, scale1, scale2, shift1, shift2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, eps: float):
        super().__init__()
        self.eps, self.drop_path = eps, drop_path
        self.ada_gss = AdaGSS(dim)
        self.sa = SelfAttention(dim, num_heads)
        self.ca = CrossAttention(dim, dim, num_heads)
        self.ffn = FFN(dim, round(dim * mlp_ratio / 256) * 256)
        self.ca_norm = FP32LayerNorm(dim, eps=eps)

    def forward(self, x_BLC, gss_B16C, kv_BTC, kv_mask_BT, cos_Lc, sin_Lc, mask_LL=None, cache=None):
        g1, g2, s1, s2, b1, b2 = self.ada_gss(gss_B16C).unbind(2)  # B1C each
        h = self.sa(_ada_layer_norm(x_BLC, s1, b1, self.eps), cos_Lc, sin_Lc, mask_LL, cache)
        x_BLC = x_BLC + drop_path(h.mul(g1), self.drop_path, self.training)
        x_BLC = x_BLC + self.ca(self.ca_norm(x_BLC), kv_BTC, kv_mask_BT).float()
        h = self.ffn(_ada_layer_norm(x_BLC, s2, b2, self.eps))
        return x_BLC + drop_path(h.mul(g2), self.drop_path, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, x_BLC.shape[-1]).unbind(2)
        return _ada_layer_norm(x_BLC, scale, shift, self.eps)


# ----------------------------------------------------------------------------- model


@dataclass
class TextCond:
    """The text condition every block sees: pooled `cond_BD` (also the start token), shared AdaLN
    `gss_B16C`, projected cross-attention features `kv_BTC` and their bool mask `mask_BT`."""

    cond_BD: torch.Tensor
    gss_B16C: torch.Tensor
    kv_BTC: torch.Tensor
    mask_BT: torch.Tensor


@dataclass
class InfinityOutput:
    images: torch.Tensor | None         # (B, 3, H, W) in [0, 1]; None with decode=False
    bits: list[torch.Tensor]            # per scale (B, h, w, d) in {0, 1}
    summed_codes: torch.Tensor          # (B, d_vae, H/p, W/p), the VAE decoder's input (p its patch size)
    logits: list[torch.Tensor] | None   # per scale (B or 2B, l, 2d) before tau and guidance, if asked


class Infinity(TokenizerHolder):
    """Defaults build the released Infinity-2B (`infinity_2b_reg.pth`).

    `vae` gives the bit depth and decodes in `generate`; it is kept out of this module's parameters
    and state_dict (the release's state_dict has none of it; optimisers must not see it) and moves with
    the model, as VAR's tokenizer (arbooth/models/tokenizer_holder.py).
    `lvl_embed_every_chunk=True` adds the level embedding before every block chunk, as the ARBooth
    fork does (official: before the first block only). `gradient_checkpointing` (a constructor argument, as
    on VAR) recomputes blocks in backward. `forward` is deterministic apart from DropPath: prompt dropout
    for guidance training is decided by the caller (`cond_drop_B`, e.g. from `draw_prompt_drop`).
    """

    def __init__(self, vae: nn.Module, depth: int = 32, embed_dim: int = 2048, num_heads: int = 16,
                 mlp_ratio: float = 4.0, text_channels: int = 2048, text_maxlen: int = 512, block_chunks: int = 8,
                 norm_eps: float = 1e-6, drop_path_rate: float = 0.1, lvl_embed_every_chunk: bool = False,
                 gradient_checkpointing: bool = False):
        super().__init__()
        if depth % block_chunks or embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ConfigError(f"need depth % block_chunks == 0 and head width % 4 == 0, got depth={depth}, "
                              f"block_chunks={block_chunks}, embed_dim={embed_dim}, num_heads={num_heads}")
        self.attach_tokenizer(vae)  # not a submodule, moved with the model (arbooth/models/tokenizer_holder.py)
        self.d, self.C, self.depth, self.num_heads = vae.token_dim, embed_dim, depth, num_heads
        self.text_channels, self.text_maxlen, self.block_chunks = text_channels, text_maxlen, block_chunks
        self.lvl_embed_every_chunk, self.gradient_checkpointing = lvl_embed_every_chunk, gradient_checkpointing
        C, init_std = embed_dim, math.sqrt(1 / embed_dim / 3)
        # 1. text conditioning. cfg_uncond: fixed-seed init, as released (infinity.py __init__)
        uncond = torch.empty(text_maxlen, text_channels, device="cpu")  # CPU generator, any default device
        nn.init.trunc_normal_(uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.uncond = UncondText((uncond / text_channels**0.5).to(torch.empty(0).device))
        self.start = StartToken(C, std=init_std)  # start token = pooled text + pos_start
        # basic.py FastRMSNorm (fp32 here: the text path runs with autocast off); torch's module, which
        # Opacus has a grad sampler for, gives the same bits as the release's pure-torch fallback
        self.text_norm = nn.RMSNorm(text_channels, eps=norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, C)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        # 2. input: level embedding, bit-code embedding, shared AdaLN
        self.lvl_embed = nn.Embedding(15, C)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.word_embed = nn.Linear(self.d, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        # 3. backbone and head
        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, 2 * self.d)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows with depth, as released
        self.blocks = nn.ModuleList(CrossAttnBlock(C, num_heads, mlp_ratio, dpr[i], norm_eps) for i in range(depth))
        self.register_load_state_dict_pre_hook(self._load_official)

    # ---- text ----
    def encode_text(self, text_BTC: torch.Tensor, text_mask_BT: torch.Tensor,
                    drop_B: torch.Tensor | None = None) -> TextCond:
        """T5 features (padded, with a bool mask of real tokens) -> TextCond. Rows of `drop_B` (bool)
        are replaced by `cfg_uncond`, the unconditional prompt of classifier-free guidance."""
        if text_BTC.ndim != 3 or text_BTC.shape[-1] != self.text_channels or text_mask_BT.shape != text_BTC.shape[:2]:
            raise ConfigError(f"expected text (B, T, {self.text_channels}) and mask (B, T), got "
                              f"{tuple(text_BTC.shape)} and {tuple(text_mask_BT.shape)}")
        mask = text_mask_BT.bool()
        T = int(mask.sum(1).max())
        if T == 0 or not mask[:, 0].all():
            raise ConfigError("every prompt needs at least one token, starting at position 0")
        text, mask = text_BTC[:, :T].float(), mask[:, :T]
        if drop_B is not None:  # called even when no row drops: DP needs a (zero) per-sample gradient
            text = self.uncond(text, drop_B)
        with torch.autocast(text.device.type, enabled=False):  # the release runs this part in fp32
            kv = self.text_norm(text)
            cond = self.text_proj_for_sos(kv, mask).float()
            gss = self.shared_ada_lin(cond).view(-1, 1, 6, self.C)
        return TextCond(cond, gss, self.text_proj_for_ca(kv), mask)

    # ---- backbone ----
    def _scale_ids(self, schedule: Schedule, device) -> torch.Tensor:
        return torch.cat([torch.full((h * w,), i, device=device) for i, (_, h, w) in enumerate(schedule)])

    def run_blocks(self, x_BLC, tc: TextCond, lvl_L: torch.Tensor, cos_Lc, sin_Lc, mask_LL=None, caches=None):
        """Blocks with the level embedding (ids `lvl_L`) added before the first (or every) chunk."""
        if self.lvl_embed.weight.requires_grad:  # per-sample gradients (Opacus) need the batch dim
            lvl_L = lvl_L.expand(x_BLC.shape[0], -1)
        lvl_LC, per_chunk = self.lvl_embed(lvl_L), self.depth // self.block_chunks
        for i, block in enumerate(self.blocks):
            if i % per_chunk == 0 and (i == 0 or self.lvl_embed_every_chunk):
                x_BLC = x_BLC + lvl_LC
            args = (x_BLC, tc.gss_B16C, tc.kv_BTC, tc.mask_BT, cos_Lc, sin_Lc, mask_LL)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x_BLC = checkpoint(block, *args, use_reentrant=False)
            else:
                x_BLC = block(*args, cache=None if caches is None else caches[i])
        return x_BLC

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h_BLC.device.type, enabled=False):  # the release's head runs in fp32
            return self.head(self.head_nm(h_BLC.float(), cond_BD.float()))

    def forward(self, text_BTC: torch.Tensor, text_mask_BT: torch.Tensor, x_BLC: torch.Tensor,
                schedule: Schedule, cond_drop_B: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, 2d), fp32 (a (bit 0, bit 1) pair per bit). `text_BTC` (B, T, Ct) T5
        features with the bool mask `text_mask_BT` of real tokens; `x_BLC` (B, L - 1, d) is
        `BSQVAE.bits_to_var_input`; `schedule` the (t, h, w) scales. Rows of `cond_drop_B` (bool, B) use
        `cfg_uncond` instead of their prompt (guidance training; None = none dropped). Raises ConfigError
        for inputs of the wrong shape."""
        L = sum(h * w for _, h, w in schedule)
        if x_BLC.shape[1:] != (L - 1, self.d):
            raise ConfigError(f"x_BLC must be (B, {L - 1}, {self.d}) for this schedule, got {tuple(x_BLC.shape)}")
        tc = self.encode_text(text_BTC, text_mask_BT, cond_drop_B)
        sos = self.start(tc.cond_BD)
        x = torch.cat([sos, self.word_embed(x_BLC.float())], 1)
        ids = self._scale_ids(schedule, x.device)
        cos, sin = rope_cos_sin(schedule, self.C // self.num_heads, x.device)
        h = self.run_blocks(x, tc, ids, cos, sin, mask_LL=ids[:, None] >= ids[None, :])
        return self.get_logits(h, tc.cond_BD)

    # ---- sampling ----
    @torch.no_grad()
    def generate(self, text_BTC: torch.Tensor, text_mask_BT: torch.Tensor, schedule: Schedule,
                 cfg: float | list[float] = 4.0, tau: float | list[float] = 0.5, top_k: int = 900,
                 top_p: float = 0.97, seed: int | Sequence[int] | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 use_cache: bool = True, next_scale_mode: str = "trilinear", dtype: str = "bf16",
                 return_logits: bool = False, decode: bool = True) -> InfinityOutput:
        """Sample images scale by scale (infinity.py autoregressive_infer_cfg, cfg on logits).

        Defaults are the released inference settings (scripts/infer.sh, tools/run_infinity.py):
        cfg 4, tau 0.5, top_k 900 (no-op on bit pairs), top_p 0.97. `cfg`/`tau` may be per-scale
        lists. Sampling draws from `generator`, else from a fresh one seeded with `seed`, else from
        the global RNG; a list of seeds (or generators), one per prompt, gives every image its own
        random stream, so an image depends on its seed and not on what else is in the batch (up to
        the last bits of batched arithmetic). Ranges (ConfigError otherwise): top_k >= 0 (0 = off),
        top_p in [0, 1] (0 = off), cfg >= 0 (1 = no guidance), tau > 0. `decode=False` returns the
        bits without decoding images. `use_cache=False` recomputes the whole prefix every scale (reference path).
        `next_scale_mode='area'` reproduces the ARBooth fork's sampler. `dtype` is the autocast
        dtype on the GPU; the CPU runs fp32, or bf16 autocast when the blocks are stored in bf16.
        Inputs: T5 features `text_BTC` (B, T, Ct) with the bool mask `text_mask_BT`, and the (t, h, w)
        `schedule` (`infinity_scale_schedule`). Returns InfinityOutput: images (B, 3, H, W) in [0, 1]
        (H = 16 h of the last scale), per-scale bits (B, h, w, d) in {0, 1}, the summed codes and,
        with `return_logits`, the logits. Raises ConfigError for text of the wrong shape or an empty
        prompt, per-scale `cfg`/`tau` lists shorter than the schedule, or a seed list of the wrong length.
        """
        n, B, dev = len(schedule), text_BTC.shape[0], text_BTC.device
        check_sampling_args(top_k=top_k, top_p=top_p, cfg=cfg, tau=tau, where="Infinity.generate")
        cfgs, taus = _per_scale(cfg, n, "cfg"), _per_scale(tau, n, "tau")
        generator = seed_generators(seed if generator is None else generator, B, dev)
        guided = any(c != 1 for c in cfgs)
        if guided:  # second half of the batch: the unconditional prompt
            drop = torch.arange(2 * B, device=dev) >= B
            text_BTC, text_mask_BT = torch.cat([text_BTC, text_BTC]), torch.cat([text_mask_BT, text_mask_BT])
        tc = self.encode_text(text_BTC, text_mask_BT, drop if guided else None)
        latent, d = self.vae.latent_schedule(schedule), self.d  # the VAE's grid: 2h x 2w with spatial patchify
        full = tuple(latent[-1])
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        cos_all, sin_all = rope_cos_sin(schedule, self.C // self.num_heads, dev)
        ids_all, start = self._scale_ids(schedule, dev), 0
        x_inputs = [self.start(tc.cond_BD)]  # one entry per scale, (2B or B, l, C)
        bits, all_logits, summed = [], [], 0.0
        if dev.type != "cuda":
            dtype = "bf16" if next(self.blocks.parameters()).dtype == torch.bfloat16 else "fp32"
        with autocast(dtype, dev):
            for si, (_, h, w) in enumerate(schedule):
                end = start + h * w
                if use_cache:  # this scale's queries; keys/values of earlier scales come from the caches
                    x, rows, mask = x_inputs[-1], slice(start, end), None
                else:  # the whole prefix with the block-causal mask; the last scale's rows are kept
                    x, rows = torch.cat(x_inputs, 1), slice(0, end)
                    mask = ids_all[rows, None] >= ids_all[None, rows]
                start = end
                hid = self.run_blocks(x, tc, ids_all[rows], cos_all[rows], sin_all[rows], mask, caches)[:, -h * w:]
                if guided and cfgs[si] != 1:
                    logits = self.get_logits(hid, tc.cond_BD)
                else:
                    logits = self.get_logits(hid[:B], tc.cond_BD[:B])
                if return_logits:
                    all_logits.append(logits)
                logits = logits.mul(1 / taus[si])
                if logits.shape[0] != B:  # guidance on the logits (cfg_insertion_layer=[0], as released)
                    logits = cfgs[si] * logits[:B] + (1 - cfgs[si]) * logits[B:]
                b = sample_bits(logits.reshape(B, -1, 2), top_k, top_p, generator).reshape(B, h, w, d)
                bits.append(b.to(torch.uint8))
                codes = self.vae.bits_to_codes(b)  # B d_vae 1 H W (pixel_shuffle of the bits with patchify)
                if si == n - 1:
                    summed = summed + codes
                    break
                summed = summed + F.interpolate(codes, size=full, mode=self.vae.up_mode)
                nxt = F.interpolate(summed, size=tuple(latent[si + 1]), mode=next_scale_mode)
                nxt = self.word_embed(self.vae.codes_to_tokens(nxt))  # B (h w) k
                x_inputs.append(nxt.repeat(x_inputs[0].shape[0] // B, 1, 1))
            # the VAE decoder is the largest transient at 1024x1024 (~3 GiB for two images); callers that
            # only need the bits (ARBooth's teacher) skip it
            images = self.vae.decode(summed.squeeze(2).float()).float().add(1).div(2) if decode else None
        return InfinityOutput(images, bits, summed.squeeze(2), all_logits if return_logits else None)

    # ---- checkpoints ----
    def _load_official(self, module, state_dict, prefix, *args) -> None:
        """Load-time hook: accept the released layout (see the module docstring)."""
        keys = [k for k in state_dict if k.startswith(prefix)]
        converted = from_official_keys({k[len(prefix):]: state_dict.pop(k) for k in keys},
                                       self.depth // self.block_chunks)
        old = converted.get(UNCOND_KEY)
        if old is not None and old.shape[0] != self.text_maxlen:  # released load_state_dict: fit text_maxlen
            new = self.uncond.cfg_uncond.detach()
            converted[UNCOND_KEY] = old[: self.text_maxlen] if old.shape[0] > self.text_maxlen else \
                torch.cat([old.to(new), new[old.shape[0]:]])
        state_dict.update({prefix + k: v for k, v in converted.items()})


def draw_prompt_drop(batch: int, rate: float, device: torch.device | str,
                     generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Prompt dropout for classifier-free-guidance training (infinity.py forward, cond_drop_rate): a bool
    (batch,) mask, each row True with probability `rate`, for `Infinity.forward(cond_drop_B=...)`; None
    when `rate` is 0 (no draw). Drawn from `generator`, else the global RNG."""
    if rate <= 0:
        return None
    return torch.rand(batch, device=device, generator=generator) < rate


def _per_scale(value, n: int, name: str) -> list[float]:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) < n:
        raise ConfigError(f"{name} has {len(values)} entries for {n} scales")
    return values


# ----------------------------------------------------------------------------- presets
# The released sizes (tools/run_infinity.py load_transformer / load_visual_tokenizer at 4c27bbb), one
# entry per release: BSQVAE kwargs and Infinity kwargs. Both releases share every other flag (module
# docstring); 8B's tokenizer is the spatial-patchify d56 one, so its transformer sees 56 bits per token.
INFINITY_PRESETS: dict[str, dict[str, dict]] = {
    "infinity_2b": {  # infinity_vae_d32_reg.pth + infinity_2b_reg.pth
        "vae": {"codebook_dim": 32, "ch_mult": (1, 2, 4, 4, 4), "patch_size": 16},
        "model": {"depth": 32, "embed_dim": 2048, "num_heads": 16, "mlp_ratio": 4.0, "text_channels": 2048,
                  "block_chunks": 8},
    },
    "infinity_8b": {  # infinity_vae_d56_f8_14_patchify.pth + the sharded infinity_8b_weights/ folder
        "vae": {"codebook_dim": 14, "ch_mult": (1, 2, 4, 4), "patch_size": 8, "spatial_patchify": True},
        "model": {"depth": 40, "embed_dim": 3584, "num_heads": 28, "mlp_ratio": 4.0, "text_channels": 2048,
                  "block_chunks": 8},
    },
}
