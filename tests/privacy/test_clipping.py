"""Per-example gradients, clipping, augmentation multiplicity and ghost clipping against brute force."""
from __future__ import annotations

import pytest
import torch
from dp_tiny import CLASSES, VOCAB, TinyNet, brute_force_grads, clip, make_views, row_loss, trainable
from torch.utils.data import TensorDataset

from arbooth.errors import ConfigError
from arbooth.privacy.engine import make_private

B, SEQ = 6, 3


def _batch(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok_BT = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    y_BT = torch.randint(0, CLASSES, (B, SEQ), generator=g)
    return make_views(tok_BT, k, seed), y_BT.repeat_interleave(k, 0)


def _private(model: torch.nn.Module, *, k: int, c: float, clipping: str = "explicit"):
    ds = TensorDataset(torch.zeros(B, SEQ, dtype=torch.long))
    opt = torch.optim.SGD(trainable(model), lr=0.0)
    return make_private(model, opt, ds, target_epsilon=float("inf"), delta=1e-5, sample_rate=1.0, steps=1,
                        max_grad_norm=c, views=k, clipping=clipping, noise_multiplier=0.0)


def _clipped_sum(pt, tok_NT, y_NT) -> torch.Tensor:
    """The DP optimizer's gradient with zero noise, times the expected batch: the clipped sum."""
    pt.optimizer.zero_grad()
    pt.backward(row_loss(pt.module(tok_NT), y_NT))
    pt.optimizer.step()
    return torch.cat([p.grad.flatten() for p in pt.optimizer.params]) * pt.optimizer.expected_batch_size


@pytest.mark.parametrize("k", [1, 4])
def test_per_example_gradients_equal_brute_force(k: int) -> None:
    """p.grad_sample is the gradient of the mean over an example's k views, for every layer type
    (folded: Embedding, Linear, LayerNorm; summed: the custom PosBias sampler)."""
    tok, y = _batch(k)
    ref = torch.stack(brute_force_grads(TinyNet(), tok, y, k))
    pt = _private(TinyNet(), k=k, c=1.0)
    pt.backward(row_loss(pt.module(tok), y))
    got = torch.cat([p.grad_sample.reshape(B, -1) for p in pt.optimizer.params], 1)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_each_clipped_gradient_has_norm_at_most_c_and_same_direction(k: int) -> None:
    tok, y = _batch(k, seed=1)
    ref = brute_force_grads(TinyNet(), tok, y, k)
    c = float(torch.stack([g.norm() for g in ref]).median())  # half the examples get clipped
    pt = _private(TinyNet(), k=k, c=c)
    clipped_any = False
    for i, g in enumerate(ref):
        sl = slice(i * k, (i + 1) * k)
        got = _clipped_sum(pt, tok[sl], y[sl])
        assert got.norm() <= c * (1 + 1e-5)
        assert torch.nn.functional.cosine_similarity(got, g, dim=0) > 1 - 1e-5
        torch.testing.assert_close(got, clip(g, c), atol=1e-6, rtol=1e-4)
        clipped_any |= bool(g.norm() > c)
    assert clipped_any


@pytest.mark.parametrize("clipping", ["explicit", "ghost", "book_keeping"])
@pytest.mark.parametrize("k", [1, 3])
def test_augmentation_multiplicity_is_mean_over_views_then_clip(k: int, clipping: str) -> None:
    """Whole batch at once: sum_i clip(mean_v g_iv, C) -- the brute-force definition -- for the explicit
    per-sample path, Opacus' two-pass ghost clipping and one-backward book-keeping (norms of the mean over
    views, cross-view terms included)."""
    tok, y = _batch(k, seed=2)
    ref = brute_force_grads(TinyNet(), tok, y, k)
    c = float(torch.stack([g.norm() for g in ref]).median())
    expected = torch.stack([clip(g, c) for g in ref]).sum(0)
    # clipping each VIEW then averaging is a different (wrong) quantity: make sure the test can tell
    if k > 1:
        per_view = brute_force_grads(TinyNet(), tok, y, 1)
        wrong = torch.stack([torch.stack([clip(g, c) for g in per_view[i * k:(i + 1) * k]]).mean(0)
                             for i in range(B)]).sum(0)
        assert not torch.allclose(wrong, expected, atol=1e-4)
    got = _clipped_sum(_private(TinyNet(), k=k, c=c, clipping=clipping), tok, y)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("clipping", ["ghost", "book_keeping"])
def test_ghost_modes_equal_explicit_path(clipping: str) -> None:
    tok, y = _batch(4, seed=3)
    explicit = _clipped_sum(_private(TinyNet(), k=4, c=0.05), tok, y)
    ghost = _clipped_sum(_private(TinyNet(), k=4, c=0.05, clipping=clipping), tok, y)
    torch.testing.assert_close(ghost, explicit, atol=1e-6, rtol=1e-4)


def test_layer_without_grad_sampler_is_refused() -> None:
    class RawParam(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    for clipping in ("explicit", "book_keeping"):
        with pytest.raises(ConfigError, match="RawParam"):
            _private(torch.nn.Sequential(RawParam()), k=2, c=1.0, clipping=clipping)
