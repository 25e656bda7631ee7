"""Every trainable tensor of Infinity sits in a leaf module Opacus has a per-sample gradient for
(issue 12): Opacus' GradSampleModule on a tiny Infinity, every parameter trainable, gives each
example's gradient exactly as a one-example-at-a-time loop does, for the raw tensors of the release
(`cfg_uncond`, `pos_start`, the pool query, `scale_mul_1H11`, `ada_gss`, the text RMSNorm) too."""
from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator

from arbooth.adapt.arbooth_losses import bitwise_ce_per_token
from arbooth.models import BSQVAE, Infinity

B, D = 3, 8
SCHEDULE = [(1, 1, 1), (1, 2, 2)]


def _model() -> Infinity:
    torch.manual_seed(0)
    vae = BSQVAE(codebook_dim=D, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 1, 1, 1)).eval()
    model = Infinity(vae, depth=2, embed_dim=64, num_heads=4, text_channels=128, text_maxlen=8, block_chunks=2,
                     drop_path_rate=0.0).train()
    with torch.no_grad():  # move every tensor off its init (the RMSNorm gain starts at exactly one)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(B, 5, 128, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    L = sum(h * w for _, h, w in SCHEDULE)
    x = torch.randn(B, L - 1, D, generator=g)
    bits = torch.randint(0, 2, (B, L, D), generator=g)
    drop = torch.tensor([False, True, False])  # one row uses cfg_uncond, so it gets a gradient
    return text, mask, x, bits, drop


def _loss(model, text, mask, x, bits, drop) -> torch.Tensor:
    return bitwise_ce_per_token(model(text, mask, x, SCHEDULE, cond_drop_B=drop), bits).mean(1).sum()


def test_every_parameter_is_in_a_supported_leaf_module() -> None:
    model = _model()
    assert ModuleValidator.validate(model, strict=False) == []
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    hooked = {n for n, m in model.named_modules() if type(m) in GradSampleModule.GRAD_SAMPLERS}
    assert owners <= hooked, f"parameters on modules without a registered grad sampler: {sorted(owners - hooked)}"
    composite = [n for n in owners if any(True for _ in dict(model.named_modules())[n].children())]
    assert composite == [], f"raw parameters on composite modules: {composite}"


def test_per_sample_gradients_equal_a_per_example_loop() -> None:
    text, mask, x, bits, drop = _inputs()
    ref_model = _model()
    ref = []
    for i in range(B):
        sl = slice(i, i + 1)
        grads = torch.autograd.grad(_loss(ref_model, text[sl], mask[sl], x[sl], bits[sl], drop[sl]),
                                    list(ref_model.parameters()), allow_unused=True)
        ref.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, ref_model.parameters())])
    model = _model()
    gsm = GradSampleModule(model, loss_reduction="sum")  # the loss sums the examples' losses
    _loss(gsm, text, mask, x, bits, drop).backward()
    for k, (name, p) in enumerate(model.named_parameters()):
        assert p.grad_sample is not None, f"{name}: no per-sample gradient"
        expected = torch.stack([r[k] for r in ref])
        torch.testing.assert_close(p.grad_sample, expected, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    raw = ("uncond.cfg_uncond", "start.pos_start", "text_proj_for_sos.query.mat_q",
           "blocks.0.sa.head_scale.scale_mul_1H11", "blocks.1.ada_gss.gss", "text_norm.weight")
    params = dict(model.named_parameters())
    for name in raw:  # the release's raw tensors really get per-example gradients
        assert params[name].grad_sample.flatten(1).norm(dim=1).gt(0).any(), name
    assert params["uncond.cfg_uncond"].grad_sample[[0, 2]].abs().max() == 0  # rows that kept their prompt
