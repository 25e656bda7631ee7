"""VAR: class-conditional next-scale prediction transformer (Tian et al., 2024, "Visual Autoregressive
Modeling: Scalable Image Generation via Next-Scale Prediction").

Same math as FoundationVision/VAR models/var.py and basic_var.py, restructured so that peft and Opacus
adapt it without patches:
- q/k/v come from a plain bias-free `nn.Linear` (`mat_qkv`); the q/v biases are added to its output
  by a small module, so a LoRA on `mat_qkv` gets gradients;
- every raw parameter of the official code (`pos_start`, `pos_1LC`, `q_bias`, `v_bias`,
  `scale_mul_1H11`, `ada_gss`) lives in a small leaf module with a registered Opacus grad sampler;
- no buffers, no randomness in `forward`: class dropout for guidance training is decided by the caller
  (`arbooth.models.var_training.drop_labels`).
The renames this needs are listed once, in `_RENAMES`; `load_state_dict` accepts official state
dicts as they are, and `arbooth.models.official_state_dict` writes them back.

Shapes: B batch, L all tokens (sum of pn*pn), l tokens of one scale, C width, D condition width
(= C), H heads, c head width, V vocabulary, Cv tokenizer channels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.utils.checkpoint import checkpoint

from arbooth.errors import ConfigError
from arbooth.models.key_renames import KeyRenames, name_pattern
from arbooth.models.kv_cache import KVCache
from arbooth.models.leaf_params import AdaGSS, HeadScale
from arbooth.models.sampling import (
    check_sampling_args,
    gumbel_softmax,
    sample_top_k_top_p,
    seed_generators,
    top_k_top_p_filter,
)
from arbooth.models.tokenizer_holder import TokenizerHolder
from arbooth.models.var_presets import PATCH_NUMS, VAE_PRESET, VAR_GUIDANCE, VAR_PRESETS, var_arch  # noqa: F401 (re-exported)
from arbooth.models.vqvae import VQVAE
from arbooth.precision import autocast

# (our name, official name); {i} is a block index. The only renames: raw parameters moved into leaf modules.
_RENAMES = (
    ("pos.pos_start", "pos_start"),
    ("pos.pos_1LC", "pos_1LC"),
    ("blocks.{i}.attn.qkv_bias.q_bias", "blocks.{i}.attn.q_bias"),
    ("blocks.{i}.attn.qkv_bias.v_bias", "blocks.{i}.attn.v_bias"),
    ("blocks.{i}.attn.head_scale.scale_mul_1H11", "blocks.{i}.attn.scale_mul_1H11"),
    ("blocks.{i}.ada_gss.gss", "blocks.{i}.ada_gss"),
)
# Official buffers: constants we compute on the fly. Accepted (and ignored) when loading.
OFFICIAL_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "blocks.{i}.attn.zero_k_bias")


_KEYS = KeyRenames(_RENAMES)
_BUFFERS = tuple(name_pattern(b) for b in OFFICIAL_BUFFERS)


def to_official_name(key: str) -> str:
    return _KEYS.to_official(key)


def from_official_name(key: str) -> str:
    return _KEYS.from_official(key)


def is_official_buffer(key: str) -> bool:
    return any(p.fullmatch(key) for p in _BUFFERS)


# ------------------------------------------------------------------ leaf modules owning raw parameters
class TokenPositions(nn.Module):
    """Adds the start-token embedding `pos_start` to the first scale and the absolute position table
    `pos_1LC` to every token."""

    def __init__(self, first_l: int, L: int, C: int):
        super().__init__()
        self.pos_start = nn.Parameter(torch.empty(1, first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        L, first_l = x_BLC.shape[1], self.pos_start.shape[1]
        return x_BLC + F.pad(self.pos_start, (0, 0, 0, L - first_l)) + self.pos_1LC[:, :L]


class QVBias(nn.Module):
    """Adds (q_bias, 0, v_bias) to the bias-free `mat_qkv` output: keys have no bias (official zero_k_bias)."""

    def __init__(self, C: int):
        super().__init__()
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))

    def forward(self, qkv_BL3C: torch.Tensor) -> torch.Tensor:
        bias_3C = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return qkv_BL3C + bias_3C.to(qkv_BL3C.dtype)


# Per-sample gradients (Opacus extension point): each output is `input + parameter`-like, so the
# per-sample gradient is the backprop summed over the broadcast dimensions.
@register_grad_sampler(TokenPositions)
def _token_positions_grad_sample(layer: TokenPositions, activations, backprops: torch.Tensor) -> dict:
    L = backprops.shape[1]
    out = {}
    if layer.pos_start.requires_grad:
        out[layer.pos_start] = backprops[:, : layer.pos_start.shape[1]].unsqueeze(1)
    if layer.pos_1LC.requires_grad:
        out[layer.pos_1LC] = F.pad(backprops, (0, 0, 0, layer.pos_1LC.shape[1] - L)).unsqueeze(1)
    return out


@register_grad_sampler(QVBias)
def _qv_bias_grad_sample(layer: QVBias, activations, backprops: torch.Tensor) -> dict:
    C = layer.q_bias.shape[0]
    g_B3C = backprops.reshape(backprops.shape[0], -1, 3 * C).sum(1)
    return {p: g for p, g in ((layer.q_bias, g_B3C[:, :C]), (layer.v_bias, g_B3C[:, 2 * C:])) if p.requires_grad}


# ------------------------------------------------------------------ blocks (basic_var.py)
class SelfAttention(nn.Module):
    def __init__(self, C: int, H: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = H, C // H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.qkv_bias = QVBias(C)
        self.head_scale = HeadScale(H) if attn_l2_norm else None
        self.scale = 1.0 if attn_l2_norm else 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(C, C)

    def forward(self, x_BLC: torch.Tensor, mask_LL: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        qkv = self.qkv_bias(self.mat_qkv(x_BLC)).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B H L c
        if self.head_scale is not None:
            q, k = self.head_scale(F.normalize(q, dim=-1)), F.normalize(k, dim=-1)
        if cache is not None:  # generation: attend to this scale and every cached earlier scale
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask_LL, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class condition."""

    def __init__(self, C: int, H: int, mlp_ratio: float, norm_eps: float, shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.C, self.shared_aln = C, shared_aln
        self.attn = SelfAttention(C, H, attn_l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = AdaGSS(C)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor, mask_LL: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        # cond: (B, D), or (B, 1, 6, C) from the model's shared_ada_lin when shared_aln
        mod_B16C = self.ada_gss(cond) if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)  # each B 1 C
        x_BLC = x_BLC + self.attn(self.ln_wo_grad(x_BLC) * (scale1 + 1) + shift1, mask_LL, cache) * gamma1
        return x_BLC + self.ffn(self.ln_wo_grad(x_BLC) * (scale2 + 1) + shift2) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC) * (scale + 1) + shift


# ------------------------------------------------------------------ model
# The release table (VAR_PRESETS, VAE_PRESET, var_arch, PATCH_NUMS) lives in var_presets.py, a module
# without torch, so that configs read it without importing the model (and Opacus' grad samplers).


class VAR(TokenizerHolder):
    """Class-conditional next-scale transformer over the tokenizer `vae` (kept at `self.vae`)."""

    def __init__(
        self,
        vae: VQVAE,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        patch_nums: tuple[int, ...] = PATCH_NUMS,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        # 0. hyperparameters
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if tuple(patch_nums) != tuple(vae.patch_nums):
            raise ConfigError(f"VAR patch_nums {tuple(patch_nums)} differ from the tokenizer's {vae.patch_nums}")
        self.num_classes, self.depth, self.C, self.num_heads = num_classes, depth, embed_dim, num_heads
        self.Cvae, self.V, self.patch_nums = vae.Cvae, vae.vocab_size, tuple(patch_nums)
        self.shared_aln = shared_aln
        self.L, self.first_l = sum(pn * pn for pn in self.patch_nums), self.patch_nums[0] ** 2
        ends = [sum(pn * pn for pn in self.patch_nums[: i + 1]) for i in range(len(self.patch_nums))]
        self.begin_ends = [(e - pn * pn, e) for e, pn in zip(ends, self.patch_nums)]
        self.gradient_checkpointing = gradient_checkpointing  # recompute blocks in backward (less memory)
        # The frozen tokenizer generate() decodes with: not a submodule, moved with the model
        # (arbooth/models/tokenizer_holder.py, the same for Infinity).
        self.attach_tokenizer(vae)

        # 1. input embedding of the tokenizer features
        self.word_embed = nn.Linear(self.Cvae, embed_dim)
        # 2. class embedding, with index num_classes as the unconditional class
        init_std = math.sqrt(1 / embed_dim / 3)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        # 3. start token, absolute positions and per-scale level embedding
        self.pos = TokenPositions(self.first_l, self.L, embed_dim)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        for w in (self.class_emb.weight, self.pos.pos_start, self.pos.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(w, mean=0, std=init_std)
        # 4. backbone
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim)) if shared_aln else None
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(embed_dim, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm) for _ in range(depth)
        )
        # 5. classifier head
        self.head_nm = AdaLNBeforeHead(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)
        self.register_load_state_dict_pre_hook(_accept_official_layout)

    def levels(self, device: torch.device) -> torch.Tensor:
        """Scale index of every token: (L,) LongTensor."""
        return torch.cat([torch.full((pn * pn,), i, device=device) for i, pn in enumerate(self.patch_nums)])

    def _block_cond(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return cond_BD if self.shared_ada_lin is None else self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.C)

    def _logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_BLC.device.type, enabled=False):  # the head runs in the weights' precision
            w = self.head.weight.dtype
            return self.head(self.head_nm(x_BLC.to(w), cond_BD.to(w))).float()

    def forward(self, labels_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: class labels (B,) in [0, num_classes] (num_classes = unconditional) and tokenizer
        input (B, L - first_l, Cv) (`VQVAE.idxBl_to_var_input`) -> logits (B, L, V), fp32. Deterministic:
        class dropout is the caller's (`var_training.drop_labels`). Raises ConfigError for an input of
        the wrong shape."""
        B = labels_B.shape[0]
        if tuple(x_BLCv_wo_first_l.shape) != (B, self.L - self.first_l, self.Cvae):
            raise ConfigError(f"expected teacher-forcing input of shape {(B, self.L - self.first_l, self.Cvae)}, "
                             f"got {tuple(x_BLCv_wo_first_l.shape)}")
        lvl_L = self.levels(labels_B.device)
        with torch.autocast(labels_B.device.type, enabled=False):  # embeddings in full precision, as official
            cond_BD = self.class_emb(labels_B)
            sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
            x_BLC = self.pos(x_BLC) + self.lvl_embed(lvl_L.expand(B, -1))
            cond = self._block_cond(cond_BD)
        mask_LL = lvl_L[:, None] >= lvl_L[None, :]  # block-causal: a token sees its own and coarser scales
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x_BLC = checkpoint(block, x_BLC, cond, mask_LL, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, cond, mask_LL)
        return self._logits(x_BLC, cond_BD)

    @torch.no_grad()
    def generate(
        self,
        labels_B: torch.Tensor | list[int],
        cfg: float = VAR_GUIDANCE,
        top_k: int = 900,
        top_p: float = 0.96,
        seed: int | Sequence[int] | torch.Generator = 0,
        more_smooth: bool = False,
        dtype: str | torch.dtype = "fp32",
        use_kv_cache: bool = True,
        decode: bool = True,
    ) -> torch.Tensor:
        """Sample images (B, 3, H, W) in [0, 1], coarse to fine (official autoregressive_infer_cfg).

        Classifier-free guidance runs in one doubled batch, with guidance ramped linearly over scales:
        logits = (1 + t) cond - t uncond, t = cfg * si / (num_scales - 1). `dtype` ("fp32", "bf16",
        "fp16") sets the autocast of the blocks; head, sampling and tokenizer run in full precision.
        `use_kv_cache=False` is the reference path that re-runs every earlier token at each scale.
        `decode=False` returns the tokenizer feature map f_hat (B, Cv, pn, pn) instead of images.
        `labels_B`: class indices in [0, num_classes] (num_classes = unconditional); `seed` an int, a list
        of B ints or a `torch.Generator` on the model's device (the same seed gives the same images);
        `top_k`, `top_p` as FoundationVision/VAR models/helpers.py. Raises ConfigError for labels or
        sampling arguments out of range.

        `seed`: an int seeds one generator for the whole batch (the official sampler's behaviour); a
        list of B seeds gives every image its own generator, so image b depends on seed[b] only, not
        on the batch size or the other labels (up to the last bits of batched arithmetic); a
        `torch.Generator` is used as is. Ranges (ConfigError otherwise): top_k >= 0 (0 = off), top_p in
        [0, 1] (0 = off), cfg >= 0."""
        check_sampling_args(top_k=top_k, top_p=top_p, cfg=cfg, where="VAR.generate")
        device = self.head.weight.device
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, dtype)
        labels_B = torch.as_tensor(labels_B, device=device).long().view(-1)
        if labels_B.numel() == 0 or labels_B.min() < 0 or labels_B.max() > self.num_classes:
            raise ConfigError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = "
                              f"unconditional); got {labels_B.tolist()}")
        rng = seed_generators(seed, labels_B.shape[0], device)
        B, quant, num_scales = labels_B.shape[0], self.vae.quantize, len(self.patch_nums)

        cond_2BD = self.class_emb(torch.cat((labels_B, torch.full_like(labels_B, self.num_classes))))
        cond = self._block_cond(cond_2BD)
        lvl_L = self.levels(device)
        lvl_pos_1LC = self.lvl_embed(lvl_L).unsqueeze(0) + self.pos.pos_1LC
        next_2BlC = cond_2BD.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos.pos_start + lvl_pos_1LC[:, :self.first_l]
        mask_LL = lvl_L[:, None] >= lvl_L[None, :]
        caches = [KVCache() for _ in self.blocks] if use_kv_cache else None
        seen_2BLC = None
        f_hat_BChw = torch.zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1], device=device)
        for si, pn in enumerate(self.patch_nums):
            ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
            end = self.begin_ends[si][1]
            if use_kv_cache:
                x_2BLC, mask = next_2BlC, None
            else:
                seen_2BLC = next_2BlC if seen_2BLC is None else torch.cat((seen_2BLC, next_2BlC), dim=1)
                x_2BLC, mask = seen_2BLC, mask_LL[:end, :end]
            with autocast(dtype, device):
                for bi, block in enumerate(self.blocks):
                    x_2BLC = block(x_2BLC, cond, mask, caches[bi] if caches else None)
            logits_2BlV = self._logits(x_2BLC[:, -pn * pn:], cond_2BD)
            t = cfg * ratio
            logits_BlV = top_k_top_p_filter((1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:], top_k, top_p)
            idx_Bl = sample_top_k_top_p(logits_BlV, generator=rng)
            if more_smooth:  # gumbel-softmax mix of codes (official; visualisation only, not for FID)
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BlC = gumbel_softmax(logits_BlV * (1 + ratio), tau=tau, generator=rng) @ quant.embedding.weight.float()
            else:
                h_BlC = quant.embedding(idx_Bl).float()
            h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat_BChw = quant.next_scale_input(si, f_hat_BChw, h_BChw.to(quant.embedding.weight.dtype)).float()
            if si != num_scales - 1:
                pn_next, (begin, end) = self.patch_nums[si + 1], self.begin_ends[si + 1]
                next_BlCv = F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area").flatten(2).transpose(1, 2)
                next_BlC = self.word_embed(next_BlCv.to(self.word_embed.weight.dtype)) + lvl_pos_1LC[:, begin:end]
                next_2BlC = next_BlC.repeat(2, 1, 1)
        return self.vae.fhat_to_img(f_hat_BChw).add(1).mul(0.5) if decode else f_hat_BChw

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """Training-from-scratch initialisation of the official code (models/var.py `init_weights`)."""
        std = init_std if init_std >= 0 else (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
                if self.shared_aln:
                    block.ada_gss.gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss.gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    block.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
                    block.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)


def _accept_official_layout(module: VAR, state_dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: drop the official constant buffers and map official names to ours."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if is_official_buffer(name):
            del state_dict[key]
        elif (ours := from_official_name(name)) != name:
            state_dict[prefix + ours] = state_dict.pop(key)
