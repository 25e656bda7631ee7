"""Pretrain the shipped tiny class-conditional VAR and the toy feature extractor (`arbooth pretrain-toy-class`).

Three stages, each seeded, on the class toy world (arbooth/toy/class_world.py), 16x16 images:
1. tokenizer: the real `VQVAE` (multi-scale residual VQ, scales 1-2-3-4, 256 codes) trained as VAR's
   tokenizer is (FoundationVision/VAR models/quant.py forward): straight-through f_hat, codebook loss
   |f_hat - sg(f)|^2 + 0.25 |sg(f_hat) - f|^2 averaged over scales, plus the image reconstruction loss;
   unused codes are re-seeded from encoder features every `restart_every` steps. Like VAR's ImageNet
   tokenizer it is a generic codec: it sees every source shape in every texture.
2. generator: the real `VAR` (4 blocks, width 96) on the five plain source classes, next-scale
   prediction with VAR's loss and 10% class dropout (classifier-free guidance), tokens pre-computed.
3. extractor: `ToyFeatureNet`, trained to name shape / texture / colour / background over every shape
   and texture of the world (source and downstream alike, as Inception saw ImageNet): the toy FID net.

Writes vae.safetensors and var.safetensors (the official VAR layout), extractor.safetensors and
toy_class.json (configs, the log of each stage, sha256 of every file) into `out`. Reproducible from
`seed` at the same thread count.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from arbooth.adapt.finetuned import ModelConfig
from arbooth.checkpoint import file_sha256, save_safetensors
from arbooth.config import from_dict, to_dict
from arbooth.errors import ConfigError
from arbooth.models.var_training import build_optimizer, drop_labels, var_loss
from arbooth.outputs import write_text
from arbooth.toy import class_var as cv
from arbooth.toy.class_world import SOURCE, TEXTURES, random_item
from arbooth.toy.pretrain import set_lr, warmup_cosine_lr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainToyClassConfig:
    out: str = str(cv.TOY_CLASS_DIR)
    seed: int = 0
    vae_steps: int = 500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    restart_every: int = 50       # tokenizer steps between re-seeding unused codes (0 = never)
    var_steps: int = 800
    var_batch: int = 32
    var_lr: float = 2e-3
    var_pool_per_class: int = 600  # pre-rendered, pre-tokenized source images per class
    extractor_steps: int = 400
    extractor_batch: int = 64
    extractor_lr: float = 3e-3
    threads: int = 1              # one thread: OpenMP spinning on a busy 2-core machine costs more than it gives
    stages: tuple[str, ...] = field(default=("vae", "var", "extractor"))

    def __post_init__(self) -> None:
        if not set(self.stages) <= {"vae", "var", "extractor"} or not self.stages:
            raise ConfigError(f"stages must be a subset of vae, var, extractor; got {self.stages}")


def _images(items) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in items])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def build_models(seed: int):
    """Randomly initialised tokenizer and transformer of the shipped config (seeded)."""
    from arbooth.adapt.finetuned import build_vae_var

    torch.manual_seed(seed)
    vae, var = build_vae_var(from_dict(ModelConfig, cv.MODEL))
    var.init_weights()  # the official from-scratch initialisation
    return vae, var


# ----------------------------------------------------------------------------- 1. tokenizer

def vq_train_forward(vae, x_B3HW: torch.Tensor, beta: float = 0.25):
    """-> (reconstruction in [-1, 1] range (unclamped), codebook loss, codes used (V,) counts, f (B,C,h,w))."""
    f = vae.quant_conv(vae.encoder(x_B3HW))
    q = vae.quantize
    B, C = f.shape[:2]
    f_ng = f.detach()
    f_rest, f_hat = f_ng.clone(), torch.zeros_like(f)
    vq_loss, used = f.new_zeros(()), torch.zeros(q.vocab_size, dtype=torch.long)
    last = len(q.patch_nums) - 1
    for si, pn in enumerate(q.patch_nums):
        z = f_rest if si == last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        idx_Bl = q.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
        used += torch.bincount(idx_Bl.flatten(), minlength=q.vocab_size)
        h = q.upsample_code(si, idx_Bl)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq_loss = vq_loss + F.mse_loss(f_hat, f_ng) + beta * F.mse_loss(f_hat.detach(), f)
    f_st = f_hat.detach() - f_ng + f  # straight-through: the decoder's gradient reaches the encoder
    rec = vae.decoder(vae.post_quant_conv(f_st))
    return rec, vq_loss / len(q.patch_nums), used, f_ng


def _tokenizer_batch(seed: int, start: int, n: int) -> torch.Tensor:
    shapes = tuple(c.shape for c in SOURCE.classes)
    return _images([random_item(start + k, seed, shapes=shapes, textures=TEXTURES)[0] for k in range(n)])


def train_vae(cfg: PretrainToyClassConfig, vae) -> dict:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.95), weight_decay=0.0)
    emb = vae.quantize.embedding.weight
    usage = torch.zeros(vae.quantize.vocab_size, dtype=torch.long)
    t0, logs, restarts = time.perf_counter(), [], 0
    for step in range(cfg.vae_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.vae_steps, cfg.vae_lr, warmup=30))
        x = _tokenizer_batch(cfg.seed, step * cfg.vae_batch, cfg.vae_batch)
        rec, vq_loss, used, f_ng = vq_train_forward(vae, x)
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += used
        if cfg.restart_every and (step == 0 or (step + 1) % cfg.restart_every == 0):
            dead = (usage == 0).nonzero().flatten() if step else torch.arange(emb.shape[0])
            if len(dead):  # re-seed unused codes with encoder features of this batch (seeded draw)
                feats = f_ng.permute(0, 2, 3, 1).reshape(-1, f_ng.shape[1])
                g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
                pick = torch.randint(0, feats.shape[0], (len(dead),), generator=g)
                with torch.no_grad():
                    emb[dead] = feats[pick] + 0.01 * torch.randn(len(dead), feats.shape[1], generator=g)
                restarts += len(dead)
            usage.zero_()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            logs.append({"step": step, "rec": round(rec_loss.item(), 5), "vq": round(vq_loss.item(), 5)})
            log.info("tokenizer step %d  rec %.4f  vq %.4f  %.0fs", step, rec_loss.item(), vq_loss.item(),
                     time.perf_counter() - t0)
    vae.eval().requires_grad_(False)
    return {"steps": cfg.vae_steps, "seconds": round(time.perf_counter() - t0, 1), "codes_restarted": restarts,
            "log": logs, **eval_vae(cfg, vae)}


@torch.no_grad()
def eval_vae(cfg: PretrainToyClassConfig, vae) -> dict:
    """Held-out reconstruction PSNR (images in [0, 1]) on source-shaped and on downstream images."""
    from arbooth.toy.class_world import DOWNSTREAM

    out = {}
    held = {"source": _images([SOURCE.image(k % 5, 10**6 + k) for k in range(64)])}
    for name, world in DOWNSTREAM.items():
        held[name] = _images([world.image(k % len(world.classes), 10**6 + k) for k in range(64)])
    for name, x in held.items():
        rec = vae.reconstruct(x)
        mse = F.mse_loss(rec.add(1).div(2), x.add(1).div(2)).item()
        out[f"psnr_db_{name}"] = round(-10 * math.log10(max(mse, 1e-12)), 2)
    idx = torch.cat(vae.img_to_idxBl(held["source"]), dim=1)
    out["codes_used_heldout"] = int(idx.unique().numel())
    return out


# ----------------------------------------------------------------------------- 2. generator

@torch.no_grad()
def _token_pool(cfg: PretrainToyClassConfig, vae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels, idx, xin = [], [], []
    n, k = cfg.var_pool_per_class, len(SOURCE.classes)
    for start in range(0, n * k, 256):
        ids = range(start, min(start + 256, n * k))
        x = _images([SOURCE.image(i % k, i // k, cfg.seed) for i in ids])
        idx_Bl = vae.img_to_idxBl(x)
        idx.append(torch.cat(idx_Bl, dim=1))
        xin.append(vae.idxBl_to_var_input(idx_Bl))
        labels.append(torch.tensor([i % k for i in ids]))
    return torch.cat(labels), torch.cat(idx), torch.cat(xin)


def train_var(cfg: PretrainToyClassConfig, var) -> dict:
    label_N, idx_NL, xin_NLC = _token_pool(cfg, var.vae)
    var.train()
    # VAR's AdamW (betas 0.9/0.95; no decay on biases, norms, embeddings), as the class recipe builds it
    opt = build_optimizer(var, SimpleNamespace(lr=cfg.var_lr, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    t0, logs = time.perf_counter(), []
    for step in range(cfg.var_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.var_steps, cfg.var_lr, warmup=30))
        pick = torch.randint(0, len(label_N), (cfg.var_batch,), generator=g)
        label_B = drop_labels(label_N[pick], var.num_classes, 0.1, g)
        logits_BLV = var(label_B, xin_NLC[pick])
        loss = var_loss(logits_BLV, idx_NL[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.var_steps - 1:
            logs.append({"step": step, "loss": round(loss.item(), 4)})
            log.info("generator step %d  loss %.4f  %.0fs", step, loss.item(), time.perf_counter() - t0)
    var.eval()
    return {"steps": cfg.var_steps, "seconds": round(time.perf_counter() - t0, 1), "final_loss": logs[-1]["loss"],
            "pool_images": len(label_N), "log": logs}


# ----------------------------------------------------------------------------- 3. extractor

def _extractor_batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    items = [random_item(start + k, seed) for k in range(n)]
    x = _images([im for im, _ in items])
    return x, {h: torch.tensor([a[h] for _, a in items]) for h in cv.HEADS}


def train_extractor(cfg: PretrainToyClassConfig) -> tuple[cv.ToyFeatureNet, dict]:
    torch.manual_seed(cfg.seed + 2)
    net = cv.ToyFeatureNet(**cv.EXTRACTOR).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.extractor_lr, weight_decay=0.01)
    t0, logs = time.perf_counter(), []
    for step in range(cfg.extractor_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.extractor_steps, cfg.extractor_lr, warmup=30))
        x, y = _extractor_batch(cfg.seed + 2, step * cfg.extractor_batch, cfg.extractor_batch)
        out = net.logits(x)
        loss = sum(F.cross_entropy(out[h], y[h]) for h in cv.HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.extractor_steps - 1:
            logs.append({"step": step, "loss": round(loss.item(), 4)})
            log.info("extractor step %d  loss %.4f  %.0fs", step, loss.item(), time.perf_counter() - t0)
    net.eval().requires_grad_(False)
    with torch.no_grad():
        x, y = _extractor_batch(cfg.seed + 3, 10**7, 512)
        out = net.logits(x)
        acc = {f"heldout_acc_{h}": round((out[h].argmax(-1) == y[h]).float().mean().item(), 4) for h in cv.HEADS}
    return net, {"steps": cfg.extractor_steps, "seconds": round(time.perf_counter() - t0, 1), "log": logs, **acc}


# ----------------------------------------------------------------------------- all

def pretrain(cfg: PretrainToyClassConfig) -> Path:
    """Train the stages in `cfg.stages` (the others are loaded from `cfg.out`) and write the folder."""
    from arbooth.checkpoint import read_state_dict
    from arbooth.models import official_state_dict

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = json.loads((out / cv.MANIFEST).read_text()) if (out / cv.MANIFEST).is_file() else {}
    report = {k: v for k, v in prev.get("training", {}).items() if isinstance(v, dict)}
    t_all = time.perf_counter()
    vae, var = build_models(cfg.seed)
    if "vae" in cfg.stages:
        report["vae"] = train_vae(cfg, vae)
        save_safetensors(official_state_dict(vae), out / "vae.safetensors")
    elif "var" in cfg.stages:
        vae.load_state_dict(read_state_dict(out / "vae.safetensors"))
    if "var" in cfg.stages:
        report["var"] = train_var(cfg, var)
        save_safetensors(official_state_dict(var), out / "var.safetensors")
    if "extractor" in cfg.stages:
        net, report["extractor"] = train_extractor(cfg)
        save_safetensors(net.state_dict(), out / "extractor.safetensors")
    files = ["vae.safetensors", "var.safetensors", "extractor.safetensors"]
    manifest = {"format": "arbooth-toy-class/1", "image_size": 16, "model": cv.MODEL, "extractor": cv.EXTRACTOR,
                "source_classes": SOURCE.class_names, "pretrain_config": to_dict(cfg),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "training": {**report, "last_run_seconds": round(time.perf_counter() - t_all, 1)},
                "sha256": {f: file_sha256(out / f) for f in files if (out / f).is_file()}}
    write_text(out / cv.MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out
