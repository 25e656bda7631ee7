"""Recipe: differentially private class-conditional fine-tuning of VAR (DP-SGD; FFT, LoRA, LNTuning).

Its own explicit loop (STYLE habit 4), reusing the small pieces the non-private recipe uses
(arbooth/models/var_training.py: `encode_batch`, `var_loss`, `drop_labels`, `build_optimizer`,
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

Result layout: as the non-private recipe's `final/` (the method's weights + arbooth.yaml, loadable by
`load_finetuned`), plus `privacy.yaml`. Resuming a DP run is not supported (the accountant state would
have to travel with the checkpoint).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from arbooth.adapt.finetuned import build_prepared, save_result_weights, write_result_meta
from arbooth.adapt.methods import count_parameters, unwrap_peft
from arbooth.checkpoint import commit_dir, partial_dir
from arbooth.config import save_config
from arbooth.data.class_dataset import ClassImageDataset
from arbooth.models.var_training import (
    build_optimizer,
    build_scheduler,
    drop_labels,
    encode_batch,
    step_seed,
    var_loss,
)
from arbooth.outputs import write_text
from arbooth.precision import autocast
from arbooth.privacy.engine import PrivacyBudgetExceeded, PrivateTraining, make_private
from arbooth.recipes.class_dp_config import ClassDPConfig, load_class_config

log = logging.getLogger(__name__)

__all__ = ["ClassDPConfig", "DPRun", "load_class_config", "privacy_report", "train"]


class MultiViewDataset(Dataset):
    """Example i -> (K augmented views (K, 3, H, W), label): VAR's augmentation with K seeds that are a
    function of (seed, epoch, i, view), so the views are reproducible and independent of workers."""

    def __init__(self, base: ClassImageDataset, views: int, seed: int) -> None:
        self.base, self.views, self.seed, self.epoch = base, views, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = ((self.seed * 1_000_003 + self.epoch) * 2_147_483 + i) * 1_009
        items = [self.base[(i, s + v)] for v in range(self.views)]
        return torch.stack([img for img, _, _ in items]), torch.tensor(items[0][1])


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
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by_budget: bool = False


def setup(cfg: ClassDPConfig, epsilon: float, *, accelerator=None) -> DPRun:
    from accelerate import Accelerator

    pc = cfg.privacy
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    vae, model = build_prepared(cfg.model, cfg.method, seed=cfg.train.seed)  # DPDDP also broadcasts rank 0's
    if acc.is_main_process:
        log.info("method %s: %s", cfg.method.name, count_parameters(model))
    base = ClassImageDataset.from_config(cfg.data, size=cfg.data.image_size, mid_size=cfg.mid_size,
                                         max_classes=cfg.model.num_classes)
    dataset = MultiViewDataset(base, pc.aug_multiplicity, cfg.train.seed)
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
    scheduler = build_scheduler(pt.optimizer.original_optimizer, cfg.optim, total)
    return DPRun(cfg=cfg, epsilon=epsilon, accelerator=acc, vae=vae, model=model, pt=pt, scheduler=scheduler,
                 dataset=dataset, total_steps=total, num_classes=cfg.model.num_classes)


def _encode(run: DPRun, img_N3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if img_N3HW.shape[0]:
        return encode_batch(run.vae, img_N3HW)
    var = unwrap_peft(run.model)  # an empty Poisson batch: zero-row targets and inputs
    dev = img_N3HW.device
    return (torch.zeros(0, var.L, dtype=torch.long, device=dev),
            torch.zeros(0, var.L - var.first_l, var.Cvae, device=dev))


def dp_step(run: DPRun, views_BK3HW: torch.Tensor, label_B: torch.Tensor, micro_step: int) -> dict[str, float]:
    """One physical batch: encode the K views of each example, forward them in one pass, backward
    (per-example mean over views), then `optimizer.step()`, which clips, noises and updates at the end
    of a logical batch and only accumulates otherwise. Raises PrivacyBudgetExceeded (no update)."""
    cfg, acc = run.cfg, run.accelerator
    b, k = views_BK3HW.shape[:2]
    img_N3HW = views_BK3HW.flatten(0, 1).to(acc.device, non_blocking=True)
    idx_NL, x_NLCv = _encode(run, img_N3HW)
    g = torch.Generator().manual_seed(step_seed(cfg.train.seed, micro_step, acc.process_index))
    label_N = drop_labels(label_B.repeat_interleave(k).to(acc.device), run.num_classes, cfg.optim.class_dropout, g)
    run.pt.optimizer.zero_grad(set_to_none=True)
    with autocast(cfg.train.precision, acc.device):
        logits_NLV = run.pt.module(label_N, x_NLCv)
    loss_N = var_loss(logits_NLV, idx_NL, label_smoothing=cfg.optim.label_smoothing, reduction="none")
    loss = run.pt.backward(loss_N)
    run.pt.optimizer.step()
    return {"loss": loss.item(), "examples": float(b)}


def train_one(cfg: ClassDPConfig, epsilon: float, out: Path, *, accelerator=None) -> DPRun:
    """One private run at target `epsilon` into `out`."""
    from tqdm.auto import tqdm

    run = setup(cfg, epsilon, accelerator=accelerator)
    acc, pt = run.accelerator, run.pt
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
    bar = tqdm(total=run.total_steps, desc=f"train-class dp {cfg.method.name} eps={epsilon:g}",
               disable=not acc.is_main_process, dynamic_ncols=True)
    pt.module.train()
    micro, epoch, window = 0, 0, []
    try:
        while pt.steps_taken < run.total_steps:
            run.dataset.epoch = epoch
            with pt.physical_batches(cfg.privacy.max_physical_batch_size) as loader:
                for views, label in loader:
                    before = pt.steps_taken
                    window.append(dp_step(run, views, label, micro))
                    micro += 1
                    if pt.steps_taken == before:
                        continue  # a physical sub-batch: gradients accumulated, no step yet
                    run.scheduler.step()
                    _end_of_step(run, window, bar)
                    window = []
                    if pt.steps_taken >= run.total_steps:
                        break
            epoch += 1
    except PrivacyBudgetExceeded as e:
        run.stopped_by_budget = True
        if acc.is_main_process:
            log.warning("%s", e)
    bar.close()
    save_result(run, out / "final")
    return run


def _end_of_step(run: DPRun, window: list[dict[str, float]], bar) -> None:
    n = sum(w["examples"] for w in window)
    row = {"loss": sum(w["loss"] * w["examples"] for w in window) / max(n, 1.0), "examples": n,
           "epsilon": run.pt.epsilon(), "lr": run.scheduler.get_last_lr()[0]}
    run.history.append(row)
    step = run.pt.steps_taken
    bar.update(1)
    if run.accelerator.is_main_process and (step % run.cfg.log.every == 0 or step == run.total_steps):
        bar.set_postfix(eps=f"{row['epsilon']:.3f}")
        log.info("step %d/%d  epsilon %.4f (target %g, delta %.3g)  sigma %.4f  lr %.3g", step,
                 run.total_steps, row["epsilon"], run.epsilon, run.pt.delta, run.pt.noise_multiplier, row["lr"])


def privacy_report(run: DPRun) -> dict:
    pt, pc = run.pt, run.cfg.privacy
    return {"target_epsilon": run.epsilon, "epsilon_spent": pt.epsilon(), "delta": pt.delta,
            "accountant": pc.accountant, "noise_multiplier": pt.noise_multiplier, "sample_rate": pt.sample_rate,
            "steps": pt.steps_taken, "planned_steps": run.total_steps, "max_grad_norm": pt.max_grad_norm,
            "aug_multiplicity": pt.views, "clipping": pt.clipping, "dataset_size": len(run.dataset),
            "stopped_by_budget": run.stopped_by_budget}


def save_result(run: DPRun, folder: Path) -> None:
    """Atomically write the method's weights, the (non-private) config and privacy.yaml (rank 0)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        partial = partial_dir(folder)
        save_result_weights(run.model, run.cfg.method.name, partial)
        write_result_meta(partial, run.cfg.without_privacy(), step=run.pt.steps_taken,
                          classes=run.dataset.base.classes)
        write_text(partial / "privacy.yaml", yaml.safe_dump(privacy_report(run), sort_keys=False))
        commit_dir(partial, folder)
        log.info("saved %s (epsilon %.4f spent of %g)", folder, run.pt.epsilon(), run.epsilon)
    acc.wait_for_everyone()


def train(cfg: ClassDPConfig, *, accelerator=None) -> list[DPRun]:
    """Run the recipe once per target epsilon (`privacy.epsilon` may be a sweep)."""
    runs = []
    for eps in cfg.privacy.epsilons:
        one = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=eps))
        runs.append(train_one(one, eps, cfg.run_dir(eps), accelerator=accelerator))
    return runs
