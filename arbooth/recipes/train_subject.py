"""ARBooth recipe: personalize Infinity on a few photos of one subject (explicit loop over accelerate).

The base model comes from `model.preset` through SUBJECT_PRESETS (arbooth/subject_bases.py, which also
loads personalizations for inference), the built-in toy and tiny ones included. setup: subject photos -> raw VAE features (once; the VAE is
frozen), prompts -> T5 features (once; T5 is then released), selective tuning (tuning.method=full) or
LoRA on the same layers (tuning.method=lora) + <S*>, AdamW. Each step: bitwise self-correction turns
the photos' features into teacher-forcing inputs and labels (`bsc.*`,
arbooth/models/bitwise_self_correction.py); the teacher (full: base weights swapped in; lora: adapters
disabled) samples class-prompt token maps, or they come from a bank drawn once (teacher.bank_size); the
student's scale-weighted instance loss; the
prior-distillation loss on the teacher's maps; one AdamW step per loss (the authors) or one for the
sum. Writes `personalization.safetensors` (tuning.method=lora: the peft adapter folder `personalization/`),
validation grids under `val/`, `metrics.jsonl` (and log.report_to's trackers), `README.md` (the model
card), `config.yaml`, `run.json` and a resumable `train_state.pt` in `out_dir`. One process only
(`check_single_process` says why). One run per folder
(arbooth/runs.py): a folder holding another run is refused unless `resume=true` or `overwrite=true`;
the state records the config, the subject photos' and the base's identity, and a resume may change only
`SAFE_RESUME_KEYS`.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from arbooth.adapt.arbooth_losses import distill_loss, per_scale_bit_accuracy, scale_weighted_bitwise_ce
from arbooth.adapt.personalization import save_lora_personalization, save_personalization
from arbooth.adapt.selective import SelectiveTuner, tensors_sha256, tuned_module_kinds
from arbooth.adapt.subject_lora import LoRATuner
from arbooth.adapt.subject_teacher import teacher_targets
from arbooth.adapt.subject_token import (
    SubjectToken,
    add_placeholder_token,
    class_noun_features,
    encode_prompts,
    init_subject_token,
    instance_prompt,
)
from arbooth.checkpoint import commit_staged, partial_dir, save_torch
from arbooth.config import save_config, to_dict
from arbooth.data.images import save_grid
from arbooth.data.subject import load_subject
from arbooth.errors import ArboothError, ConfigError
from arbooth.model_card import shareable, write_model_card
from arbooth.models.bitwise_self_correction import flip_requant
from arbooth.models.infinity import draw_prompt_drop
from arbooth.optim import StochasticRoundingAdamW
from arbooth.precision import autocast
from arbooth.progress import progress
from arbooth.recipes.subject_config import SubjectTrainConfig, TuningConfig
from arbooth.runs import (
    RunFolderError,
    check_resume,
    hold_run_dir,
    new_run_record,
    prepare_run_dir,
    read_run_file,
    refuse_backwards,
    run_identity,
    start_session,
    write_run_file,
)
from arbooth.subject_bases import build_models, preset_schedule
from arbooth.tracking import (
    accelerator_kwargs,
    check_report_to,
    close_trackers,
    launcher_precision,
    log_grid,
    log_step,
    open_trackers,
)

log = logging.getLogger(__name__)

# What this recipe (and the toy report after it) writes into out_dir: a folder holding any holds a run.
FULL_FILE = "personalization.safetensors"  # tuning.method=full: one file
LORA_DIR = "personalization"                # tuning.method=lora: a peft adapter folder (adapt/personalization.py)
RUN_ENTRIES = ("config.yaml", FULL_FILE, LORA_DIR, "train_state.pt", "metrics.jsonl", "val",
               "grid.png", "metrics.json", "README.md", "tensorboard", "wandb")
# Config keys a resume may change: more steps, save/validation cadence and validation prompts, paths
# (the photos' and the base's identity are checked by hash instead), the resume/overwrite switches.
SAFE_RESUME_KEYS = ("steps", "save_every", "validate_every", "val_cfg", "val_tau", "prompts.validation", "log.",
                    "out_dir", "subject", "model.model_ckpt", "model.vae_ckpt", "model.t5", "resume", "overwrite")


def base_name(base_id: str) -> str:
    """The base's name from a preset's base id ("infinity_2b_reg.pth sha256=..." -> "infinity_2b_reg.pth")."""
    return base_id.split(" sha256=")[0]


def check_config(cfg: SubjectTrainConfig) -> list[tuple[int, int, int]]:
    """The cross-field checks that need the base preset's scale schedule (the config's own checks ran in
    its __post_init__), before any weights load, once per run; returns the schedule. Raises ConfigError
    naming the key (e.g. `loss.scale_weights` of the wrong length)."""
    schedule = preset_schedule(cfg.model)
    cfg.loss.weights_for(len(schedule))
    return schedule


@dataclass
class Run:
    """Everything the step function needs."""

    cfg: SubjectTrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    tuner: SelectiveTuner | LoRATuner
    token: SubjectToken
    optimizer: torch.optim.Optimizer
    schedule: list
    weights: tuple[float, ...]
    vae: torch.nn.Module               # frozen BSQ-VAE (bitwise self-correction each step)
    features_NdHW: torch.Tensor        # raw VAE features of every subject photo
    inst: tuple                        # instance prompt: features, mask, placeholder (1, T, ...)
    cls: tuple                         # class prompt: features, mask (1, T, ...)
    val: tuple | None                  # validation prompts: features, mask, placeholder
    generator: torch.Generator         # teacher sampling
    bsc_generator: torch.Generator     # bit flips of the instance inputs
    base_id: str
    base_tuned_sha256: str
    class_noun: str = ""               # resolved (from --class-noun or subject.yaml)
    bank: tuple | None = None          # teacher bank (teacher.bank_size > 0): class inputs, teacher logits
    identity: dict = field(default_factory=dict)  # runs.run_identity: config, photos and base hashes
    record: dict = field(default_factory=dict)    # run.json: run id and sessions


def setup(cfg: SubjectTrainConfig, schedule: list[tuple[int, int, int]] | None = None) -> Run:
    """Load the models, photos and prompts of a run. `schedule`: `check_config(cfg)`, when the caller
    (`train`) ran the checks already before touching the run folder."""
    schedule = schedule or check_config(cfg)
    # our own autocast applies cfg.dtype (arbooth/precision.py): accelerate must not add a second one, and a
    # launcher asking for another precision is refused (launcher_precision), as in train-class
    launcher_precision(cfg.dtype, "dtype")
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision="no",
                              **accelerator_kwargs(cfg.log.report_to, cfg.out_dir))
    dev = accelerator.device
    set_seed(cfg.seed)
    vae, model, tokenizer, encoder, base_id = build_models(cfg.model, gradient_checkpointing=cfg.gradient_checkpointing)
    subject = load_subject(cfg.subject, schedule[-1][1] * vae.token_stride, class_noun=cfg.class_noun or None)
    cls_noun = subject.info.class_noun
    if not cls_noun:
        raise ConfigError(f"no class noun: pass --class-noun or set class_noun in {cfg.subject}/subject.yaml")
    # Frozen parts once: the photos' raw VAE features (flipped/re-quantised per step), T5 features.
    vae.to(dev)
    with torch.no_grad():
        features = vae.encode_features(subject.images_N3HW.to(dev))
    p = cfg.prompts
    add_placeholder_token(tokenizer, encoder, p.placeholder)
    enc = {"max_length": model.text_maxlen, "placeholder": p.placeholder,
           "prefix_length": cfg.tuning.text_prefix_length}
    inst = encode_prompts(tokenizer, encoder, [instance_prompt(p.instance_template, cls_noun, p.placeholder)], **enc)
    cls_prompt = p.class_template.format(cls=cls_noun)
    cls = encode_prompts(tokenizer, encoder, [cls_prompt], **enc)[:2]
    subject_phrase = f"{p.placeholder} {cls_noun}"
    val = encode_prompts(tokenizer, encoder, [v.format(subject_phrase) for v in p.validation], **enc) \
        if p.validation and cfg.validate_every else None
    token = SubjectToken(cfg.tuning.text_prefix_length, model.text_channels)
    init_subject_token(token, cfg.tuning.token_init, class_noun_features(tokenizer, encoder, cls_prompt, cls_noun)
                       if cfg.tuning.token_init == "class_noun" else None)
    del encoder  # T5 is not needed any more
    # Model: blocks in the tuned dtype (the authors cast blocks to bf16), then the tuner.
    model.to(dev)
    if cfg.model.tuned_dtype == "bf16":
        model.blocks.to(torch.bfloat16)
    tuner = build_tuner(model, cfg.tuning)
    token.to(dev)
    log.info("%s; + <S*> %s", tuner.summary(), tuple(token.embedding_PC.shape))
    mem = tuner.teacher_memory()
    log.info("teacher keeps %.1f MB of original weights instead of a %.1f MB model copy (saves %.1f MB)",
             mem["teacher_bytes"] / 2**20, mem["full_copy_bytes"] / 2**20, mem["saved_bytes"] / 2**20)
    optimizer = build_optimizer(cfg, token, tuner, dev)
    model, optimizer = accelerator.prepare(model, optimizer)
    to = lambda xs: tuple(x.to(dev) for x in xs)
    identity = run_identity(cfg, data_sha256=tensors_sha256({"images_N3HW": subject.images_N3HW}),
                            base_sha256=base_id)
    run = Run(cfg, accelerator, model, tuner, token, optimizer, schedule, cfg.loss.weights_for(len(schedule)),
              vae, features, to(inst), to(cls), to(val) if val else None,
              torch.Generator(dev).manual_seed(cfg.seed + 1), torch.Generator(dev).manual_seed(cfg.seed + 2),
              base_id, tuner.base_tuned_sha256, class_noun=cls_noun, identity=identity)
    if cfg.teacher.bank_size and cfg.loss.prior:
        run.bank = draw_teacher_bank(run, cfg.teacher.bank_size)
    return run


def build_tuner(model: torch.nn.Module, t: TuningConfig) -> SelectiveTuner | LoRATuner:
    """What trains besides <S*>: the chosen sub-layers' weights (full) or LoRA adapters on them (lora)."""
    kinds = tuned_module_kinds(t.self_attention, t.cross_attention, t.ffn, t.all_layers)
    if t.method == "lora":
        return LoRATuner(model, kinds, rank=t.lora_rank, alpha=t.alpha, dropout=t.lora_dropout, init=t.lora_init,
                         lr_scale=t.lora_lr_scale, file_dtype=t.lora_file_dtype)
    return SelectiveTuner(model, kinds)


def build_optimizer(cfg: SubjectTrainConfig, token: SubjectToken, tuner: SelectiveTuner | LoRATuner,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW over <S*> and the tuned tensors; stochastic rounding when the tuner trains bf16 tensors
    (`tuner.trains_bf16`: full tuning of bf16 blocks; LoRA adapters are fp32); the tuned tensors at
    lr * `tuner.lr_scale` (LoRA: tuning.lora_lr_scale)."""
    o = cfg.optim
    opt_cls = torch.optim.AdamW
    if o.stochastic_rounding and tuner.trains_bf16:
        opt_cls = functools.partial(StochasticRoundingAdamW, generator=torch.Generator(device).manual_seed(cfg.seed + 3))
    scale = tuner.lr_scale
    params = [token.embedding_PC, *tuner.params.values()]
    groups = params if scale == 1.0 else [{"params": params[:1]}, {"params": params[1:], "lr": o.lr * scale}]
    return opt_cls(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


@torch.no_grad()
def draw_teacher_bank(run: Run, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher.bank_size > 0: `size` class-prompt samples of the teacher and its logits on them, drawn once
    (batches of batch_size). The teacher never changes, so per-step sampling draws i.i.d. from the same
    distribution; the bank replaces that by sampling with replacement from `size` such draws.
    Returns (x_NLC (size, L - 1, d), logits_NLV (size, L, V))."""
    cfg, model = run.cfg, run.accelerator.unwrap_model(run.model)
    t, xs, logits = cfg.teacher, [], []
    for start in range(0, size, cfg.batch_size):
        n = min(cfg.batch_size, size - start)
        cls_text, cls_mask = (x.expand(n, *x.shape[1:]) for x in run.cls)
        with run.tuner.teacher(), autocast(cfg.dtype, run.accelerator.device):
            x, lg = teacher_targets(model, cls_text, cls_mask, run.schedule, mode=t.mode, tau=t.tau, top_k=t.top_k,
                                    top_p=t.top_p, generator=run.generator)
        xs.append(x)
        logits.append(lg)
    log.info("teacher bank: %d class samples drawn once", size)
    return torch.cat(xs), torch.cat(logits)


def instance_batch(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing input (B, L - 1, d) and label bits (B, L, d) of photos `idx`, with bitwise
    self-correction (booth_trainer_final.py L177; strength 0 gives the clean bits)."""
    b = run.cfg.bsc
    r = flip_requant(run.vae, run.features_NdHW[idx], run.schedule, strength=b.strength,
                     apply_layers=b.apply_layers, requant=b.requant, generator=run.bsc_generator)
    return r.x_BLd, torch.cat([lb.flatten(1, 2) for lb in r.label_bits], 1)


def _no_probe(phase: str) -> None:
    pass


def train_step(run: Run, idx: torch.Tensor, on_phase: Callable[[str], None] = _no_probe) -> dict[str, float]:
    """One iteration on photos `idx`. `on_phase(name)` is called as each phase starts (teacher, instance,
    instance_update, distill, update): benchmarks/subject_memory.py takes per-phase memory peaks with it."""
    cfg, model = run.cfg, run.accelerator.unwrap_model(run.model)
    B, ctx = len(idx), autocast(cfg.dtype, run.accelerator.device)
    params = [run.token.embedding_PC, *run.tuner.params.values()]
    cls_text, cls_mask = (x.expand(B, *x.shape[1:]) for x in run.cls)
    # 1. the teacher first, while no graph holds the student's weights (see SelectiveTuner)
    if cfg.loss.prior and run.bank is not None:  # teacher.bank_size: reuse samples drawn at the start
        pick = torch.randint(run.bank[0].shape[0], (B,), generator=run.generator, device=run.generator.device)
        x_cls, teacher_logits = (b[pick.to(b.device)] for b in run.bank)
    elif cfg.loss.prior:
        on_phase("teacher")
        with run.tuner.teacher(), ctx:
            t = cfg.teacher
            x_cls, teacher_logits = teacher_targets(model, cls_text, cls_mask, run.schedule, mode=t.mode, tau=t.tau,
                                                    top_k=t.top_k, top_p=t.top_p, generator=run.generator)
    # 2. instance loss on the photos, with <S*> spliced into the prompt
    on_phase("instance")
    text, mask = run.token(*(x.expand(B, *x.shape[1:]) for x in run.inst))
    x_BLd, gt = instance_batch(run, idx)
    with ctx:
        logits = run.model(text, mask, x_BLd, run.schedule, cond_drop_B=_prompt_drop(run, model, B))
    loss = scale_weighted_bitwise_ce(logits, gt, run.schedule, run.weights)
    out = {"loss": loss.item(), "acc": per_scale_bit_accuracy(logits.detach(), gt, run.schedule),
           "lr": run.optimizer.param_groups[-1]["lr"]}
    total = loss
    if cfg.optim.step_mode == "two_steps" and cfg.loss.prior:  # authors: step on the instance loss first
        on_phase("instance_update")
        _grad_norm(out, _step(run, loss, params))
        total = 0.0
    # 3. prior distillation on the teacher's class maps
    if cfg.loss.prior:
        on_phase("distill")
        with ctx:
            student_logits = run.model(cls_text, cls_mask, x_cls, run.schedule, cond_drop_B=_prompt_drop(run, model, B))
        lo = cfg.loss
        reg = lo.reg_lambda * distill_loss(student_logits, teacher_logits, kind=lo.distill_type,
                                           temperature=lo.distill_temperature, softmax_over=lo.distill_softmax)
        out["distill"] = reg.item()
        total = total + reg
    on_phase("update")
    _grad_norm(out, _step(run, total, params))
    return out


def _grad_norm(out: dict, norm: float | None) -> None:
    """The gradient norm before clipping (optim.grad_clip > 0 only); two_steps: the larger of the two steps'."""
    if norm is not None:
        out["grad_norm"] = max(norm, out.get("grad_norm", 0.0))


def _prompt_drop(run: Run, model: torch.nn.Module, batch: int) -> torch.Tensor | None:
    """The student's prompt dropout (`model.cond_drop_rate`, the authors' 10% to cfg_uncond), in train mode
    only, drawn from the global RNG as the authors' forward does."""
    rate = run.cfg.model.cond_drop_rate if model.training else 0.0
    return draw_prompt_drop(batch, rate, run.accelerator.device)


def _step(run: Run, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float | None:
    run.accelerator.backward(loss)
    norm = None
    if run.cfg.optim.grad_clip > 0:
        norm = float(run.accelerator.clip_grad_norm_(params, run.cfg.optim.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def validate(run: Run, step: int) -> Path | None:
    if run.val is None:
        return None
    model = run.accelerator.unwrap_model(run.model)
    was = model.training
    model.eval()
    feats, mask, ph = run.val
    text, tmask = run.token(feats, mask, ph)
    out = model.generate(text, tmask, run.schedule, cfg=run.cfg.validation_guidance,
                         tau=run.cfg.validation_tau, seed=run.cfg.seed)
    model.train(was)
    return save_grid(out.images, Path(run.cfg.out_dir) / "val" / f"step_{step:06d}.png", nrow=len(out.images))


def save_outputs(run: Run, step: int) -> Path:
    """The personalization file (tuned tensors + <S*>), the resumable training state and run.json. They are
    written into a staging folder first and moved into out_dir only when all are complete (`commit_staged`),
    so a failed write (a full disk: one OutputError line) leaves the files of the last save, which agree."""
    out = Path(run.cfg.out_dir)
    stage = partial_dir(out / ".save")
    # file names, not this machine's paths (the run folder's config.yaml keeps those: subject_bases.build_base)
    meta = {"config": json.dumps(shareable(to_dict(run.cfg))), "base_model": run.base_id, "step": str(step),
            "placeholder": run.cfg.prompts.placeholder, "class_noun": run.class_noun or run.cfg.class_noun,
            "instance_template": run.cfg.prompts.instance_template, **run.tuner.file_metadata()}
    tuned = run.tuner.file_state_dict()  # LoRA: adapters in tuning.lora_file_dtype (training keeps fp32)
    try:
        _save_all(run, step, stage, tuned, meta)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    commit_staged(stage, out)  # a LoRA folder replaces the previous one whole
    return out / (LORA_DIR if run.cfg.tuning.method == "lora" else FULL_FILE)


def _save_all(run: Run, step: int, stage: Path, tuned: dict, meta: dict) -> None:
    # the file format is the one place the recipe tells the methods apart: a peft adapter folder for LoRA
    # (its writer, adapt/personalization.py, imports the tuners, so they cannot call it themselves)
    if run.cfg.tuning.method == "lora":
        save_lora_personalization(stage / LORA_DIR, run.tuner.spec, tuned, run.token.embedding_PC,
                                  base_tuned_sha256=run.base_tuned_sha256, base_name=base_name(run.base_id),
                                  metadata=meta)
    else:
        save_personalization(stage / FULL_FILE, tuned, run.token.embedding_PC,
                             base_tuned_sha256=run.base_tuned_sha256, metadata=meta)
    # the session's end goes into the training state too, so a resumed run's run.json keeps it
    run.record["sessions"][-1]["end_step"] = step
    save_torch({"step": step, "optimizer": run.optimizer.state_dict(), "token": run.token.embedding_PC.detach(),
                "tuned": run.tuner.tuned_state_dict(), "generator": run.generator.get_state(),
                "bsc_generator": run.bsc_generator.get_state(),
                "rng": torch.get_rng_state(),
                # DropPath and prompt drop draw from the device's global RNG: on a GPU that is CUDA's
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "run": {**run.identity, "record": run.record}}, stage / "train_state.pt")
    write_run_file(stage, run.record)


def _resume(run: Run, holds_run: bool) -> int:
    """Restore the state of the run in out_dir (0 for a fresh run); checks the config first."""
    path = Path(run.cfg.out_dir) / "train_state.pt"
    if not run.cfg.resume or not holds_run:
        run.record = new_run_record("train-subject")
        return 0
    if not path.is_file():
        raise RunFolderError(f"{run.cfg.out_dir} holds a run but no train_state.pt to resume; pass "
                             "--overwrite (overwrite=true) to start a new run there")
    state = torch.load(path, map_location=run.accelerator.device, weights_only=True)
    changes = check_resume(state.get("run", {}), run.identity, safe=SAFE_RESUME_KEYS, where=str(path))
    refuse_backwards(int(state["step"]), run.cfg.steps, where=str(run.cfg.out_dir), steps_key="steps=")
    run.record = {**state["run"]["record"], "_changes": changes}
    with torch.no_grad():
        run.token.embedding_PC.copy_(state["token"])
        for k, v in state["tuned"].items():
            run.tuner.params[k].copy_(v)
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"].cpu())
    if "bsc_generator" in state:  # states written before bitwise self-correction lack it
        run.bsc_generator.set_state(state["bsc_generator"].cpu())
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda_rng"]])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def train(cfg: SubjectTrainConfig) -> Path:
    """Run the recipe; returns the personalization file's path. The run holds out_dir while it runs
    (`hold_run_dir`: a second run into it is refused)."""
    from accelerate import PartialState

    if not cfg.subject:
        raise ConfigError("no subject folder given (--subject or subject=...)")
    check_single_process()
    launcher_precision(cfg.dtype, "dtype")
    schedule = check_config(cfg)  # before the run folder is touched or any weights load
    check_report_to(cfg.log.report_to)
    with hold_run_dir(cfg.out_dir, "train-subject", enabled=PartialState().is_main_process):
        return _train(cfg, schedule)


def _train(cfg: SubjectTrainConfig, schedule: list[tuple[int, int, int]]) -> Path:
    out = Path(cfg.out_dir)
    holds_run = prepare_run_dir(out, entries=RUN_ENTRIES, resume=cfg.resume, overwrite=cfg.overwrite,
                                resume_flag="--resume auto (resume=true)", overwrite_flag="--overwrite (overwrite=true)")
    if cfg.resume and holds_run:  # refuse a backwards resume from run.json before any weights load (2B/8B: minutes)
        reached = [s.get("end_step") for s in (read_run_file(out) or {}).get("sessions", []) if s.get("end_step")]
        if reached:
            refuse_backwards(max(reached), cfg.steps, where=str(cfg.out_dir), steps_key="steps=")
    run = setup(cfg, schedule)
    main = run.accelerator.is_main_process
    start = _resume(run, holds_run)
    start_session(run.record, start_step=start, changes=run.record.pop("_changes", {}),
                  config_sha256=run.identity["config_sha256"])
    if main:  # only now: a refused resume leaves the folder as it was
        save_config(cfg, out / "config.yaml")
        write_run_file(out, run.record)
    # log rows after the resumed step are dropped: those steps are logged again (metrics.jsonl, TensorBoard)
    open_trackers(run.accelerator, "train-subject", to_dict(cfg), out, resume_step=start)
    run.model.train()
    N = run.features_NdHW.shape[0]
    order = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start):  # replay the batch order up to the resumed step
        torch.randint(N, (cfg.batch_size,), generator=order)
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, main=main, desc="train-subject")
    path = None
    for step in bar:
        idx = torch.randint(N, (cfg.batch_size,), generator=order).to(run.features_NdHW.device)
        t0 = time.perf_counter()
        m = train_step(run, idx)
        m["step"], m["time_s"] = step + 1, time.perf_counter() - t0
        if main:
            bar.set_postfix(loss=f"{m['loss']:.4f}", distill=f"{m.get('distill', 0.0):.4f}",
                            acc="/".join(f"{a:.2f}" for a in m["acc"]), refresh=False)
            log_step(run.accelerator, out, m, step + 1)
            if (step + 1) % cfg.log.every == 0:
                log.debug("step %d  loss %.4f  distill %.4f", step + 1, m["loss"], m.get("distill", 0.0))
            if not (m["loss"] == m["loss"]):
                raise ArboothError(f"loss became NaN at step {step + 1}")
            if cfg.validate_every and (step + 1) % cfg.validate_every == 0:
                grid = validate(run, step + 1)
                if grid is not None:
                    log_grid(run.accelerator, "validation", grid, step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                path = save_outputs(run, step + 1)
    if main:
        path = save_outputs(run, cfg.steps)
        grids = sorted((out / "val").glob("step_*.png"))
        write_subject_card(cfg, path, base_id=run.base_id, base_sha256=run.base_tuned_sha256,
                           class_noun=run.class_noun, grid=grids[-1] if grids else None)
        log.info("wrote %s", path)
    close_trackers(run.accelerator)
    return path


def check_single_process() -> None:
    """ConfigError under a multi-process launch (accelerate launch / torchrun), before any work.

    Why: one step's random draws span the whole batch — the teacher's class samples (run.generator),
    the bit flips of bitwise self-correction (run.bsc_generator), the prompt drop and DropPath (the
    global RNG, inside the model) — so a batch split over ranks would draw other numbers than one
    process does, and the result would not equal the single-process run at the same global batch. The
    recipe trains batch 2 on one GPU (Infinity-2B fits 24 GB, docs/arbooth.md)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"train-subject runs on one process (this launch has {world}): a batch split over "
                          "ranks would draw other teacher samples, bit flips, prompt drops and DropPath masks "
                          "than one process, so the result would differ; launch it without --num_processes")


def write_subject_card(cfg: SubjectTrainConfig, path: Path, *, base_id: str, base_sha256: str, class_noun: str,
                       grid: Path | None = None, metrics: dict | None = None) -> list[Path]:
    """The model card of a finished subject run: out_dir/README.md, and for LoRA also inside the peft
    folder `path` (what a user shares). `grid`: an image to show; `metrics`: name -> value."""
    lora = cfg.tuning.method == "lora"
    t = cfg.tuning
    method = (f"ARBooth, LoRA r={t.lora_rank} alpha={t.alpha:g}" if lora else
              "ARBooth, full tuning") + f" of {'+'.join(tuned_module_kinds(t.self_attention, t.cross_attention, t.ffn, t.all_layers))}"
    phrase = f"{cfg.prompts.placeholder} {class_noun}"
    usage = (f"from arbooth.subject_bases import load_sampler\n"
             f"sampler = load_sampler({path.name!r})  # the base checkpoints: model_ckpt=..., vae_ckpt=..., t5=...\n"
             f"images = sampler.generate([\"a {phrase} on the beach\"], seed=0)  # (B, 3, H, W) in [0, 1]")
    if lora:
        usage += ("\n# or with peft: PeftModel.from_pretrained(base_infinity, folder) (the adapters only; "
                  "<S*> is in personalization.safetensors)")
    kw = {"title": f"ARBooth personalization: {phrase}",
              "summary": f"A personalization of a text-to-image Infinity model on photos of one subject ({class_noun}), "
                      f"trained {cfg.steps} steps at batch {cfg.batch_size} with arbooth (ARBooth, Chung et al., "
                      f"ICCV 2025). Prompts name the subject as `{phrase}`.",
              "base_model": base_name(base_id), "base_sha256": base_sha256, "method": method, "adapter": lora,
              "tags": ["text-to-image", "infinity", "arbooth-personalization", cfg.model.preset],
              "prompts": [v.format(phrase) for v in cfg.prompts.validation], "grid": grid, "metrics": metrics,
              "usage": usage}
    cards = [write_model_card(cfg.out_dir, **kw)]
    if lora:
        cards.append(write_model_card(path, **kw))
    return cards
