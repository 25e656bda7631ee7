"""Recipe: class-conditional fine-tuning of a released VAR (FFT, LoRA, LNTuning) over accelerate.

One explicit loop (STYLE habit 4): `setup` builds the tokenizer, the transformer, the method's trainable
set, the data and the optimizer; `train_step` is one micro-step; `train` runs the loop with gradient
accumulation, logging, sample grids and resumable checkpoints. The loss pieces (`encode_batch`,
`var_loss`, `drop_labels_at`, `token_metrics`) and the optimizer are small functions in
arbooth/models/var_training.py, shared with the DP recipe, the audit and `arbooth profile`.

Result layout under `train.out_dir` (one run per folder: arbooth/runs.py, README "Run folders"):
    run.json                            run id, command, and one entry per session (steps, applied changes)
    config.yaml                         the resolved config of the run (of its latest session)
    checkpoints/step_00000100/          one per `train.checkpoint_every` steps (the last few kept)
        arbooth.yaml                    config + method, step, class names
        adapter_model.safetensors       LoRA/LNTuning: only the adapter (peft's format) + adapter_config.json
        transformer.safetensors         FFT: the full transformer
        train_state.pt, rng_rank*.pt    optimizer, scheduler, step, data position, RNG, and the run's
                                        identity (config values + hash, data hash, base hash): for --resume
    final/                              the same, without the training state
    samples/, metrics.jsonl             logs: sample grids, one JSON line per optimizer step
    tensorboard/, wandb/                log.report_to's trackers (arbooth/tracking.py)
A fresh run refuses a folder that holds another run unless `overwrite` (which deletes those entries);
`resume` continues the run only when the config differs in `SAFE_RESUME_KEYS` at most.
A whole checkpoint folder is written under a temporary name and renamed, so it is complete or absent.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from arbooth.adapt.finetuned import (
    build_prepared,
    load_result_weights,
    save_result_weights,
    write_class_card,
    write_result_meta,
)
from arbooth.adapt.methods import count_parameters, unwrap_peft
from arbooth.checkpoint import commit_dir, partial_dir, save_torch
from arbooth.config import save_config, to_dict
from arbooth.data.class_dataset import ClassImageDataset, EpochBatchSampler, collate_class_batch
from arbooth.models.var_training import (
    build_optimizer,
    build_scheduler,
    drop_labels_at,
    encode_batch,
    step_seed,
    token_metrics,
    var_loss,
)
from arbooth.progress import progress
from arbooth.recipes.class_config import SAFE_RESUME_KEYS, ClassTrainConfig
from arbooth.runs import (
    get_rng_state,
    hold_run_dir,
    new_run_record,
    prepare_run_dir,
    prune_checkpoints,
    resume_point,
    run_identity,
    set_rng_state,
    start_session,
    write_run_file,
)
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

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# What this recipe writes into train.out_dir: a folder holding any of these holds a run.
RUN_ENTRIES = ("config.yaml", "checkpoints", "final", "samples", "tensorboard", "wandb", "metrics.jsonl")


# ------------------------------------------------------------------ setup
@dataclass
class Run:
    """Everything the loop needs; built by `setup`."""

    cfg: ClassTrainConfig
    accelerator: object
    vae: nn.Module
    model: nn.Module            # prepared (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: object
    dataset: ClassImageDataset
    sampler: EpochBatchSampler
    loader: torch.utils.data.DataLoader
    total_steps: int
    grad_accum: int             # micro-steps per optimizer step (derived from the global batch)
    num_classes: int
    last_l: int
    identity: dict = field(default_factory=dict)    # runs.run_identity: config, data and base hashes
    base: dict[str, str] = field(default_factory=dict)  # {"vae_sha256", "var_sha256"} of the base weights
    record: dict = field(default_factory=dict)      # run.json: run id and sessions
    history: list[dict[str, float]] = field(default_factory=list)


def make_accelerator(cfg: ClassTrainConfig):
    """The run's Accelerator: the config's precision (a launcher asking for another is refused) and
    log.report_to's trackers."""
    from accelerate import Accelerator

    launcher_precision(cfg.train.precision, "train.precision")
    return Accelerator(mixed_precision=PRECISION_TO_ACCELERATE[cfg.train.precision],
                       cpu=not torch.cuda.is_available(),
                       **accelerator_kwargs(cfg.log.report_to, cfg.train.out_dir))


def setup(cfg: ClassTrainConfig, *, accelerator=None) -> Run:
    acc = accelerator or make_accelerator(cfg)
    dataset = ClassImageDataset.from_config(cfg.data, size=cfg.data.image_size, mid_size=cfg.mid_size,
                                            max_classes=cfg.model.num_classes)
    sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, world_size=acc.num_processes,
                                rank=acc.process_index, seed=cfg.train.seed)
    if cfg.model.var_ckpt is None and acc.is_main_process:
        log.warning("no model.vae_ckpt / model.var_ckpt: training from random weights")
    vae, model, base = build_prepared(cfg.model, cfg.method, seed=cfg.train.seed)
    if acc.is_main_process:
        log.info("method %s: %s", cfg.method.name, count_parameters(model))
    # The loader's own generator: creating an iterator draws a base seed from it, which would otherwise
    # come from the global RNG and shift every later dropout mask of a run resumed mid-epoch.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         collate_fn=collate_class_batch,
                                         pin_memory=acc.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    grad_accum = cfg.train.accum_steps(acc.num_processes)
    total_steps = cfg.total_steps(len(sampler), acc.num_processes)
    if acc.is_main_process:
        log.info("logical batch %d = %d per process x %d process(es) x %d accumulation step(s)",
                 cfg.train.logical_batch(acc.num_processes), cfg.train.batch_size, acc.num_processes, grad_accum)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process); the data loader is ours because the sampler already shards by rank.
    model, optimizer = acc.prepare(model, optimizer)
    vae.to(acc.device)
    return Run(cfg=cfg, accelerator=acc, vae=vae, model=model, optimizer=optimizer, scheduler=scheduler,
               dataset=dataset, sampler=sampler, loader=loader, total_steps=total_steps,
               grad_accum=grad_accum, num_classes=cfg.model.num_classes, last_l=cfg.model.patch_nums[-1] ** 2,
               base=base, identity=run_identity(cfg, data_sha256=dataset.fingerprint(),
                                                base_sha256=base["vae_sha256"] + base["var_sha256"]))


# ------------------------------------------------------------------ the loop
def train_step(run: Run, img_B3HW: torch.Tensor, label_B: torch.Tensor, micro_step: int,
               update: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-step: encode, drop labels, forward, backward; on `update`, clip and step."""
    cfg, acc = run.cfg, run.accelerator
    img_B3HW, label_B = img_B3HW.to(acc.device, non_blocking=True), label_B.to(acc.device, non_blocking=True)
    idx_BL, x_BLCv = encode_batch(run.vae, img_B3HW)
    # masks per sample of the logical batch (seeded by the optimizer step): train.batch_size, the
    # per-device memory knob, does not change them at a fixed train.global_batch_size
    step, within = divmod(micro_step, run.grad_accum)
    label_B = drop_labels_at(label_B, run.num_classes, cfg.optim.class_dropout,
                             seed=step_seed(cfg.train.seed, step, acc.process_index),
                             offset=within * cfg.train.batch_size)
    # skip DDP's gradient all-reduce on accumulation micro-steps
    sync = acc.no_sync(run.model) if not update else contextlib.nullcontext()
    with sync:
        with acc.autocast():
            logits_BLV = run.model(label_B, x_BLCv)
        loss = var_loss(logits_BLV, idx_BL, label_smoothing=cfg.optim.label_smoothing)
        acc.backward(loss / run.grad_accum)
    stats = {"loss": loss.item(), **token_metrics(logits_BLV.detach(), idx_BL, run.last_l)}
    if update:
        if cfg.optim.grad_clip > 0:
            stats["grad_norm"] = float(acc.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip))
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), stats


def train(cfg: ClassTrainConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          stop_at: int | None = None, accelerator=None) -> Run:
    """Run the recipe. `resume`: a checkpoint folder, or "auto" for the newest checkpoint of the run in
    out_dir (a fresh start when out_dir holds no run). `overwrite`: replace the run out_dir holds.
    Without either, a folder holding a run is refused (RunFolderError). `stop_at`: leave after that
    many optimizer steps (checkpointed), as if interrupted."""
    check_report_to(cfg.log.report_to)  # a missing tracker package: before anything is written
    acc = accelerator or make_accelerator(cfg)
    # the run holds its folder (one run per folder, also when two start at once); rank 0 takes the lock
    with hold_run_dir(cfg.train.out_dir, "train-class", enabled=acc.is_main_process):
        return _train(cfg, acc, resume=resume, overwrite=overwrite, stop_at=stop_at)


def _train(cfg: ClassTrainConfig, acc, *, resume: str | Path | None, overwrite: bool, stop_at: int | None) -> Run:
    out = Path(cfg.train.out_dir)
    holds_run = prepare_run_dir(out, entries=RUN_ENTRIES, resume=resume is not None, overwrite=overwrite,
                                delete=acc.is_main_process)
    acc.wait_for_everyone()
    run = setup(cfg, accelerator=acc)
    step = 0
    if resume is not None and (holds_run or str(resume) != "auto"):
        step = load_checkpoint(run, resume)
    else:
        run.record = new_run_record("train-class")
    start_session(run.record, start_step=step, changes=run.record.pop("_changes", {}),
                  config_sha256=run.identity["config_sha256"])
    if acc.is_main_process:  # only now: a refused resume leaves the folder as it was
        save_config(cfg, out / "config.yaml")
        write_run_file(out, run.record)
    # a resumed run's log rows after its step are dropped: they are logged again (metrics.jsonl, TensorBoard)
    open_trackers(acc, "train-class", to_dict(cfg), out, resume_step=step)
    bpe = len(run.sampler)
    end = min(run.total_steps, stop_at) if stop_at is not None else run.total_steps
    bar = progress(total=run.total_steps, initial=step, desc=f"train-class {cfg.method.name}",
                   main=acc.is_main_process, dynamic_ncols=True)
    run.model.train()
    micro, window, t0 = step * run.grad_accum, [], time.perf_counter()
    while step < end:
        run.sampler.set_position(micro // bpe, micro % bpe)
        for img, label in run.loader:
            update = (micro + 1) % run.grad_accum == 0
            _, stats = train_step(run, img, label, micro, update)
            micro += 1
            window.append(stats)
            if not update:
                continue
            step += 1
            bar.update(1)
            row = {k: float(np.mean([s[k] for s in window if k in s])) for k in window[-1]}
            row["lr"] = run.scheduler.get_last_lr()[0]
            run.history.append(row)
            window = []
            log_step(acc, out, row, step)
            if step % cfg.log.every == 0 or step == end:
                _log_row(acc, row, step, time.perf_counter() - t0, bar)
            if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                grid = save_samples(run, out / "samples" / f"step_{step:08d}.png", step)
                if grid is not None:
                    log_grid(acc, "samples", grid, step)
            if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == end:
                save_checkpoint(run, step, out / "checkpoints" / f"step_{step:08d}", train_state=True)
                if acc.is_main_process:
                    prune_checkpoints(out / "checkpoints", cfg.train.keep_checkpoints, run.record["run_id"])
            if step >= end:
                break
    bar.close()
    if step >= run.total_steps:
        save_checkpoint(run, step, out / "final", train_state=False)
        if acc.is_main_process:
            write_class_card(out / "final", cfg, run.base, run.dataset.classes, run.history[-1] if run.history else {})
    if run.dataset.unreadable and acc.is_main_process:
        log.warning("%d unreadable image file(s) were left out of the data set", len(run.dataset.unreadable))
    close_trackers(acc)
    return run


def _log_row(acc, row: dict[str, float], step: int, elapsed: float, bar) -> None:
    """Console line of rank 0 (its share of the step's batches; no extra all-reduce)."""
    if not acc.is_main_process:
        return
    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.1f}", acc_last=f"{row['acc_last']:.1f}",
                    refresh=False)  # the bar redraws at its own interval (arbooth/progress.py)
    log.info("step %d  loss %.4f  acc %.2f%%  acc_last %.2f%%  lr %.3g  %.1fs", step, row["loss"],
             row["acc"], row["acc_last"], row["lr"], elapsed)


@torch.no_grad()
def save_samples(run: Run, path: Path, step: int) -> Path | None:
    """A grid of `log.sample_per_class` images for each of `log.sample_classes` (rank 0 only)."""
    from arbooth.data.images import save_grid

    acc, lc = run.accelerator, run.cfg.log
    if not acc.is_main_process:
        return
    var = unwrap_peft(acc.unwrap_model(run.model))
    labels = torch.tensor([c for c in lc.sample_classes for _ in range(lc.sample_per_class)], device=acc.device)
    was_training = var.training
    var.eval()
    with acc.autocast():
        img = var.generate(labels, cfg=lc.sample_cfg, top_k=lc.sample_top_k, top_p=lc.sample_top_p, seed=step)
    var.train(was_training)
    return save_grid(img, path, nrow=lc.sample_per_class)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(run: Run, step: int, folder: Path, *, train_state: bool) -> None:
    """Write `folder` atomically: every rank writes its RNG state into a temporary folder, rank 0 the
    weights and optimizer state, then rank 0 renames it into place. Also updates run.json."""
    acc, folder = run.accelerator, Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    if acc.is_main_process:
        partial = partial_dir(folder)
    acc.wait_for_everyone()
    if train_state:
        save_torch(get_rng_state(), partial / f"rng_rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.record["sessions"][-1]["end_step"] = step
        model = acc.unwrap_model(run.model)
        save_result_weights(model, run.cfg.method.name, partial)
        write_result_meta(partial, run.cfg, step=step, classes=run.dataset.classes, base=run.base,
                          run={"run_id": run.record["run_id"], "sessions": run.record["sessions"],
                               "unreadable_files": len(run.dataset.unreadable)})
        if train_state:
            save_torch({"step": step, "micro_step": step * run.grad_accum,
                        "world_size": acc.num_processes, "optimizer": run.optimizer.state_dict(),
                        "scheduler": run.scheduler.state_dict(),
                        "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                        "run": {**run.identity, "run_id": run.record["run_id"], "record": run.record}},
                       partial / "train_state.pt")
        commit_dir(partial, folder)
        write_run_file(run.cfg.train.out_dir, run.record)
        log.info("saved %s", folder)
    acc.wait_for_everyone()


def load_checkpoint(run: Run, resume: str | Path) -> int:
    """Check that a checkpoint continues this run (`runs.resume_point`: same config up to SAFE_RESUME_KEYS,
    same data, same base), then restore weights, optimizer, scheduler and RNG; returns its step. Sets
    `run.record`."""
    acc = run.accelerator
    point = resume_point(run.cfg.train.out_dir, resume, identity=run.identity, safe=SAFE_RESUME_KEYS,
                         num_processes=acc.num_processes, end_step=run.total_steps)
    state, folder = point.state, point.folder
    load_result_weights(acc.unwrap_model(run.model), run.cfg.method.name, folder)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if acc.scaler is not None and state.get("grad_scaler") is not None:  # fp16 loss scale
        acc.scaler.load_state_dict(state["grad_scaler"])
    rng_path = folder / f"rng_rank{acc.process_index}.pt"
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
    run.record = point.record
    if acc.is_main_process:
        log.info("resumed from %s at step %d%s", folder, point.step,
                 f" with changes {point.changes}" if point.changes else "")
    return point.step


def losses(history: Iterable[dict[str, float]]) -> list[float]:
    return [h["loss"] for h in history]
