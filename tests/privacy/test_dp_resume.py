"""DP runs resume exactly with their accountant (issue 16 item 1), refuse another privacy config, and leave
unreadable images out of N and delta (issue 18 case 4)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml
from _class_tiny import tiny_config, write_dataset
from dp_tiny import TinyNet, row_loss
from PIL import Image

from arbooth.config import from_dict, to_dict
from arbooth.privacy.engine import PrivacyBudgetExceeded, make_private
from arbooth.recipes.train_class_dp import ClassDPConfig, train
from arbooth.runs import ResumeError


def _cfg(data: Path, out: Path, **over) -> ClassDPConfig:
    base = to_dict(tiny_config(data, out, method="lora"))
    base["method"]["lora_dropout"] = 0.1  # a global-RNG consumer inside the step
    base["train"].update({"max_steps": 5, "checkpoint_every": 1})
    base["privacy"] = {"epsilon": 8.0, "sample_rate": 0.5, "aug_multiplicity": 2, "max_grad_norm": 0.5,
                       "max_physical_batch_size": 3, "noise_seed": 0}
    for section, values in over.items():
        base[section] = {**base[section], **values}
    return from_dict(ClassDPConfig, base)


def _params(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def test_dp_run_stopped_and_resumed_is_bit_identical_with_the_same_epsilon(tmp_path):
    data = write_dataset(tmp_path / "data")  # 16 images, q = 0.5: 2 Poisson batches per epoch
    four = {"max_steps": 4, "checkpoint_every": 1}
    full = train(_cfg(data, tmp_path / "full", train=four))[0]
    cfg = _cfg(data, tmp_path / "split", train=four)
    a = train(cfg, stop_at=1)[0]               # mid-epoch
    b = train(cfg, resume="auto", stop_at=2)[0]  # from mid-epoch to an epoch boundary
    c = train(cfg, resume="auto")[0]           # from an epoch boundary over the next one to the end
    assert (a.pt.steps_taken, b.pt.steps_taken, c.pt.steps_taken) == (1, 2, 4)
    want, got = _params(full), _params(c)
    for n in want:
        assert torch.equal(want[n], got[n]), n
    assert c.pt.epsilon() == full.pt.epsilon() and c.pt.accountant.history == full.pt.accountant.history
    assert [h["loss"] for h in a.history + b.history + c.history] == [h["loss"] for h in full.history]
    rep = yaml.safe_load((tmp_path / "split" / "final" / "privacy.yaml").read_text())
    assert rep["epsilon_spent"] == full.pt.epsilon() and rep["steps"] == 4
    assert [(s["start_step"], s["end_step"]) for s in rep["sessions"]] == [(0, 1), (1, 2), (2, 4)]


def test_dp_resume_refuses_another_privacy_config_or_step_count(tmp_path):
    data = write_dataset(tmp_path / "data")
    train(_cfg(data, tmp_path / "out"), stop_at=1)
    with pytest.raises(ResumeError, match=r"privacy.max_grad_norm: 0.5 -> 1.0"):
        train(_cfg(data, tmp_path / "out", privacy={"max_grad_norm": 1.0}), resume="auto")
    with pytest.raises(ResumeError, match=r"train.max_steps: 5 -> 9"):  # sigma was calibrated for 5 steps
        train(_cfg(data, tmp_path / "out", train={"max_steps": 9}), resume="auto")


def _engine(seed_model: int, target: float, n: int = 6, accountant: str = "pld"):
    model = TinyNet(seed_model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 11, (n, 3), generator=g)
    y = torch.randint(0, 5, (n, 3), generator=g)
    ds = torch.utils.data.TensorDataset(tok, y)
    # q = 1: every example in every batch, so the data stream has no position; the noise generator,
    # the accountant and the optimizer are what the engine's state must carry
    return make_private(model, opt, ds, target_epsilon=target, delta=1e-3, sample_rate=1.0, steps=10,
                        max_grad_norm=1.0, noise_multiplier=1.0, accountant=accountant,
                        noise_generator=torch.Generator().manual_seed(7)), model


def _steps(pt, model, until: int | None = None) -> bool:
    """Train until the budget refuses a step (True) or `until` steps were taken (False)."""
    try:
        while until is None or pt.steps_taken < until:
            with pt.physical_batches(4) as loader:
                for tok, y in loader:
                    pt.optimizer.zero_grad(set_to_none=True)
                    pt.backward(row_loss(pt.module(tok), y))
                    pt.optimizer.step()
    except PrivacyBudgetExceeded:
        return True
    return False


@pytest.mark.parametrize("stop,accountant", [(2, "pld"), ("refused", "pld"), ("refused", "rdp")])
def test_engine_state_round_trips_including_right_after_a_refused_step(stop, accountant):
    probe, _ = _engine(0, 1e9, accountant=accountant)
    eps = [probe.meter([(1.0, 1.0, k)]) for k in (3, 4)]
    target = (eps[0] + eps[1]) / 2  # steps 1-3 fit, step 4 is refused
    full, m_full = _engine(0, target, accountant=accountant)
    assert _steps(full, m_full) and full.steps_taken == 3
    first, m_first = _engine(0, target, accountant=accountant)
    refused = _steps(first, m_first, until=None if stop == "refused" else stop)
    assert refused == (stop == "refused")
    assert first.state_dict()["accountant"]["history"]
    second, m_second = _engine(0, target, accountant=accountant)
    torch.save(first.state_dict(), buf := io.BytesIO())
    buf.seek(0)
    m_second.load_state_dict(m_first.state_dict())
    second.load_state_dict(torch.load(buf, weights_only=False))
    assert _steps(second, m_second)  # the resumed run is refused at the same step
    assert second.steps_taken == 3 and second.epsilon() == full.epsilon()
    for a, b in zip(m_full.parameters(), m_second.parameters()):
        assert torch.equal(a, b)


def test_dp_leaves_an_unreadable_image_out_of_n_and_delta(tmp_path):
    data = write_dataset(tmp_path / "data")  # 16 images
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    (data / "class_0" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    run = train(_cfg(data, tmp_path / "out", train={"max_steps": 1}))[0]
    rep = yaml.safe_load((tmp_path / "out" / "final" / "privacy.yaml").read_text())
    assert rep["dataset_size"] == 16 and rep["delta"] == 1 / 16 and rep["unreadable_files"] == 1
    assert "truncated.jpg" not in {s.path.name for s in run.dataset.base.samples}


def test_dp_run_stopped_by_the_budget_guard_resumes_to_the_same_end(tmp_path, monkeypatch):
    # Less noise than the calibration asks for, so that the guard refuses a step before the planned 5.
    from arbooth.privacy import engine
    calibrate = engine.calibrate_noise
    monkeypatch.setattr(engine, "calibrate_noise", lambda **kw: 0.8 * calibrate(**kw))
    data = write_dataset(tmp_path / "data")
    full = train(_cfg(data, tmp_path / "full"))[0]
    assert full.stopped_by_budget and 1 < full.pt.steps_taken < 5
    cfg = _cfg(data, tmp_path / "split")
    train(cfg, stop_at=1)
    a = train(cfg, resume="auto")[0]  # runs until the guard refuses, and saves right after the refusal
    b = train(cfg, resume="auto")[0]  # resumed right after the refused step: refused again at once
    for run in (a, b):
        assert run.stopped_by_budget and run.pt.steps_taken == full.pt.steps_taken
        assert run.pt.epsilon() == full.pt.epsilon()
        want, got = _params(full), _params(run)
        for n in want:
            assert torch.equal(want[n], got[n]), n
    rep = yaml.safe_load((tmp_path / "split" / "final" / "privacy.yaml").read_text())
    assert rep["stopped_by_budget"] and rep["epsilon_spent"] == full.pt.epsilon() <= 8.0
