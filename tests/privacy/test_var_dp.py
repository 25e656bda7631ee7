"""DP-SGD on a tiny VAR, per method: per-example gradients with augmentation multiplicity equal a
one-example-at-a-time loop, and both ghost modes (Opacus' two passes, one-backward book-keeping) give the
same clipped sum as the explicit path."""
from __future__ import annotations

import pytest
import torch
from dp_tiny import clip, trainable
from opacus.validators import ModuleValidator
from torch.utils.data import TensorDataset

from arbooth.adapt.methods import prepare_for_method
from arbooth.models import VAR, VQVAE
from arbooth.models.var_training import var_loss
from arbooth.privacy.engine import make_private

B = 3


def _tiny_var(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, share_quant_resi=4, patch_nums=(1, 2), ch_mult=(1, 1))
    var = VAR(vae, num_classes=4, depth=1, embed_dim=16, num_heads=2, patch_nums=(1, 2))
    model = prepare_for_method(var, method, lora_rank=2, lora_alpha=4, lora_dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero (and ada_lin at zero in some inits): perturb them all
        for p in trainable(model):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(var_L: int, cv: int, K: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    label_N = torch.randint(0, 4, (B,), generator=g).repeat_interleave(K)
    x_NLC = torch.randn(B * K, var_L - 1, cv, generator=g)
    idx_NL = torch.randint(0, 16, (B * K, var_L), generator=g)
    return label_N, x_NLC, idx_NL


def _brute(model, label_N, x_NLC, idx_NL, K: int) -> list[torch.Tensor]:
    out = []
    for i in range(B):
        sl = slice(i * K, (i + 1) * K)
        loss = var_loss(model(label_N[sl], x_NLC[sl]), idx_NL[sl])
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, trainable(model))]))
    return out


@pytest.mark.parametrize("method,K", [("fft", 1), ("fft", 2), ("fft", 8), ("lora", 2), ("lntuning", 2)])
def test_var_dp_per_example_and_ghost(method: str, K: int) -> None:
    ref_model = _tiny_var(method)
    assert ModuleValidator.validate(ref_model, strict=False) == []
    base = ref_model.base_model.model if hasattr(ref_model, "base_model") else ref_model
    label_N, x_NLC, idx_NL = _inputs(base.L, base.Cvae, K)
    ref = _brute(ref_model, label_N, x_NLC, idx_NL, K)
    c = float(torch.stack([g.norm() for g in ref]).median())
    expected = torch.stack([clip(g, c) for g in ref]).sum(0)
    sums = {}
    for clipping in ("explicit", "ghost", "book_keeping"):
        model = _tiny_var(method)
        pt = make_private(model, torch.optim.SGD(trainable(model), lr=0.0), TensorDataset(torch.zeros(B)),
                          target_epsilon=float("inf"), delta=1e-5, sample_rate=1.0, steps=1, max_grad_norm=c,
                          views=K, clipping=clipping, noise_multiplier=0.0)
        pt.backward(var_loss(pt.module(label_N, x_NLC), idx_NL, reduction="none"))
        if clipping == "explicit":
            got_B = torch.cat([p.grad_sample.reshape(B, -1) for p in pt.optimizer.params], 1)
            torch.testing.assert_close(got_B, torch.stack(ref), atol=1e-5, rtol=1e-4)
        pt.optimizer.step()
        sums[clipping] = torch.cat([p.grad.flatten() for p in pt.optimizer.params]) * B
        torch.testing.assert_close(sums[clipping], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sums["book_keeping"], sums["ghost"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("clipping", ["explicit", "ghost", "book_keeping"])
def test_var_empty_poisson_batch(clipping: str) -> None:
    """An empty logical batch through VAR: no crash, the step releases noise only and is accounted."""
    model = _tiny_var("lora")
    base = model.base_model.model
    pt = make_private(model, torch.optim.SGD(trainable(model), lr=1.0), TensorDataset(torch.zeros(B)),
                      target_epsilon=float("inf"), delta=1e-5, sample_rate=0.5, steps=1, max_grad_norm=1.0,
                      views=2, clipping=clipping, noise_multiplier=1.0)
    before = [p.detach().clone() for p in trainable(model)]
    label_N = torch.zeros(0, dtype=torch.long)
    x_NLC, idx_NL = torch.zeros(0, base.L - 1, base.Cvae), torch.zeros(0, base.L, dtype=torch.long)
    pt.backward(var_loss(pt.module(label_N, x_NLC), idx_NL, reduction="none"))
    pt.optimizer.step()
    assert pt.steps_taken == 1
    assert all(torch.isfinite(p).all() for p in trainable(model))
    assert not all(torch.equal(a, b) for a, b in zip(before, trainable(model)))
