"""benchmarks/memory.py's accounting on fake tensors against the same step on real tensors.

The ARBooth step (teacher, both forwards, both backwards, two AdamW steps) of a tiny Infinity runs
twice: built on the meta device and run on fake tensors (what memory.py does at 2B), and built with real
random weights and run for real. MemTracker follows both; every phase's peak and the split by category
at the step's peak must agree to 2% (the two runs differ only in the values: dropout/prompt-drop draws,
teacher samples; shapes, dtypes and the order of allocations and frees are the same code path)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from arbooth.toy.tiny import TINY

_spec = importlib.util.spec_from_file_location("memory_bench", Path(__file__).parents[2] / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(_spec)
sys.modules["memory_bench"] = memory
_spec.loader.exec_module(memory)

# 3 scales of the 0.06M schedule (1, 2x2, 4x4): every op costs ~1 ms on fake tensors, and the teacher's
# scale-by-scale sampling is most of them; 2 blocks so that activations accumulate over blocks
TINY_KW = {"pn": "0.06M", "scales": 3, "infinity": TINY["model"], "vae": TINY["vae"]}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fake_accounting_equals_real_step(method):
    with memory.fake_tensors():
        fake = memory.account(memory.arbooth_step(method=method, batch=2, fake=True, **TINY_KW))
    real = memory.account(memory.arbooth_step(method=method, batch=2, fake=False, **TINY_KW))
    phases = {"teacher", "instance forward", "instance backward", "instance optimizer", "distill forward",
              "distill backward", "distill optimizer"}
    assert phases <= set(real["phase_peak_gib"]) and phases <= set(fake["phase_peak_gib"])
    for phase in phases:
        r = real["phase_peak_gib"][phase]
        assert fake["phase_peak_gib"][phase] == pytest.approx(r, rel=0.02), phase
    for cat in ("Parameter", "Gradient", "Optstate"):
        assert fake["split_gib"][cat] == pytest.approx(real["split_gib"][cat], rel=0.02), cat
    assert fake["step_tflop"] == pytest.approx(real["step_tflop"], rel=1e-6)
    # gradients and optimizer state are there and agree too (at LoRA's peak, in the teacher, there are none;
    # a LoRA tuner built on meta that listed the meta adapters gave the fake optimizer nothing to step)
    for phase, cat in (("instance optimizer", "Gradient"), ("distill forward", "Optstate")):
        r = real["phase_split_gib"][phase][cat]
        assert r > 0 and fake["phase_split_gib"][phase][cat] == pytest.approx(r, rel=0.02), (phase, cat)


def test_real_peak_matches_live_tensor_bytes():
    """Independent of MemTracker: the parameters + optimizer state it reports after the step equal the
    bytes of the live tensors counted directly."""
    step = memory.arbooth_step(method="full", batch=1, fake=False, **TINY_KW)
    res = memory.account(step)
    model, vae, opt = step.tracked[0], step.tracked[1], step.tracked[2]
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
              for m in (model, vae) for p in [*m.parameters(), *m.buffers()]}
    state = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    gib = 2**30
    assert res["phase_split_gib"]["distill forward"]["Optstate"] == pytest.approx(state / gib, rel=0.02)
    assert res["split_gib"]["Parameter"] + res["split_gib"]["Buffer"] >= sum(params.values()) / gib * 0.98


TINY_VAR_DIMS = {"vae": {"vocab_size": 64, "z_channels": 8, "ch": 32, "share_quant_resi": 4,
                         "patch_nums": (1, 2, 3, 4), "ch_mult": (1, 1)},
                 "var": {"num_classes": 10, "depth": 2, "embed_dim": 128, "num_heads": 4, "patch_nums": (1, 2, 3, 4)},
                 "image_size": 8}


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_class_step_accounts_on_fake_tensors(method):
    """The class recipe's train_step (memory.py's var_* rows) still runs on fake tensors, with gradients
    and optimizer state, so a change of its inputs cannot silently break those rows."""
    with memory.fake_tensors():
        res = memory.account(memory.var_step(method=method, batch=2, dims=TINY_VAR_DIMS))
    assert res["split_gib"]["Parameter"] > 0 and res["step_tflop"] > 0
    assert max(s["Optstate"] for s in res["phase_split_gib"].values()) > 0
