"""Adaptation methods: the paper's trainable-parameter counts, exact trainable sets, loud bad targets."""
from __future__ import annotations

import pytest
import torch
from _class_tiny import TINY_MODEL  # tests/ is on sys.path (rootdir conftest)

from arbooth.adapt.methods import METHODS, count_parameters, prepare_for_method, resolve_targets
from arbooth.errors import ConfigError
from arbooth.models import VAR, VQVAE


def _meta_var(depth: int) -> VAR:
    with torch.device("meta"):
        return VAR(VQVAE(), num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth)


def _tiny_var(shared_aln: bool = False, seed: int = 0) -> VAR:
    torch.manual_seed(seed)
    m = TINY_MODEL
    vae = VQVAE(vocab_size=m["vocab_size"], z_channels=m["z_channels"], ch=m["vae_ch"],
                patch_nums=tuple(m["patch_nums"]), ch_mult=tuple(m["vae_ch_mult"]))
    return VAR(vae, num_classes=m["num_classes"], depth=m["depth"], embed_dim=m["embed_dim"],
               num_heads=m["num_heads"], shared_aln=shared_aln, patch_nums=tuple(m["patch_nums"]))


# The numbers (paper: 6.02M / 9.42M for LoRA-AM+LN, 100.7M / 196.7M for LNTuning).
@pytest.mark.parametrize(("depth", "method", "trainable"), [
    (16, "lora", 6_029_312), (20, "lora", 9_420_800),
    (16, "lora_attn", 1_572_864), (16, "lora_mlp", 2_621_440),
    (16, "lntuning", 100_761_600), (20, "lntuning", 196_761_600),
    (16, "fft", 310_283_520),
])
def test_paper_trainable_counts_on_meta(depth, method, trainable):
    count = count_parameters(prepare_for_method(_meta_var(depth), method))
    assert count.trainable == trainable
    assert f"{trainable / 1e6:.2f}M" in str(count) and 0 < count.percent <= 100


@pytest.mark.parametrize("method", METHODS)
def test_exactly_the_method_parameters_require_grad(method):
    model = prepare_for_method(_tiny_var(), method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if method == "fft":
        assert not frozen and len(names) == len(list(_tiny_var().parameters()))
        return
    attn, mlp = ("attn.mat_qkv", "attn.proj"), ("ffn.fc1", "ffn.fc2")
    targets = {"lora": attn + mlp + ("ada_lin.1",), "lora_attn": attn, "lora_mlp": mlp,
               "lntuning": ("ada_lin.1",)}[method]
    marker = "ln_tuning_layers" if method == "lntuning" else "lora_"
    names = [n.removeprefix("base_model.model.") for n in names]
    assert names and all(marker in n and n.startswith("blocks.") for n in names)
    adapted = {n.split(f".{marker}")[0] for n in names}  # module names, e.g. blocks.0.attn.proj
    expected = {f"blocks.{b}.{t}" for b in range(TINY_MODEL["depth"]) for t in targets}
    assert adapted == expected
    assert not any("head_nm" in n for n in names)
    assert all(marker not in n for n in frozen)


def test_unknown_method_and_unmatched_target_are_errors():
    with pytest.raises(ConfigError, match="unknown adaptation method"):
        prepare_for_method(_tiny_var(), "prefix_tuning")
    # shared_aln models have no per-block ada_lin: the AdaLN target matches nothing
    with pytest.raises(ConfigError, match="ada_lin.*matches no linear layer"):
        prepare_for_method(_tiny_var(shared_aln=True), "lora")
    with pytest.raises(ConfigError, match="matches no linear layer"):
        prepare_for_method(_tiny_var(shared_aln=True), "lntuning")
    with pytest.raises(ConfigError):
        resolve_targets(_tiny_var(), [r"blocks\.\d+\.attn\.nope"])
    # attention-only LoRA still works on a shared_aln model
    assert count_parameters(prepare_for_method(_tiny_var(shared_aln=True), "lora_attn")).trainable > 0


def test_lora_starts_as_identity_and_gets_gradients():
    var = _tiny_var()
    labels = torch.tensor([1, 2])
    x = torch.randn(2, var.L - var.first_l, var.Cvae)
    ref = var(labels, x)
    model = prepare_for_method(var, "lora")
    out = model(labels, x)
    assert torch.allclose(out, ref, atol=1e-6)  # LoRA B starts at zero
    out.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "mat_qkv.lora_B" in n)


def test_alpha_rule_has_one_owner_for_both_lora_configs():
    """alpha = 2 x rank unless set: adapt.methods.resolve_lora_alpha, read by the class MethodConfig and the
    subject TuningConfig alike."""
    from arbooth.adapt.methods import MethodConfig, resolve_lora_alpha
    from arbooth.recipes.subject_config import TuningConfig

    for rank in (1, 4, 16):
        assert MethodConfig(name="lora", lora_rank=rank).alpha == TuningConfig(lora_rank=rank).alpha == 2 * rank
    assert MethodConfig(name="lora", lora_rank=4, lora_alpha=3).alpha == TuningConfig(lora_rank=4, lora_alpha=3).alpha == 3
    assert resolve_lora_alpha(8) == 16 and resolve_lora_alpha(8, 5.0) == 5.0
