"""The loss-threshold membership-inference audit: metric values, and `arbooth audit` non-private vs DP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _class_tiny import tiny_config
from PIL import Image

from arbooth.cli import main
from arbooth.config import to_dict
from arbooth.privacy.audit import loss_threshold_attack, roc_auc, tpr_at_fpr


def test_auc_and_tpr_at_low_fpr_known_values() -> None:
    assert roc_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert roc_auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert roc_auc(torch.tensor([2.0]), torch.tensor([2.0])) == 0.5  # ties count half
    members, nonmembers = torch.arange(100.0) + 50, torch.arange(100.0)  # overlap on [50, 99]
    assert roc_auc(members, nonmembers) == pytest.approx(0.875)  # (8725 wins + 50 ties / 2) / 100^2
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(0.51)  # threshold 98: 1 non-member above
    res = loss_threshold_attack(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0]))  # low loss = member
    assert (res.auc, res.tpr_at_1pct_fpr) == (1.0, 1.0)


def _noise_images(root: Path, seed: int, per_class: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_audit_cli_nonprivate_leaks_more_than_dp_at_epsilon_1(tmp_path: Path) -> None:
    """A tiny VAR memorises 8 noise images: the attack separates members from non-members when the
    training is not private, and is near chance under DP-SGD at epsilon 1."""
    members, nonmembers = _noise_images(tmp_path / "members", 0), _noise_images(tmp_path / "nonmembers", 1)
    cfg = to_dict(tiny_config(members, tmp_path / "np", method="fft"))
    cfg["data"].update(hflip=False, random_crop=False)
    cfg["optim"].update(lr=2e-3, grad_clip=0.0, class_dropout=0.0)
    cfg["train"].update(max_steps=60, batch_size=8)
    (tmp_path / "np.yaml").write_text(yaml.safe_dump(cfg))
    cfg["train"].update(max_steps=20, out_dir=str(tmp_path / "dp"))
    cfg["privacy"] = {"epsilon": 1.0, "sample_rate": 0.5, "max_grad_norm": 1.0, "max_physical_batch_size": 8,
                      "noise_seed": 0}
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("np", "dp"):
        assert main(["audit", "--config", str(tmp_path / f"{name}.yaml"), "--members", str(members),
                     "--nonmembers", str(nonmembers), "--json", str(tmp_path / f"{name}.json")]) == 0
    nonprivate = json.loads((tmp_path / "np.json").read_text())["non-private"]
    private = json.loads((tmp_path / "dp.json").read_text())["epsilon=1"]
    assert nonprivate["auc"] >= 0.9 and nonprivate["member_loss"] < nonprivate["nonmember_loss"]
    assert private["auc"] <= 0.75
    assert nonprivate["auc"] - private["auc"] >= 0.25
    spent = yaml.safe_load((tmp_path / "dp" / "final" / "privacy.yaml").read_text())
    assert spent["epsilon_spent"] <= 1.0
