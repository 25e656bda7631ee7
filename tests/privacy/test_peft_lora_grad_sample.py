"""Opacus issue #820: peft LoRA per-sample gradients under Opacus, with the versions the project pins.

The issue reports silently wrong LoRA updates with newer peft. This checks, for the pinned pair, that
the per-example gradients of every LoRA matrix equal a one-example-at-a-time loop (explicit,
ghost and book-keeping paths, with augmentation multiplicity), and that nothing but the LoRA matrices trains.
"""
from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
import torch.nn.functional as F
from dp_tiny import clip
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import TensorDataset

from arbooth.privacy.engine import make_private

PINNED = {"peft": "0.21.2", "opacus": "1.6.0"}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x_NTD)))


def _lora_mlp() -> nn.Module:
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["fc1", "fc2"]))
    with torch.no_grad():  # peft starts lora_B at zero: give B a value so every gradient is non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def _loss_N(model: nn.Module, x_NTD: torch.Tensor, y_NT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x_NTD).transpose(1, 2), y_NT, reduction="none").mean(1)


def test_pinned_versions_are_installed() -> None:
    assert {name: version(name) for name in PINNED} == PINNED


@pytest.mark.parametrize("clipping", ["explicit", "ghost", "book_keeping"])
def test_lora_per_example_gradients_match_brute_force(clipping: str) -> None:
    b, k, c = 5, 3, 0.2
    g = torch.Generator().manual_seed(0)
    x_NTD = torch.randn(b * k, 4, 6, generator=g)
    y_NT = torch.randint(0, 4, (b * k, 4), generator=g)

    ref_model = _lora_mlp()
    names = [n for n, p in ref_model.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    ref = []
    for i in range(b):
        sl = slice(i * k, (i + 1) * k)
        grads = torch.autograd.grad(_loss_N(ref_model, x_NTD[sl], y_NT[sl]).mean(),
                                    [p for p in ref_model.parameters() if p.requires_grad])
        ref.append(torch.cat([gr.flatten() for gr in grads]))
    ref_B = torch.stack(ref)
    assert (ref_B.norm(dim=1) > c).any() and (ref_B.norm(dim=1) > 0).all()

    model = _lora_mlp()
    pt = make_private(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
                      TensorDataset(torch.zeros(b)), target_epsilon=float("inf"), delta=1e-5,
                      sample_rate=1.0, steps=1, max_grad_norm=c, views=k, clipping=clipping, noise_multiplier=0.0)
    pt.backward(_loss_N(pt.module, x_NTD, y_NT))
    if clipping == "explicit":
        got_B = torch.cat([p.grad_sample.reshape(b, -1) for p in pt.optimizer.params], 1)
        torch.testing.assert_close(got_B, ref_B, atol=1e-6, rtol=1e-5)
    pt.optimizer.step()
    got = torch.cat([p.grad.flatten() for p in pt.optimizer.params]) * pt.optimizer.expected_batch_size
    torch.testing.assert_close(got, torch.stack([clip(r, c) for r in ref]).sum(0), atol=1e-6, rtol=1e-4)
