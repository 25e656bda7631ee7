"""Pretrain the toy base and the toy evaluators on the toy world (what `arbooth pretrain-toy` runs).

Five stages, each seeded from `seed` and fed by `ToyWorld(seed + stage)` item by item (no files):
1. BSQ-VAE: reconstruction (MSE + L1) through the multi-scale BSQ quantizer (straight-through, as
   the release trains it), over the toy scale schedule.
2. Infinity + T5, jointly: bitwise cross-entropy on the VAE's bit maps of toy images, conditioned on
   their captions through the (trained) toy T5; 10% of captions dropped to `cfg_uncond`; with bitwise
   self-correction (flipped coarser bits in, re-quantised labels out), as Infinity is pretrained.
3. CLIP: open_clip's contrastive loss on full captions ("a small red split star on a blue background").
4. Attribute probe: cross-entropy per attribute; its held-out accuracy (also on split stars) goes into toy.json.
5. Decoder: the VAE decoder alone, with a probe-feature loss (the bits, hence stage 2, are unchanged).
The demo subject's appearance (split stars) is excluded from the base's stages (1, 2, 5); the
evaluators (3, 4) see every appearance. Stages depend only on files, not on each other's order
(2 needs 1's encoder; 5 needs 1 and 4), so they may also run as separate `stages=[...]` processes.
Writes the folder described in arbooth/toy/models.py.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arbooth.adapt.arbooth_losses import bitwise_ce_per_token, per_scale_bit_accuracy
from arbooth.checkpoint import file_sha256, save_safetensors
from arbooth.config import to_dict
from arbooth.errors import ConfigError
from arbooth.models.bitwise_self_correction import flip_requant
from arbooth.models.infinity import draw_prompt_drop
from arbooth.outputs import write_text
from arbooth.toy import models as tm
from arbooth.toy.text import build_toy_tokenizer, tokenize_ids
from arbooth.toy.world import ToyWorld, images_to_array

log = logging.getLogger(__name__)


STAGES = ("vae", "model", "clip", "probe", "decoder")


@dataclass(frozen=True)
class PretrainToyConfig:
    out: str = str(tm.TOY_DIR)
    seed: int = 0
    image_size: int = tm.IMAGE_SIZE
    exclude: tuple[tuple[str, str], ...] = (("star", "split"),)  # the demo subject's appearance
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    model_steps: int = 2500
    model_batch: int = 32
    model_lr: float = 1.5e-3
    model_bsc_strength: float = 0.3  # bitwise self-correction, as Infinity is pretrained (0: clean teacher forcing)
    clip_steps: int = 400
    clip_batch: int = 48
    clip_lr: float = 1e-3
    probe_steps: int = 500
    probe_batch: int = 48
    probe_lr: float = 3e-3
    decoder_steps: int = 300      # the VAE decoder fine-tuned alone (encoder frozen: the bits do not change)
    decoder_batch: int = 16
    decoder_lr: float = 1e-3
    decoder_probe_weight: float = 1.0  # weight of the probe-feature loss (1 - cosine of the identity features)
    eval_jitter: float = 0.04     # the evaluators' (CLIP, probe) world: objects moved and turned a little
    eval_max_angle: float = 10.0
    threads: int = 1        # 0: torch's default. One thread: on a busy 2-core machine OpenMP's spinning makes
                            # two threads ~5x slower than one for these tiny matmuls (measured here)
    stages: tuple[str, ...] = field(default=STAGES)

    def __post_init__(self) -> None:
        unknown = [st for st in self.stages if st not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"stages must be a non-empty list of {', '.join(STAGES)}; got {list(self.stages)}")
        for stage in STAGES:
            if getattr(self, f"{stage}_steps") < 1 or getattr(self, f"{stage}_batch") < 1 or getattr(self, f"{stage}_lr") <= 0:
                raise ConfigError(f"{stage}_steps and {stage}_batch must be >= 1 and {stage}_lr > 0")
        if not 0.0 <= self.model_bsc_strength <= 1.0:
            raise ConfigError(f"model_bsc_strength must be in [0, 1], got {self.model_bsc_strength}")


def to_tensor(items) -> torch.Tensor:
    """ToyItems -> (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images_to_array(items)).permute(0, 3, 1, 2).float().div(255)


def warmup_cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def train_vae(cfg: PretrainToyConfig, world: ToyWorld) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    vae = tm.build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    t0, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(cfg.vae_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.vae_steps, cfg.vae_lr))
        x = to_tensor(world.batch(step * cfg.vae_batch, cfg.vae_batch)) * 2 - 1
        z, _, _ = vae.quantize(vae.encode_features(x), tm.SCHEDULE)
        rec = vae.decoder(z)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    vae.eval().requires_grad_(False)
    return vae, {"steps": cfg.vae_steps, "seconds": time.perf_counter() - t0, "final_loss": loss.item(),
                 **eval_vae(vae, world)}


def train_decoder(cfg: PretrainToyConfig, world: ToyWorld, vae, probe) -> tuple[torch.nn.Module, dict]:
    """Fine-tune the VAE decoder alone: MSE + 0.5 L1 + `decoder_probe_weight` * (1 - cosine of the probe's
    identity features of reconstruction and image). The encoder and quantizer stay frozen, so every bit
    map (what Infinity learns) is unchanged; only the decoding gets crisper: after the short first stage,
    small crosses and diamonds decode as blobs, and the probe-feature term asks the decoder for what tells
    shapes and colours apart (a perceptual loss from the shipped evaluator; no GAN needed at this size)."""
    torch.manual_seed(cfg.seed + 4)
    vae.eval().requires_grad_(False)
    vae.decoder.train().requires_grad_(True)
    probe.eval().requires_grad_(False)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    before = eval_vae(vae, world, probe)
    t0, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(cfg.decoder_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.decoder_steps, cfg.decoder_lr, warmup=20))
        x = to_tensor(world.batch(step * cfg.decoder_batch, cfg.decoder_batch)) * 2 - 1
        with torch.no_grad():
            z, _, _ = vae.quantize(vae.encode_features(x), tm.SCHEDULE)
        rec = vae.decoder(z)
        feat = 1 - F.cosine_similarity(probe.embed(rec.add(1).div(2)), probe.embed(x.add(1).div(2)), dim=-1).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.decoder_probe_weight * feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log.info("decoder step %d loss %.4f probe-feature loss %.4f", step, loss.item(), feat.item())
    vae.eval().requires_grad_(False)
    return vae, {"steps": cfg.decoder_steps, "seconds": time.perf_counter() - t0, "final_loss": loss.item(),
                 "before": before, **eval_vae(vae, world, probe)}


@torch.no_grad()
def eval_vae(vae, world: ToyWorld, probe=None) -> dict[str, float]:
    """Held-out reconstruction error through the full bit schedule, images in [0, 1]; with `probe`, also
    the share of reconstructions whose every attribute the probe still reads right."""
    items = world.batch(10**7, 64)
    x = to_tensor(items) * 2 - 1
    rec = vae.decode_bits(vae.encode_bits(x, tm.SCHEDULE), tm.SCHEDULE).clamp(-1, 1)
    mse = F.mse_loss(rec.add(1).div(2), x.add(1).div(2)).item()
    out = {"heldout_mse_01": mse, "heldout_psnr_db": -10 * math.log10(max(mse, 1e-12))}
    if probe is not None:
        logits = probe(rec.add(1).div(2))
        for k in ("shape", "colour", "texture"):
            out[f"probe_{k}_acc_on_reconstructions"] = (logits[k].argmax(-1) == _labels(items, k)).float().mean().item()
    return out


PROMPT_DROP = 0.1  # prompt dropout of the toy base's training (the released models': 0.1)


def train_model(cfg: PretrainToyConfig, world: ToyWorld, vae, tokenizer) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed + 1)
    model = tm.build_infinity(vae, drop_path_rate=0.0).train()
    t5 = tm.build_t5(tm.T5, len(tokenizer)).train()
    params = [*model.parameters(), *t5.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.model_lr, weight_decay=0.01, betas=(0.9, 0.97))
    t0, log_every, hist = time.perf_counter(), 100, []
    bsc_gen = torch.Generator().manual_seed(cfg.seed + 11)
    for step in range(cfg.model_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.model_steps, cfg.model_lr))
        items = world.batch(step * cfg.model_batch, cfg.model_batch)
        with torch.no_grad():  # flipped coarser bits in, the bits that correct them as labels (Infinity's BSC)
            bsc = flip_requant(vae, vae.encode_features(to_tensor(items) * 2 - 1), tm.SCHEDULE,
                               strength=cfg.model_bsc_strength, apply_layers=len(tm.SCHEDULE), generator=bsc_gen)
            x_BLd = bsc.x_BLd
            gt_BLd = torch.cat([b.flatten(1, 2) for b in bsc.label_bits], 1)
        tok = tokenizer([it.caption for it in items], padding="longest", return_tensors="pt")
        text = t5(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        drop_B = draw_prompt_drop(len(items), PROMPT_DROP, x_BLd.device)  # 10% unconditional, for guidance
        logits = model(text * tok.attention_mask[..., None], tok.attention_mask.bool(), x_BLd, tm.SCHEDULE,
                       cond_drop_B=drop_B)
        loss = bitwise_ce_per_token(logits, gt_BLd).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        if step % log_every == 0 or step == cfg.model_steps - 1:
            acc = per_scale_bit_accuracy(logits.detach(), gt_BLd, tm.SCHEDULE)
            hist.append({"step": step, "loss": round(loss.item(), 4), "acc": [round(a, 3) for a in acc]})
            log.info("infinity step %d loss %.4f acc %s", step, loss.item(), hist[-1]["acc"])
    model.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    return model, t5, {"steps": cfg.model_steps, "seconds": time.perf_counter() - t0, "log": hist}


def train_clip(cfg: PretrainToyConfig, world: ToyWorld, tokenizer) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed + 2)
    clip = tm.build_clip(tm.CLIP, len(tokenizer)).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    ctx = tm.CLIP["text"]["context_length"]
    t0, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(cfg.clip_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.clip_steps, cfg.clip_lr))
        items = world.batch(step * cfg.clip_batch, cfg.clip_batch)
        img = clip.encode_image(tm.clip_normalize(to_tensor(items)), normalize=True)
        txt = clip.encode_text(tokenize_ids(tokenizer, [it.caption for it in items], ctx), normalize=True)
        logits = clip.logit_scale.exp() * img @ txt.T
        # the same caption can occur twice in a batch: every matching caption counts as a positive
        caps = [it.caption for it in items]
        target = torch.tensor([[float(a == b) for b in caps] for a in caps])
        target = target / target.sum(1, keepdim=True)
        loss = (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean()) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0:
            log.info("clip step %d loss %.4f", step, loss.item())
    clip.eval().requires_grad_(False)
    return clip, {"steps": cfg.clip_steps, "seconds": time.perf_counter() - t0, "final_loss": loss.item()}


def train_probe(cfg: PretrainToyConfig, world: ToyWorld) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed + 3)
    probe = tm.AttributeProbe().train()
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.probe_lr, weight_decay=0.01)
    t0 = time.perf_counter()
    for step in range(cfg.probe_steps):
        set_lr(opt, warmup_cosine_lr(step, cfg.probe_steps, cfg.probe_lr))
        items = world.batch(step * cfg.probe_batch, cfg.probe_batch)
        out = probe(to_tensor(items))
        loss = sum(F.cross_entropy(out[k], _labels(items, k), ignore_index=-1) for k in tm.PROBE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log.info("probe step %d loss %.4f", step, loss.item())
    probe.eval().requires_grad_(False)
    return probe, {"steps": cfg.probe_steps, "seconds": time.perf_counter() - t0, **probe_report(cfg, probe, world)}


def probe_report(cfg: PretrainToyConfig, probe, world: ToyWorld) -> dict:
    """Held-out accuracy per attribute, on centred upright objects (what the base draws) and on split stars
    (the demo subject's appearance)."""
    held_out = ToyWorld(cfg.seed + 99, cfg.image_size, exclude=(), p_texture=1.0)
    split_stars = [it for it in held_out.batch(0, 1500) if it.attrs.shape == "star"]
    return {"heldout_accuracy": probe_accuracy(probe, world.batch(10**7, 256)),
            "heldout_centred_accuracy": probe_accuracy(probe, ToyWorld(cfg.seed + 98, cfg.image_size).batch(0, 256)),
            "split_star_accuracy": probe_accuracy(probe, split_stars[:128])}


def _labels(items, key: str) -> torch.Tensor:
    """Class indices of attribute `key`; -1 (ignored) for the texture colour of plain objects (there is none)."""
    names = tm.PROBE_HEADS[key]
    return torch.tensor([-1 if key == "texture_colour" and it.attrs.texture == "plain" else
                         names.index(getattr(it.attrs, key)) for it in items])


@torch.no_grad()
def probe_accuracy(probe, items) -> dict[str, float]:
    out = probe(to_tensor(items))
    acc = {}
    for k in tm.PROBE_HEADS:
        y = _labels(items, k)
        acc[k] = round((out[k].argmax(-1) == y)[y >= 0].float().mean().item(), 4)
    return acc


def pretrain(cfg: PretrainToyConfig) -> Path:
    """Train the stages in `cfg.stages` (others are loaded from `cfg.out`) and write the folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    def world(k: int) -> ToyWorld:
        return ToyWorld(cfg.seed + k, cfg.image_size, exclude=cfg.exclude)

    def eval_world(k: int, **kw) -> ToyWorld:
        # the evaluators see every appearance (the oracle must know a split star when it sees one), and
        # slightly moved and turned objects, so that they judge imperfect samples by shape and colour
        return ToyWorld(cfg.seed + k, cfg.image_size, exclude=(), jitter=cfg.eval_jitter, max_angle=cfg.eval_max_angle,
                        **kw)

    tokenizer = build_toy_tokenizer()
    report: dict[str, dict] = {}
    t_all = time.perf_counter()
    if "vae" in cfg.stages:
        vae, report["vae"] = train_vae(cfg, world(0))
        save_safetensors(vae.state_dict(), out / "vae.safetensors")
    elif "model" in cfg.stages:  # the model stage alone trains on the saved VAE
        from arbooth.checkpoint import read_state_dict
        vae = tm.build_vae().eval().requires_grad_(False)
        vae.load_state_dict(read_state_dict(out / "vae.safetensors"))
    if "model" in cfg.stages:
        model, t5, report["model"] = train_model(cfg, world(1), vae, tokenizer)
        save_safetensors(model.state_dict(), out / "infinity.safetensors")
        t5.save_pretrained(out / "t5", safe_serialization=True)
        tokenizer.save_pretrained(out / "t5")
    if "clip" in cfg.stages:
        clip, report["clip"] = train_clip(cfg, eval_world(2, p_caption=1.0), tokenizer)
        save_safetensors(clip.state_dict(), out / "clip.safetensors")
    if "probe" in cfg.stages:
        probe, report["probe"] = train_probe(cfg, eval_world(3))
        save_safetensors(probe.state_dict(), out / "probe.safetensors")
    if "decoder" in cfg.stages:  # needs the VAE and the probe (trained above, or from `out`)
        from arbooth.checkpoint import read_state_dict
        if "vae" not in cfg.stages and "model" not in cfg.stages:
            vae = tm.build_vae()
            vae.load_state_dict(read_state_dict(out / "vae.safetensors"))
        if "probe" not in cfg.stages:
            probe = tm.AttributeProbe()
            probe.load_state_dict(read_state_dict(out / "probe.safetensors"))
        vae, report["decoder"] = train_decoder(cfg, world(4), vae, probe)
        save_safetensors(vae.state_dict(), out / "vae.safetensors")
    for stage in cfg.stages:  # stages kept from an earlier invocation keep the config they were trained with
        if isinstance(report.get(stage), dict):
            report[stage]["config"] = to_dict(cfg)
    for stage, info in report.items():
        log.info("%s: %s", stage, {k: v for k, v in info.items() if k not in ("log", "config")})
    write_manifest(cfg, out, report, time.perf_counter() - t_all)
    return out


def write_manifest(cfg: PretrainToyConfig, out: Path, report: dict[str, dict], seconds: float) -> None:
    """toy.json: configs, the training reports (this run's stages, and those already in toy.json for stages
    not run now, so stages may run one by one or in parallel processes), and the sha256 of every file."""
    prev = json.loads((out / "toy.json").read_text()) if (out / "toy.json").is_file() else {}
    training = {k: v for k, v in prev.get("training", {}).items() if isinstance(v, dict) and k not in report}
    training.update(report)
    t5_files = sorted(str(p.relative_to(out)) for p in (out / "t5").iterdir()) if (out / "t5").is_dir() else []
    files = ["vae.safetensors", "infinity.safetensors", "clip.safetensors", "probe.safetensors", *t5_files]
    manifest = {"format": "arbooth-toy/2", "image_size": cfg.image_size, "schedule": tm.SCHEDULE,
                "vae": tm.VAE, "model": tm.MODEL, "t5": tm.T5, "clip": tm.CLIP,
                # the last invocation's config; each stage's own is training.<stage>.config
                "exclude": [list(e) for e in cfg.exclude], "pretrain_config": to_dict(cfg),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "training": {**training, "last_run_seconds": round(seconds, 1)},
                "sha256": {f: file_sha256(out / f) for f in files if (out / f).is_file()}}
    write_text(out / "toy.json", json.dumps(manifest, indent=1, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))
