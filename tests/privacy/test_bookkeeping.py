"""One-backward ghost clipping (book-keeping): exact per-example norms and clipped sums, both record
forms of a Linear, tied layers, and that it really runs one backward and no weight gradient."""
from __future__ import annotations

import pytest
import torch
from dp_tiny import CLASSES, VOCAB, TinyNet, brute_force_grads, clip, make_views, row_loss, trainable
from torch import nn

from arbooth.privacy.bookkeeping import (
    BookKeepingGradSampleModule,
    EmbeddingRows,
    LinearGram,
    PerExample,
    keep_linear,
)

B, SEQ = 5, 3


def _batch(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok_BT = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    y_BT = torch.randint(0, CLASSES, (B, SEQ), generator=g)
    return make_views(tok_BT, k, seed), y_BT.repeat_interleave(k, 0)


def test_record_forms_equal_the_per_example_gradient() -> None:
    """Each record's norm and weighted sum against its own explicit per-example gradient."""
    g = torch.Generator().manual_seed(0)
    a_BTI, g_BTO = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 5, generator=g)
    idx_BT = torch.randint(0, 4, (4, 6), generator=g)  # repeated indices: rows that add up
    coef_B = torch.rand(4, generator=g)
    gs_BOI = torch.einsum("bto,bti->boi", g_BTO, a_BTI)
    gs_BVD = torch.zeros(4, 4, 5)
    for b in range(4):
        for t in range(6):
            gs_BVD[b, idx_BT[b, t]] += g_BTO[b, t]
    for rec, ref in ((LinearGram(a_BTI, g_BTO), gs_BOI), (EmbeddingRows(idx_BT, g_BTO, 4), gs_BVD),
                     (PerExample(gs_BOI), gs_BOI)):
        torch.testing.assert_close(rec.per_example(), ref)
        torch.testing.assert_close(rec.norm_sq(), ref.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.clipped_sum(coef_B), torch.einsum("b,b...->...", coef_B, ref))


def test_linear_keeps_the_smaller_form() -> None:
    """Gram form when T'(I+O) < I*O (few positions, wide layer), else the per-example gradient."""
    wide, narrow = nn.Linear(64, 64), nn.Linear(4, 4)
    a, g = torch.randn(6, 2, 64), torch.randn(6, 2, 64)
    assert isinstance(keep_linear(wide, a, g, views=3)[wide.weight], LinearGram)          # T' = 6
    assert isinstance(keep_linear(wide, a.repeat(1, 20, 1), g.repeat(1, 20, 1), views=3)[wide.weight],
                      PerExample)                                                         # T' = 120
    assert isinstance(keep_linear(narrow, a[..., :4], g[..., :4], views=3)[narrow.weight], PerExample)
    assert isinstance(keep_linear(wide, a, g, views=3)[wide.bias], PerExample)


@pytest.mark.parametrize("k", [1, 4])  # k=1: Gram form for fc1, index form for emb; k=4: per-example forms
def test_norms_and_clipped_sum_equal_brute_force(k: int) -> None:
    tok, y = _batch(k)
    ref = brute_force_grads(TinyNet(), tok, y, k)
    c = float(torch.stack([r.norm() for r in ref]).median())
    model = TinyNet()
    bk = BookKeepingGradSampleModule(model, views=k, max_grad_norm=c)
    bk.backward(row_loss(bk(tok), y).reshape(B, k).mean(1))
    torch.testing.assert_close(bk.per_example_norms, torch.stack([r.norm() for r in ref]), rtol=1e-5, atol=1e-6)
    got = torch.cat([p.grad.flatten() for p in trainable(model)])
    torch.testing.assert_close(got, torch.stack([clip(r, c) for r in ref]).sum(0), rtol=1e-4, atol=1e-6)


def test_one_backward_and_no_weight_gradient() -> None:
    """The logits' gradient is computed once, and autograd never computes a parameter's gradient
    (a hook on every trainable parameter would fire): the clipped sum replaces it."""
    model = TinyNet()
    bk = BookKeepingGradSampleModule(model, views=2, max_grad_norm=1.0)
    fired = []
    for p in trainable(model):
        p.register_hook(lambda g: fired.append(g.shape))
    tok, y = _batch(2)
    logits = bk(tok)
    calls = []
    logits.register_hook(lambda g: calls.append(1))
    bk.backward(row_loss(logits, y).reshape(B, 2).mean(1))
    assert calls == [1] and fired == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable(model))


class Tied(nn.Module):
    """One Linear applied twice (tied weights): its per-example gradient is the sum of both uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, CLASSES)

    def forward(self, tok_NT: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.tanh(self.fc(self.emb(tok_NT)))))


def test_tied_layer_is_exact() -> None:
    tok, y = _batch(2, seed=1)
    ref = brute_force_grads(Tied(), tok, y, 2)
    c = float(torch.stack([r.norm() for r in ref]).median())
    model = Tied()
    bk = BookKeepingGradSampleModule(model, views=2, max_grad_norm=c)
    bk.backward(row_loss(bk(tok), y).reshape(B, 2).mean(1))
    got = torch.cat([p.grad.flatten() for p in trainable(model)])
    torch.testing.assert_close(got, torch.stack([clip(r, c) for r in ref]).sum(0), rtol=1e-4, atol=1e-6)


def test_backward_without_forward_is_an_error() -> None:
    bk = BookKeepingGradSampleModule(TinyNet(), views=1)
    with pytest.raises(RuntimeError, match="forward"):
        bk.backward(torch.zeros(2, requires_grad=True))


@pytest.mark.parametrize("k", [1, 4])
def test_under_bf16_autocast_keeps_inputs_in_bf16(k: int) -> None:
    """Under autocast a Linear's input is kept in the autocast dtype (the dtype its records multiply in),
    not in the fp32 that reached the layer; the clipped sum still equals the brute-force one of the same
    autocast model, to bf16 precision."""
    tok, y = _batch(k, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = brute_force_grads(TinyNet(), tok, y, k)
    c = float(torch.stack([r.norm() for r in ref]).median())
    model = TinyNet()
    bk = BookKeepingGradSampleModule(model, views=k, max_grad_norm=c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = row_loss(bk(tok).float(), y).reshape(B, k).mean(1)
    bk.backward(loss)
    got = torch.cat([p.grad.flatten() for p in trainable(model)])
    want = torch.stack([clip(r, c) for r in ref]).sum(0)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    layer = next(m for m in model.modules() if type(m) is nn.Linear)
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bk._tap_output(layer, (x,), layer(x))
    acts = out.grad_fn.on_grad.args[1]  # what the tap keeps for this layer's records
    assert x.dtype == torch.float32 and acts[0].dtype == torch.bfloat16
