"""The prior-distillation teacher of ARBooth: class-prompt token maps and the teacher's logits on them.

Shapes: B batch, L tokens of the schedule, d bits, V = 2d logits. Returns the teacher-forcing input
x_BLC (B, L - 1, d) for the student and the teacher's logits (B, L, V) before temperature.

mode "proper" (default): the KV-cached Infinity sampler (cfg 1, tau, top-k/top-p) generates the
class image's bits; the teacher's logits are its teacher-forced logits on exactly the input the
student will see. With a KV cache, the sampler's logits are the teacher-forced ones, so the student
is asked to match what the teacher really predicts for that context, and the loss is zero when
student and teacher weights are equal.

mode "arbooth_compat": the authors' `autoregressive_cls_infer` (jiwoogit/ARBooth infinity_final.py
L476-562): no KV cache, so every scale attends only to its own tokens; RoPE positions start at 0
at every scale (rows 0..h*w of the schedule's table, basic.py apply_rotary_emb with scale_ind 0);
next-scale inputs by 'area' down-sampling; the logits are the sampler's. Its KL is not zero even for
identical weights (the student's context differs). Built from the model's public pieces
(encode_text, run_blocks, get_logits, word_embed); level embedding per chunk follows the model's
`lvl_embed_every_chunk` (set model.lvl_embed_every_chunk for the fork's behaviour).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from arbooth.models.infinity import rope_cos_sin
from arbooth.models.sampling import sample_bits


@torch.no_grad()
def teacher_targets(model, text_BTC: torch.Tensor, mask_BT: torch.Tensor, schedule: Sequence[tuple[int, int, int]],
                    *, mode: str = "proper", tau: float = 0.5, top_k: int = 900, top_p: float = 0.97,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call inside `SelectiveTuner.teacher()` (base weights, eval mode)."""
    if mode == "proper":
        return _proper(model, text_BTC, mask_BT, schedule, tau, top_k, top_p, generator)
    if mode == "arbooth_compat":
        return _arbooth_compat(model, text_BTC, mask_BT, schedule, tau, top_k, top_p, generator)
    raise ValueError(f"unknown teacher mode {mode!r}")


def _proper(model, text_BTC, mask_BT, schedule, tau, top_k, top_p, generator):
    out = model.generate(text_BTC, mask_BT, schedule, cfg=1.0, tau=tau, top_k=top_k, top_p=top_p,
                         generator=generator, dtype="bf16", decode=False)  # the teacher needs only the bits
    x_BLC = model.vae.bits_to_var_input(out.bits, schedule)
    no_drop = torch.zeros(text_BTC.shape[0], dtype=torch.bool, device=text_BTC.device)
    return x_BLC, model(text_BTC, mask_BT, x_BLC, schedule, cond_drop_B=no_drop)


def _arbooth_compat(model, text_BTC, mask_BT, schedule, tau, top_k, top_p, generator):
    vae, B, dev = model.vae, text_BTC.shape[0], text_BTC.device
    tc = model.encode_text(text_BTC, mask_BT)
    cos, sin = rope_cos_sin(schedule, model.C // model.num_heads, dev)
    latent = vae.latent_schedule(schedule)  # the quantizer's grid (2x the token map with spatial patchify)
    full = tuple(latent[-1])
    x = model.start(tc.cond_BD)
    inputs, logits_all, summed = [], [], 0.0
    for si, (_, h, w) in enumerate(schedule):
        lvl = torch.full((h * w,), si, device=dev)
        hid = model.run_blocks(x, tc, lvl, cos[:h * w], sin[:h * w], None, None)  # no cache, no mask
        logits = model.get_logits(hid, tc.cond_BD)
        logits_all.append(logits)
        bits = sample_bits(logits.mul(1 / tau).reshape(B, -1, 2), top_k, top_p, generator).reshape(B, h, w, -1)
        if si == len(schedule) - 1:
            break
        summed = summed + F.interpolate(vae.bits_to_codes(bits), size=full, mode=vae.up_mode)
        nxt = vae.codes_to_tokens(F.interpolate(summed, size=tuple(latent[si + 1]), mode="area"))
        inputs.append(nxt)
        x = model.word_embed(nxt)
    return torch.cat(inputs, 1), torch.cat(logits_all, 1)
