"""VAR is adaptable without patches: peft LoRA on mat_qkv trains, Opacus validates it and its per-sample
gradients equal a one-example-at-a-time loop."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from peft import LoraConfig, get_peft_model

from arbooth.models import VAR, VQVAE
from arbooth.models.var import VAE_PRESET, VAR_PRESETS
from arbooth.toy.tiny import build_tiny_var

BLOCK_LINEARS = r"blocks\.\d+\.(attn\.mat_qkv|attn\.proj|ffn\.fc1|ffn\.fc2|ada_lin\.1)"


def _batch(var, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, var.num_classes, (B,), generator=g)
    x_BLCv = torch.randn(B, var.L - var.first_l, var.Cvae, generator=g)
    target_BL = torch.randint(0, var.V, (B, var.L), generator=g)
    return labels, x_BLCv, target_BL


def _loss(logits_BLV, target_BL):
    return F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten(), reduction="sum")


def test_lora_on_mat_qkv_gets_gradients():
    model = get_peft_model(build_tiny_var().train(), LoraConfig(r=4, lora_alpha=4, target_modules=["mat_qkv"]))
    labels, x, target = _batch(model.base_model.model)
    _loss(model(labels, x), target).backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_r16_on_block_linears_of_d16_is_6_03M():
    with torch.device("meta"):
        var = VAR(VQVAE(**VAE_PRESET), **VAR_PRESETS[16])
    model = get_peft_model(var, LoraConfig(r=16, lora_alpha=16, target_modules=BLOCK_LINEARS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 16 * 16 * (1024 + 3072 + 2 * 1024 + 2 * (1024 + 4096) + 1024 + 6144) == 6_029_312


def test_opacus_validator_accepts_var():
    assert ModuleValidator.validate(build_tiny_var(shared_aln=True).train(), strict=False) == []
    assert ModuleValidator.validate(build_tiny_var().train(), strict=True) == []


@pytest.mark.parametrize("shared_aln", [False, True])
def test_per_sample_gradients_equal_one_example_loop(shared_aln):
    var = build_tiny_var(seed=1, shared_aln=shared_aln).train().requires_grad_(True)
    with torch.no_grad():  # move every parameter off its initial value, so no gradient is trivially zero
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    reference = copy.deepcopy(var)
    labels, x, target = _batch(var)
    gsm = GradSampleModule(var, loss_reduction="sum")
    _loss(gsm(labels, x), target).backward()
    names = [n for n, _ in reference.named_parameters()]
    assert len(names) == len(list(var.parameters()))
    for i in range(labels.shape[0]):
        reference.zero_grad()
        _loss(reference(labels[i:i + 1], x[i:i + 1]), target[i:i + 1]).backward()
        for name, p_ref, p in zip(names, reference.parameters(), var.parameters()):
            assert p.grad_sample is not None, name
            torch.testing.assert_close(p.grad_sample[i], p_ref.grad, atol=1e-6, rtol=1e-4, msg=name)
