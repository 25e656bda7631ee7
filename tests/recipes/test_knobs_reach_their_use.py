"""Every configured value must be seen to reach its use: each test changes one knob of a recipe and
checks its effect where the recipe uses it (not only the function that uses it, in isolation). Each
test here was checked by hand against a mutant that drops the knob (see the comment on each)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _class_tiny import tiny_config, write_dataset

from arbooth.config import load_config
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_class import setup as class_setup
from arbooth.recipes.train_class import train
from arbooth.recipes.train_subject import setup as subject_setup
from arbooth.recipes.train_subject import train_step as subject_step


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("knob_data"))


# ------------------------------------------------------------------ ARBooth recipe
def _first_subject_step(subject: Path, out: Path, *overrides: str) -> dict[str, float]:
    cfg = load_config(SubjectTrainConfig, None, [
        f"subject={subject}", "class_noun=dog", f"out_dir={out}", "model.preset=tiny", "model.pn=0.06M",
        "model.tuned_dtype=fp32", "dtype=fp32", "device=cpu", "batch_size=2", "bsc.strength=0.0",
        "optim.step_mode=combined", *overrides])
    return subject_step(subject_setup(cfg), torch.tensor([0, 1]))


def test_subject_scale_weights_reg_lambda_and_distill_form_reach_the_losses(toy_subject_dir: Path, tmp_path: Path) -> None:
    """Mutants caught: the recipe using all-one scale weights instead of `loss.scale_weights`, and the step
    using reg_lambda = 1 instead of `loss.reg_lambda`. Both losses are linear in their knob, and the first
    step's logits do not depend on either (same seed, combined update after both losses), so tripling the
    weights triples the instance loss and halving lambda halves the distillation loss."""
    n = 7  # scales of the 0.06M schedule
    w = (1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25)
    a = _first_subject_step(toy_subject_dir, tmp_path / "a", f"loss.scale_weights={list(w)}", "loss.reg_lambda=0.5")
    b = _first_subject_step(toy_subject_dir, tmp_path / "b", f"loss.scale_weights={[3 * x for x in w]}",
                            "loss.reg_lambda=0.25")
    assert len(a["acc"]) == n and a["loss"] > 0 and a["distill"] > 0
    assert b["loss"] == pytest.approx(3 * a["loss"], rel=1e-5)
    assert b["distill"] == pytest.approx(0.5 * a["distill"], rel=1e-5)
    # the distillation form reaches the step too: a per-bit softmax gives another KL, same instance loss
    c = _first_subject_step(toy_subject_dir, tmp_path / "c", f"loss.scale_weights={list(w)}", "loss.reg_lambda=0.5",
                            "loss.distill_softmax=bit")
    assert c["loss"] == pytest.approx(a["loss"], rel=1e-6) and c["distill"] != pytest.approx(a["distill"], rel=1e-3)


# ------------------------------------------------------------------ class recipe
def _with_method(cfg, **method):
    return replace(cfg, method=replace(cfg.method, **method))


def _lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict) and m.scaling]


def test_lora_alpha_reaches_the_adapter_scale(data_root: Path, tmp_path: Path) -> None:
    """Mutant caught: LoRA built with lora_alpha = lora_rank (scale 1). The adapter's output is scaled by
    alpha / rank; parameter counts and identity-at-init do not depend on alpha, so check the scale."""
    cfg = _with_method(tiny_config(data_root, tmp_path / "run", "lora"), lora_rank=4, lora_alpha=12)
    run = class_setup(cfg)
    layers = _lora_layers(run.model)
    assert layers and all(m.scaling["default"] == pytest.approx(3.0) for m in layers)
    # and functionally: with B = 0 -> 1e-2, the output moves by exactly scale * B A x
    lin = layers[0]
    x = torch.randn(3, lin.in_features)
    with torch.no_grad():
        base = lin.base_layer(x)
        torch.nn.init.constant_(lin.lora_B["default"].weight, 1e-2)
        delta = lin(x) - base
        expected = 3.0 * (x @ lin.lora_A["default"].weight.T @ lin.lora_B["default"].weight.T)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


def _labels_seen(run_cfg) -> list[torch.Tensor]:
    """Labels that reach the transformer's forward during `train` (a global forward pre-hook, filtered to
    VAR modules, records its first argument)."""
    from arbooth.models.var import VAR

    seen: list[torch.Tensor] = []

    def record(module, args):
        if isinstance(module, VAR):
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(run_cfg)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("p", [0.0, 0.9])
def test_class_dropout_reaches_the_model_during_train(data_root: Path, tmp_path: Path, p: float) -> None:
    """Mutant caught: the training step never dropping labels (drop_labels is tested alone elsewhere;
    here the dropped labels must arrive at the model's forward during `train`)."""
    cfg = tiny_config(data_root, tmp_path / f"run{p}", "fft", train={"max_steps": 3}, optim={"class_dropout": p})
    seen = _labels_seen(cfg)
    labels = torch.cat(seen)
    assert len(seen) == 3 and labels.numel() == 12
    dropped = (labels == cfg.model.num_classes).float().mean().item()
    if p == 0.0:
        assert dropped == 0.0 and set(labels.tolist()) <= {0, 1}
    else:  # 12 labels at p = 0.9: P(no label dropped) = 1e-12
        assert dropped > 0.5


def _weights(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.accelerator.unwrap_model(run.model).named_parameters()}


def test_resume_in_the_middle_of_an_epoch(data_root: Path, tmp_path: Path) -> None:
    """Mutant caught: the resumed run dropping the in-epoch offset (it would see the epoch's first batches
    again). 16 images, batch 4: 4 batches an epoch; stopping after 2 steps stops mid-epoch."""
    over = {"train": {"max_steps": 6, "grad_accum": 1, "checkpoint_every": 2}, "optim": {"lr": 1e-2}}
    full = train(tiny_config(data_root, tmp_path / "full", "lora", **over))
    cfg = tiny_config(data_root, tmp_path / "split", "lora", **over)
    first = train(cfg, stop_at=2)
    second = train(cfg, resume="auto")
    assert [h["loss"] for h in first.history + second.history] == [h["loss"] for h in full.history]
    a, b = _weights(full), _weights(second)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_restores_the_global_rng(data_root: Path, tmp_path: Path) -> None:
    """Mutant caught: resume without restoring the global RNG. LoRA dropout draws its masks from the
    global torch RNG, so a resumed run only matches the uninterrupted one if that state comes back
    (resumed at an epoch boundary, where both runs start a new pass over the loader)."""
    over = {"train": {"max_steps": 4, "grad_accum": 2, "checkpoint_every": 2}, "optim": {"lr": 1e-2}}
    full = train(_with_method(tiny_config(data_root, tmp_path / "full", "lora", **over), lora_dropout=0.5))
    cfg = _with_method(tiny_config(data_root, tmp_path / "split", "lora", **over), lora_dropout=0.5)
    train(cfg, stop_at=2)
    second = train(cfg, resume="auto")
    a, b = _weights(full), _weights(second)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the dropout is live: without it, the same run ends elsewhere
    nodrop = train(tiny_config(data_root, tmp_path / "nodrop", "lora", **over))
    c = _weights(nodrop)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_label_smoothing_reaches_the_training_loss(data_root: Path, tmp_path: Path) -> None:
    """`optim.label_smoothing` changes the loss the class recipe reports on its first step (same seed and
    batch): found by the knob search (no test set it)."""
    first = []
    for eps in (0.0, 0.2):
        run = train(tiny_config(data_root, tmp_path / f"ls{eps}", "fft", train={"max_steps": 1},
                                optim={"label_smoothing": eps}))
        first.append(run.history[0]["loss"])
    assert first[0] != pytest.approx(first[1], rel=1e-4)
