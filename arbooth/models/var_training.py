"""VAR's class-conditional training pieces, shared by the fine-tuning recipes (non-private and DP),
the membership audit and `arbooth profile`: tokenise a batch, the token loss, class dropout, the
per-step seed, and VAR's AdamW with its schedule.

Sources: FoundationVision/VAR trainer.py (the loss weighting, logged accuracies), train.py (AdamW
betas, the no-weight-decay keys), var.py (class dropout for classifier-free guidance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arbooth.errors import ConfigError

# Parameters without weight decay besides biases and 1-d tensors (FoundationVision/VAR train.py, nowd_keys).
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


# ------------------------------------------------------------------ loss pieces
@torch.no_grad()
def encode_batch(vae: nn.Module, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> (target tokens idx_BL, teacher-forcing input x_BLCv), tokenizer in fp32."""
    idx_Bl = vae.img_to_idxBl(img_B3HW)
    return torch.cat(idx_Bl, dim=1), vae.idxBl_to_var_input(idx_Bl)


def var_loss(logits_BLV: torch.Tensor, idx_BL: torch.Tensor, *, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
    """VAR's training loss: token cross-entropy weighted 1/L per token, summed over tokens
    (FoundationVision/VAR trainer.py: `loss_weight = ones(1, L) / L`), i.e. the mean over tokens.
    reduction "none" gives the per-example loss (B,), which DP-SGD clips; "mean"/"sum" reduce over B."""
    ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), idx_BL, label_smoothing=label_smoothing,
                            reduction="none")
    loss_B = ce_BL.mean(dim=1)
    if reduction == "none":
        return loss_B
    return loss_B.sum() if reduction == "sum" else loss_B.mean()


def drop_labels(label_B: torch.Tensor, num_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the unconditional class `num_classes` with probability p (CFG training,
    FoundationVision/VAR var.py forward: cond_drop_rate 0.1). Drawn from `generator` on the CPU so
    the draw is reproducible and independent of the device."""
    drop_B = torch.rand(label_B.shape[0], generator=generator) < p
    return torch.where(drop_B.to(label_B.device), torch.full_like(label_B, num_classes), label_B)


def drop_labels_at(label_B: torch.Tensor, num_classes: int, p: float, *, seed: int, offset: int) -> torch.Tensor:
    """`drop_labels` for rows offset .. offset + B - 1 of a logical batch: row j's mask is the j-th uniform
    of a generator seeded with `seed` (a function of the optimizer step), so the masks do not depend on how
    the logical batch is split into physical or micro batches (a memory knob never changes the result).
    Draws offset + B numbers: cheap next to a forward pass."""
    g = torch.Generator().manual_seed(seed)
    drop_B = (torch.rand(offset + label_B.shape[0], generator=g) < p)[offset:]
    return torch.where(drop_B.to(label_B.device), torch.full_like(label_B, num_classes), label_B)


@torch.no_grad()
def token_metrics(logits_BLV: torch.Tensor, idx_BL: torch.Tensor, last_l: int) -> dict[str, float]:
    """Accuracy (%) over all tokens and over the last scale, and the last scale's loss (as VAR logs)."""
    pred_BL = logits_BLV.argmax(dim=-1)
    return {
        "acc": (pred_BL == idx_BL).float().mean().item() * 100,
        "acc_last": (pred_BL[:, -last_l:] == idx_BL[:, -last_l:]).float().mean().item() * 100,
        "loss_last": F.cross_entropy(logits_BLV[:, -last_l:].float().flatten(0, 1),
                                     idx_BL[:, -last_l:].flatten()).item(),
    }


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the per-step randomness (class dropout; the recipes pass the optimizer step): a function of
    the position, so resuming needs no generator state."""
    return (seed * 1_000_003 + micro_step) * 1_009 + rank


# ------------------------------------------------------------------ optimisation
def build_optimizer(model: nn.Module, optim) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with VAR's betas and no decay on biases/norms/embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS)
         else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int):
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if optim.scheduler == "constant" else optim.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)
