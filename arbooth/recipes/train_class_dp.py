"""Recipe: differentially private class-conditional fine-tuning of VAR (DP-SGD; FFT, LoRA, LNTuning).

Its own explicit loop (STYLE habit 4), reusing the small pieces the non-private recipe uses
(arbooth/models/var_training.py: `encode_batch`, `var_loss`, `drop_labels_at`, `build_optimizer`,
`build_scheduler`); its config is arbooth/recipes/class_dp_config.py. What differs:
- the logical batch is a Poisson sample of rate `privacy.sample_rate` (not `train.batch_size` x
  `train.grad_accum`, which are unused here), split into physical batches of
  `privacy.max_physical_batch_size` examples by Opacus' BatchMemoryManager;
- each example arrives as `privacy.aug_multiplicity` augmented views (K) that go through the model in
  one batched pass; its gradient is the mean over its views before clipping (arbooth.privacy.views);
- the noise is calibrated to (epsilon, delta, q, steps) before the first step; the run stops early
  (and still saves) if a step would exceed the budget; the spent epsilon is logged on every log line
  and written with every result (`privacy.yaml`);
- only the accountant's epsilon and privatised quantities are logged (STYLE habit 12): training loss
  and accuracy are computed from raw data and are kept in memory (`DPRun.history`) but not logged.
A list of epsilons (a sweep) runs once per value into `out_dir/eps_<value>/`.

Result layout: as the non-private recipe (run.json, config.yaml, `checkpoints/step_*` every
`train.checkpoint_every` steps, `final/` with the method's weights + arbooth.yaml, loadable by
`load_finetuned`), plus `privacy.yaml` in each result. A checkpoint's `train_state.pt` holds the
accountant's history, sigma and the settings it was calibrated for, the noise generator's state, the
Poisson sampler's generator state at the start of the epoch and the number of batches drawn in it, the
optimizer, scheduler, global RNG and step: `resume` continues the same run bit-identically, with the
same epsilon, and privacy.yaml states the epsilon spent over all sessions. A resume may change only
`SAFE_RESUME_KEYS` (no step count, no privacy key: sigma was calibrated for the planned steps).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from arbooth.adapt.finetuned import build_prepared, save_result_weights, write_class_card, write_result_meta
from arbooth.adapt.methods import count_parameters, unwrap_peft
from arbooth.checkpoint import commit_dir, partial_dir, save_torch
from arbooth.config import save_config, to_dict
from arbooth.data.class_dataset import ClassImageDataset, augmentation_seed
from arbooth.errors import ConfigError
from arbooth.models.var_training import (
    build_optimizer,
    build_scheduler,
    drop_labels_at,
    encode_batch,
    step_seed,
    var_loss,
)
from arbooth.outputs import write_text
from arbooth.precision import autocast
from arbooth.privacy.engine import PrivacyBudgetExceeded, PrivateTraining, make_private
from arbooth.progress import progress
from arbooth.recipes.class_dp_config import DP_SAFE_RESUME_KEYS as SAFE_RESUME_KEYS
from arbooth.recipes.class_dp_config import ClassDPConfig, load_class_config
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
    log_grid,
    log_step,
    open_trackers,
)

log = logging.getLogger(__name__)

__all__ = ["ClassDPConfig", "DPRun", "load_class_config", "privacy_report", "train"]

RUN_ENTRIES = ("config.yaml", "checkpoints", "final", "samples", "tensorboard", "wandb", "metrics.jsonl")


class MultiViewDataset(Dataset):
    """Example i -> (K augmented views (K, 3, H, W), label): VAR's augmentation with K seeds that are a
    function of (seed, epoch, i, view), so the views are reproducible and independent of workers."""

    def __init__(self, base: ClassImageDataset, views: int, seed: int) -> None:
        self.base, self.views, self.seed, self.epoch = base, views, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.base[(i, augmentation_seed(self.seed, self.epoch, i, v))] for v in range(self.views)]
        return torch.stack([img for img, _ in items]), torch.tensor(items[0][1])


@dataclass
class DPRun:
    cfg: ClassDPConfig
    epsilon: float                    # the target of this run (one value of a sweep)
    accelerator: object
    vae: nn.Module
    model: nn.Module                  # the method-prepared model (inside pt.module)
    pt: PrivateTraining
    scheduler: object
    dataset: MultiViewDataset
    total_steps: int
    num_classes: int
    identity: dict = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by_budget: bool = False


def setup(cfg: ClassDPConfig, epsilon: float, *, accelerator=None) -> DPRun:
    pc = cfg.privacy
    acc = accelerator or make_dp_accelerator(cfg, cfg.run_dir(epsilon))
    # the data first: delta is checked against N before any weights load
    base = ClassImageDataset.from_config(cfg.data, size=cfg.data.image_size, mid_size=cfg.mid_size,
                                         max_classes=cfg.model.num_classes)
    dataset = MultiViewDataset(base, pc.aug_multiplicity, cfg.train.seed)
    pc.check_delta(len(dataset))
    vae, model, base_sha = build_prepared(cfg.model, cfg.method, seed=cfg.train.seed)  # DPDDP also broadcasts rank 0's
    if acc.is_main_process:
        log.info("method %s: %s", cfg.method.name, count_parameters(model))
    steps_per_epoch = int(1 / pc.sample_rate)  # Opacus' Poisson sampler: int(1/q) batches per epoch
    total = cfg.train.max_steps or max(1, int(cfg.train.epochs * steps_per_epoch))
    model.to(acc.device)
    vae.to(acc.device)
    optimizer = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(pc.noise_seed) if pc.noise_seed is not None else None
    pt = make_private(model, optimizer, dataset, target_epsilon=epsilon, delta=pc.delta_for(len(dataset)),
                      sample_rate=pc.sample_rate, steps=total, max_grad_norm=pc.max_grad_norm,
                      views=pc.aug_multiplicity, clipping=pc.clipping, accountant=pc.accountant,
                      noise_generator=gen, sampling_generator=torch.Generator().manual_seed(cfg.train.seed),
                      num_workers=cfg.data.num_workers)
    # The loader's own generator for the base seed it draws at each iterator creation, so that the
    # Poisson sampler's generator is consumed only by the masks (one per logical batch): its position
    # is then "epoch start state + batches drawn", which a resume restores exactly.
    pt.data_loader.generator = torch.Generator().manual_seed(cfg.train.seed + 1)
    scheduler = build_scheduler(pt.optimizer.original_optimizer, cfg.optim, total)
    if base.unreadable and acc.is_main_process:
        log.warning("DP: %d unreadable image file(s) left out before calibrating: N = %d, delta = %.3g",
                    len(base.unreadable), len(dataset), pt.delta)
    return DPRun(cfg=cfg, epsilon=epsilon, accelerator=acc, vae=vae, model=model, pt=pt, scheduler=scheduler,
                 dataset=dataset, total_steps=total, num_classes=cfg.model.num_classes, base=base_sha,
                 identity=run_identity(cfg, data_sha256=base.fingerprint(),
                                       base_sha256=base_sha["vae_sha256"] + base_sha["var_sha256"]))


def _encode(run: DPRun, img_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if img_N3HW.shape[0]:
        return encode_batch(run.vae, img_N3HW)
    var = unwrap_peft(run.model)  # an empty Poisson batch: zero-row targets and inputs
    dev = img_N3HW.device
    return (torch.zeros(0, var.L, dtype=torch.long, device=dev),
            torch.zeros(0, var.L - var.first_l, var.Cvae, device=dev))


def dp_step(run: DPRun, views_BK3HW: torch.Tensor, label_B: torch.Tensor, offset: int) -> dict[str, float]:
    """One physical batch, examples offset .. offset + B - 1 of the current logical batch: encode the K views
    of each example, forward them in one pass, backward (per-example mean over views), then
    `optimizer.step()`, which clips, noises and updates at the end of a logical batch and only accumulates
    otherwise. The label-dropout mask of each view is drawn per logical sample (`drop_labels_at`, seeded by
    the step), so `privacy.max_physical_batch_size` does not change the result. Raises
    PrivacyBudgetExceeded (no update)."""
    cfg, acc = run.cfg, run.accelerator
    b, k = views_BK3HW.shape[:2]
    img_N3HW = views_BK3HW.flatten(0, 1).to(acc.device, non_blocking=True)
    idx_NL, x_NLCv = _encode(run, img_N3HW)
    label_N = drop_labels_at(label_B.repeat_interleave(k).to(acc.device), run.num_classes, cfg.optim.class_dropout,
                             seed=step_seed(cfg.train.seed, run.pt.steps_taken, acc.process_index), offset=offset * k)
    run.pt.optimizer.zero_grad(set_to_none=True)
    with autocast(cfg.train.precision, acc.device):
        logits_NLV = run.pt.module(label_N, x_NLCv)
    loss_N = var_loss(logits_NLV, idx_NL, label_smoothing=cfg.optim.label_smoothing, reduction="none")
    loss = run.pt.backward(loss_N)
    run.pt.optimizer.step()
    return {"loss": loss.item(), "examples": float(b)}


@contextlib.contextmanager
def _epoch_from(sampler, start: int) -> Iterator[None]:
    """Make the Poisson sampler's next iteration draw only the batches after the first `start` of its
    epoch: the first `start` masks are drawn and dropped (the generator's state then equals the
    uninterrupted run's), and its public batch count is lowered for this one epoch."""
    if start == 0:
        yield
        return
    attr = "steps" if hasattr(sampler, "steps") else "num_batches"  # Opacus' local / distributed samplers
    per_epoch = getattr(sampler, attr)
    it = iter(sampler)
    for _ in range(start):
        next(it)
    setattr(sampler, attr, per_epoch - start)
    try:
        yield
    finally:
        setattr(sampler, attr, per_epoch)


def train_one(cfg: ClassDPConfig, epsilon: float, out: Path, *, resume: str | Path | None = None,
              overwrite: bool = False, stop_at: int | None = None, accelerator=None) -> DPRun:
    """One private run at target `epsilon` into `out`. `resume`: a checkpoint folder or "auto" (see the
    non-private recipe); `stop_at`: leave after that many steps (checkpointed), as if interrupted."""
    check_report_to(cfg.log.report_to)  # a missing tracker package: before anything is written
    acc = accelerator or make_dp_accelerator(cfg, out)
    with hold_run_dir(out, "train-class (DP)", enabled=acc.is_main_process):  # one run per folder
        return _train_one(cfg, epsilon, out, acc, resume=resume, overwrite=overwrite, stop_at=stop_at)


def _train_one(cfg: ClassDPConfig, epsilon: float, out: Path, acc, *, resume: str | Path | None,
               overwrite: bool, stop_at: int | None) -> DPRun:
    holds_run = prepare_run_dir(out, entries=RUN_ENTRIES, resume=resume is not None, overwrite=overwrite,
                                delete=acc.is_main_process)
    acc.wait_for_everyone()
    run = setup(cfg, epsilon, accelerator=acc)
    pt = run.pt
    sampler = pt.data_loader.batch_sampler
    # where the data stream stands after the last completed step: the epoch, the sampler's generator
    # state at its start, the logical batches drawn in it, and the physical batches seen (class dropout)
    pos = {"epoch": 0, "in_epoch": 0, "epoch_state": sampler.generator.get_state(), "micro": 0}
    if resume is not None and (holds_run or str(resume) != "auto"):
        pos = load_dp_checkpoint(run, resume, out)
    else:
        run.record = new_run_record("train-class (DP)")
    start_session(run.record, start_step=pt.steps_taken, changes=run.record.pop("_changes", {}),
                  config_sha256=run.identity["config_sha256"])
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
        write_run_file(out, run.record)
    # the config is public (docs/privacy.md); log rows after a resumed step are dropped (logged again)
    open_trackers(acc, "train-class-dp", to_dict(cfg), out, resume_step=pt.steps_taken)
    end = min(run.total_steps, stop_at) if stop_at is not None else run.total_steps
    bar = progress(total=run.total_steps, initial=pt.steps_taken,
                   desc=f"train-class dp {cfg.method.name} eps={epsilon:g}", main=acc.is_main_process,
                   dynamic_ncols=True)
    pt.module.train()
    micro, window = pos["micro"], []
    try:
        while pt.steps_taken < end:
            run.dataset.epoch = pos["epoch"]
            sampler.generator.set_state(pos["epoch_state"])
            with _epoch_from(sampler, pos["in_epoch"]), \
                    pt.physical_batches(cfg.privacy.max_physical_batch_size) as loader:
                for views, label in loader:
                    before = pt.steps_taken
                    window.append(dp_step(run, views, label, int(sum(w["examples"] for w in window))))
                    micro += 1
                    if pt.steps_taken == before:
                        continue  # a physical sub-batch: gradients accumulated, no step yet
                    pos["in_epoch"], pos["micro"] = pos["in_epoch"] + 1, micro
                    run.scheduler.step()
                    _end_of_step(run, window, bar, out)
                    window = []
                    step = pt.steps_taken
                    if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == end:
                        save_dp_checkpoint(run, pos, out / "checkpoints" / f"step_{step:08d}")
                    if step >= end:
                        break
            if pt.steps_taken < end:  # the epoch's batches are all drawn: the next epoch starts here
                pos = {"epoch": pos["epoch"] + 1, "in_epoch": 0, "epoch_state": sampler.generator.get_state(),
                       "micro": micro}
    except PrivacyBudgetExceeded as e:
        # the refused batch was drawn but not counted in pos["in_epoch"]: a resume draws it again and is
        # refused again, so a stopped-and-resumed run ends where this one does
        run.stopped_by_budget = True
        if acc.is_main_process:
            log.warning("%s", e)
        save_dp_checkpoint(run, pos, out / "checkpoints" / f"step_{pt.steps_taken:08d}")
    bar.close()
    if pt.steps_taken >= run.total_steps or run.stopped_by_budget:
        save_result(run, out / "final")
        if acc.is_main_process:
            r = privacy_report(run)
            write_class_card(out / "final", cfg.without_privacy(), run.base, run.dataset.base.classes,
                             {"epsilon_spent": r["epsilon_spent"], "target_epsilon": r["target_epsilon"],
                              "noise_multiplier": r["noise_multiplier"], "steps": r["steps"]},
                             privacy={"epsilon": r["epsilon_spent"], "delta": r["delta"]})
    close_trackers(acc)
    return run


def make_dp_accelerator(cfg: ClassDPConfig, out: Path):
    """DP-SGD runs in fp32 (Opacus' per-sample gradients): a launcher asking for mixed precision is refused,
    never silently applied or dropped; log.report_to's trackers."""
    import os

    from accelerate import Accelerator

    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked != "no":
        raise ConfigError(f"the launcher asks for --mixed_precision {asked}, but DP training runs in fp32; "
                          "launch without --mixed_precision")
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                       **accelerator_kwargs(cfg.log.report_to, out))


@torch.no_grad()
def save_dp_samples(run: DPRun, path: Path, step: int) -> Path | None:
    """A grid of `log.sample_per_class` images for each of `log.sample_classes` from the privately trained
    model (post-processing of the DP release: no extra privacy cost). Rank 0 only."""
    from arbooth.data.images import save_grid

    acc, lc = run.accelerator, run.cfg.log
    if not acc.is_main_process:
        return None
    var = unwrap_peft(run.model)
    labels = torch.tensor([c for c in lc.sample_classes for _ in range(lc.sample_per_class)], device=acc.device)
    was_training = var.training
    var.eval()
    img = var.generate(labels, cfg=lc.sample_cfg, top_k=lc.sample_top_k, top_p=lc.sample_top_p, seed=step)
    var.train(was_training)
    return save_grid(img, path, nrow=lc.sample_per_class)


def save_dp_checkpoint(run: DPRun, pos: dict, folder: Path) -> None:
    """The result (weights, arbooth.yaml, privacy.yaml) plus train_state.pt (rank 0; DP runs keep one
    process's RNG: Opacus adds the noise on rank 0 only)."""
    acc = run.accelerator
    save_result(run, folder, train_state={
        "step": run.pt.steps_taken, "world_size": acc.num_processes, "private": run.pt.state_dict(),
        "scheduler": run.scheduler.state_dict(), "position": pos, "rng": get_rng_state(),
        "stopped_by_budget": run.stopped_by_budget,
        "run": {**run.identity, "run_id": run.record["run_id"], "record": run.record}})
    if acc.is_main_process:
        prune_checkpoints(folder.parent, run.cfg.train.keep_checkpoints, run.record["run_id"])


def load_dp_checkpoint(run: DPRun, resume: str | Path, out: Path) -> dict:
    """Check and restore a DP checkpoint (`runs.resume_point`, as the non-private `load_checkpoint`, plus
    the private state); returns the sampler position."""
    from arbooth.adapt.finetuned import load_result_weights

    # our own file (save_dp_checkpoint): the accountant and generator states are not plain tensors
    point = resume_point(out, resume, identity=run.identity, safe=SAFE_RESUME_KEYS,
                         num_processes=run.accelerator.num_processes, end_step=run.total_steps,
                         weights_only=False,
                         require=("private", "is not a DP checkpoint; it cannot continue a private run"))
    state = point.state
    load_result_weights(run.model, run.cfg.method.name, point.folder)
    run.pt.load_state_dict(state["private"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    run.stopped_by_budget = bool(state.get("stopped_by_budget"))
    run.record = point.record
    if run.accelerator.is_main_process:
        log.info("resumed %s at step %d, epsilon %.4f spent so far", point.folder, point.step, run.pt.epsilon())
    return dict(state["position"])


def _end_of_step(run: DPRun, window: list[dict[str, float]], bar, out: Path) -> None:
    """Book-keeping after one private step. Logged (console, trackers, metrics.jsonl): epsilon spent,
    sigma and lr only; the loss and the Poisson batch size come from the private data and stay in
    `run.history` (docs/privacy.md)."""
    n = sum(w["examples"] for w in window)
    row = {"loss": sum(w["loss"] * w["examples"] for w in window) / max(n, 1.0), "examples": n,
           "epsilon": run.pt.epsilon(), "lr": run.scheduler.get_last_lr()[0]}
    run.history.append(row)
    step = run.pt.steps_taken
    bar.update(1)
    log_step(run.accelerator, out, {"epsilon": row["epsilon"], "sigma": run.pt.noise_multiplier, "lr": row["lr"]},
             step)
    lc = run.cfg.log
    if lc.sample_every and step % lc.sample_every == 0:
        grid = save_dp_samples(run, out / "samples" / f"step_{step:08d}.png", step)
        if grid is not None:
            log_grid(run.accelerator, "samples", grid, step)
    if run.accelerator.is_main_process and (step % run.cfg.log.every == 0 or step == run.total_steps):
        bar.set_postfix(eps=f"{row['epsilon']:.3f}", refresh=False)
        log.info("step %d/%d  epsilon %.4f (target %g, delta %.3g)  sigma %.4f  lr %.3g", step,
                 run.total_steps, row["epsilon"], run.epsilon, run.pt.delta, run.pt.noise_multiplier, row["lr"])


def privacy_report(run: DPRun) -> dict:
    """privacy.yaml: epsilon_spent covers every session of the run (the accountant's whole history);
    `sessions` lists the steps each one ran; `unreadable_files` were left out of N before calibrating."""
    pt, pc = run.pt, run.cfg.privacy
    return {"target_epsilon": run.epsilon, "epsilon_spent": pt.epsilon(), "delta": pt.delta,
            "accountant": pc.accountant, "noise_multiplier": pt.noise_multiplier, "sample_rate": pt.sample_rate,
            "steps": pt.steps_taken, "planned_steps": run.total_steps, "max_grad_norm": pt.max_grad_norm,
            "aug_multiplicity": pt.views, "clipping": pt.clipping, "dataset_size": len(run.dataset),
            "unreadable_files": len(run.dataset.base.unreadable), "stopped_by_budget": run.stopped_by_budget,
            "sessions": [{"start_step": x["start_step"], "end_step": x["end_step"]}
                         for x in run.record.get("sessions", [])]}


def save_result(run: DPRun, folder: Path, *, train_state: dict | None = None) -> None:
    """Atomically write the method's weights, the (non-private) config and privacy.yaml (rank 0), and
    `train_state` into train_state.pt when given (a checkpoint). Updates run.json."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.record["sessions"][-1]["end_step"] = run.pt.steps_taken
        partial = partial_dir(folder)
        save_result_weights(run.model, run.cfg.method.name, partial)
        write_result_meta(partial, run.cfg.without_privacy(), step=run.pt.steps_taken,
                          classes=run.dataset.base.classes, base=run.base,
                          run={"run_id": run.record["run_id"], "sessions": run.record["sessions"],
                               "unreadable_files": len(run.dataset.base.unreadable)})
        write_text(partial / "privacy.yaml", yaml.safe_dump(privacy_report(run), sort_keys=False))
        if train_state is not None:
            save_torch(train_state, partial / "train_state.pt")
        commit_dir(partial, folder)
        write_run_file(folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent,
                       run.record)
        log.info("saved %s (epsilon %.4f spent of %g)", folder, run.pt.epsilon(), run.epsilon)
    acc.wait_for_everyone()


def train(cfg: ClassDPConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          stop_at: int | None = None, accelerator=None) -> list[DPRun]:
    """Run the recipe once per target epsilon (`privacy.epsilon` may be a sweep: one run folder per value,
    `cfg.run_dir(eps)`; `resume="auto"` resumes each, an explicit checkpoint folder needs one value)."""
    if cfg.privacy.is_sweep and resume is not None and str(resume) != "auto":
        raise ConfigError("a sweep resumes with --resume auto (one checkpoint folder cannot continue several runs)")
    runs = []
    for eps in cfg.privacy.epsilons:
        one = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=eps))
        runs.append(train_one(one, eps, cfg.run_dir(eps), resume=resume, overwrite=overwrite, stop_at=stop_at,
                              accelerator=accelerator))
    return runs
