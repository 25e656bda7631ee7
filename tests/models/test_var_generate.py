"""VAR sampling and training-time behaviour on a tiny random model: seeded reproducibility, KV cache,
precision, class dropout outside forward, gradient checkpointing, clear errors."""
from __future__ import annotations

import pytest
import torch

from arbooth.errors import ConfigError
from arbooth.models.var_training import drop_labels
from arbooth.toy.tiny import build_tiny_var


@pytest.fixture(scope="module")
def var():
    return build_tiny_var(seed=0)


def test_same_seed_same_images_and_seeds_differ(var):
    labels = torch.tensor([3, 3, 5])
    kw = {"cfg": 1.5, "top_k": 20, "top_p": 0.9}
    images = var.generate(labels[:1], seed=7, **kw)
    assert images.shape == (1, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    a = var.generate(labels, seed=7, decode=False, **kw)
    assert torch.equal(a, var.generate(labels, seed=7, decode=False, **kw))
    assert not torch.equal(a, var.generate(labels, seed=8, decode=False, **kw))
    assert not torch.equal(a[0], a[1])  # same class, different draws within a batch
    g = torch.Generator().manual_seed(7)
    assert torch.equal(var.generate(labels, seed=g, decode=False, **kw), a)


@pytest.mark.parametrize("batch", [1, 5])
def test_kv_cache_equals_no_cache_reference(var, batch):
    labels = torch.arange(batch) % var.num_classes
    cached = var.generate(labels, cfg=2.0, top_k=1, decode=False)
    reference = var.generate(labels, cfg=2.0, top_k=1, decode=False, use_kv_cache=False)
    assert cached.shape == (batch, var.Cvae, 4, 4)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)


def test_sampled_generation_uses_the_cache_and_reference_alike(var):
    # with identical random draws, the two paths agree on sampled (not only greedy) tokens
    labels = torch.tensor([1, 2])
    kw = {"cfg": 1.5, "top_k": 30, "top_p": 0.95, "seed": 3, "decode": False}
    torch.testing.assert_close(var.generate(labels, **kw), var.generate(labels, use_kv_cache=False, **kw),
                               atol=1e-5, rtol=0)


def test_more_smooth_is_seeded(var):
    labels = torch.tensor([4])
    a = var.generate(labels, more_smooth=True, seed=1, decode=False)
    assert torch.equal(a, var.generate(labels, more_smooth=True, seed=1, decode=False))
    assert not torch.equal(a, var.generate(labels, more_smooth=False, seed=1, decode=False))


def test_bf16_autocast_on_cpu(var):
    labels = torch.tensor([0, 9])
    f_hat = var.generate(labels, top_k=5, dtype="bf16", decode=False)
    assert f_hat.dtype == torch.float32 and torch.isfinite(f_hat).all()
    x = torch.randn(2, var.L - var.first_l, var.Cvae)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = var(labels, x)
    assert logits.dtype == torch.float32  # head in full precision
    with torch.no_grad():
        torch.testing.assert_close(logits, var(labels, x), atol=0.1, rtol=0.05)


def test_unconditional_label_and_bad_labels(var):
    assert var.generate([var.num_classes], top_k=1, decode=False).shape == (1, var.Cvae, 4, 4)
    with pytest.raises(ConfigError, match=r"class labels must lie in \[0, 10\]"):
        var.generate([11])
    with pytest.raises(ConfigError):
        var.generate([-1])


def test_wrong_teacher_forcing_shape(var):
    with pytest.raises(ValueError, match=r"expected teacher-forcing input of shape \(2, 29, 8\)"):
        var(torch.tensor([0, 1]), torch.zeros(2, 30, 8))


def test_forward_is_deterministic_and_class_dropout_is_explicit():
    var = build_tiny_var(seed=2).train()
    labels = torch.arange(64) % 10
    x = torch.randn(64, var.L - var.first_l, var.Cvae)
    torch.testing.assert_close(var(labels, x), var(labels, x), atol=0, rtol=0)
    dropped = drop_labels(labels, var.num_classes, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, drop_labels(labels, var.num_classes, 0.5, torch.Generator().manual_seed(0)))
    assert 10 < (dropped == var.num_classes).sum() < 54 and torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert torch.equal(drop_labels(labels, var.num_classes, 0.0, torch.Generator()), labels)


def test_gradient_checkpointing_gives_the_same_gradients():
    var = build_tiny_var(seed=4).train()
    labels, x = torch.tensor([1, 2]), torch.randn(2, var.L - var.first_l, var.Cvae)
    var(labels, x).square().mean().backward()
    plain = [p.grad.clone() for p in var.parameters()]
    var.zero_grad()
    var.gradient_checkpointing = True
    var(labels, x).square().mean().backward()
    for g, p in zip(plain, var.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_init_weights_follows_the_official_scheme():
    var = build_tiny_var(seed=5)
    var.init_weights()
    ada = var.blocks[0].ada_lin[-1].weight
    assert ada[: 2 * var.C].abs().max() < 1e-3 < ada[2 * var.C:].abs().max()  # gates start near zero
    assert var.head.bias.abs().max() == 0


def test_random_batch_step_is_one_training_micro_step():
    """var_training.random_batch + forward_backward: the step `arbooth profile` counts and
    benchmarks/train_class.py times, equal to the recipe's forward + var_loss + backward."""
    from arbooth.models.var_training import forward_backward, random_batch, var_loss

    var = build_tiny_var(seed=6).train()
    torch.manual_seed(0)
    batch = random_batch(var, 3, "cpu")
    labels_B, x_BLCv, idx_BL = batch
    assert labels_B.shape == (3,) and x_BLCv.shape == (3, var.L - var.first_l, var.Cvae) and idx_BL.shape == (3, var.L)
    assert int(labels_B.max()) < var.num_classes and int(idx_BL.max()) < var.V
    loss = forward_backward(var, batch, precision="fp32", device="cpu")
    grads = [p.grad.clone() for p in var.parameters()]
    var.zero_grad()
    ref = var_loss(var(labels_B, x_BLCv), idx_BL)
    ref.backward()
    assert torch.equal(loss, ref)
    for g, p in zip(grads, var.parameters()):
        assert torch.equal(g, p.grad)
