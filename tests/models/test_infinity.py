"""Infinity transformer against the official golden (tests/golden/infinity_tiny*.safetensors),
the 2B manifest, and its own invariants (cached == no-cache sampling, batching, switches)."""
from __future__ import annotations

import json

import pytest
import torch
from _golden import arbooth_golden, golden_arbooth, golden_infinity, infinity_golden, split_bits, unpack_text
from golden.seeded import GOLDEN_DIR, assert_probe_close

from arbooth.errors import ConfigError
from arbooth.models import BSQVAE, Infinity, infinity_scale_schedule
from arbooth.models.infinity_loading import official_state_dict


@pytest.fixture(scope="module")
def golden():
    return infinity_golden()


@pytest.fixture(scope="module")
def models(golden):
    return golden_infinity(golden[0])


def tiny(lvl_every_chunk=False, d=8, text_channels=128, seed=0):
    torch.manual_seed(seed)
    vae = BSQVAE(codebook_dim=d, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 1, 1, 1)).eval()
    model = Infinity(vae, depth=2, embed_dim=64, num_heads=4, text_channels=text_channels, text_maxlen=8,
                     block_chunks=2, lvl_embed_every_chunk=lvl_every_chunk).eval()
    return vae, model


def test_scale_schedule_table():
    s = infinity_scale_schedule(1.0, "0.06M")
    assert s == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8), (1, 12, 12), (1, 16, 16)]
    assert [len(infinity_scale_schedule(1.0, pn)) for pn in ("0.06M", "0.25M", "0.60M", "1M")] == [7, 10, 12, 13]
    assert infinity_scale_schedule(1.0)[-1] == (1, 64, 64)
    assert infinity_scale_schedule(2.9, "1M")[-1] == (1, 111, 37)  # nearest template 3:1
    assert infinity_scale_schedule(0.34, "1M")[-1] == (1, 37, 111)  # and its transpose
    assert infinity_scale_schedule(0.8, "0.25M")[-1] == (1, 28, 35)  # 4:5, transposed 5:4 table
    with pytest.raises(ConfigError):
        infinity_scale_schedule(1.0, "2M")


@torch.no_grad()
def test_teacher_forced_logits_match_golden(golden, models):
    config, ref = golden
    _, model = models
    schedule = [tuple(s) for s in config["scale_schedule"]]
    tc = model.encode_text(ref["text"], ref["text_mask"])
    torch.testing.assert_close(tc.cond_BD, ref["train.cond_BD"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tc.gss_B16C, ref["train.cond_BD_or_gss"], atol=1e-5, rtol=0)
    logits = model(ref["text"], ref["text_mask"], ref["train.x_BLC_wo_prefix"], schedule)
    assert (logits - ref["train.logits"]).abs().max().item() <= 1e-5
    # bitwise cross-entropy, averaged over the bits of a token (official bitloss_type='mean')
    B, L, _ = logits.shape
    gt = torch.cat([b.reshape(B, -1, config["codebook_dim"]) for b in
                    split_bits(ref["train.gt_bits_int"], schedule, config["codebook_dim"])], 1).long()
    loss = torch.nn.functional.cross_entropy(logits.view(B, L, -1, 2).permute(0, 3, 1, 2), gt, reduction="none")
    torch.testing.assert_close(loss.mean(-1), ref["train.loss_per_token"], atol=1e-5, rtol=0)


def _check_generation(model, config, ref, prefix, schedule, **kw):
    gen = config["generation"]
    out = model.generate(ref["text"], ref["text_mask"], schedule, cfg=gen["cfg_list"], tau=gen["tau_list"],
                         return_logits=True, **kw)
    ref_bits = split_bits(ref[f"{prefix}.bits_int"], schedule, config["codebook_dim"])
    for si, (bits, rb) in enumerate(zip(out.bits, ref_bits, strict=True)):
        assert torch.equal(bits, rb.to(bits.dtype)), f"scale {si}: bits differ"
    # the generator keeps every `logits_stride`-th token of each scale (both CFG halves): the bits above
    # already witness every token
    stride = config["logits_stride"]
    ours = torch.cat([lg[:, ::stride] for lg in out.logits], 1)
    assert ours.shape == ref[f"{prefix}.logits_strided"].shape
    assert (ours - ref[f"{prefix}.logits_strided"]).abs().max().item() <= 1e-5
    return out


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_generation_matches_golden(golden, models, mode):
    config, ref = golden
    _, model = models
    schedule = [tuple(s) for s in config["scale_schedule"]]
    g = config["generation"][mode]
    out = _check_generation(model, config, ref, f"generate.{mode}", schedule, top_k=g["top_k"], top_p=g["top_p"],
                            seed=g["g_seed"])
    assert (out.summed_codes - ref[f"generate.{mode}.summed_codes"]).abs().max().item() <= 1e-5
    assert_probe_close(out.images * 2 - 1, ref, f"generate.{mode}.image", 1e-4)


def test_generation_on_a_second_aspect_ratio_matches_golden(golden, models):
    """1:2 template (last map 11 x 22): the 2D RoPE grid, KV cache and upsampling on a non-square schedule."""
    config, ref = golden
    _, model = models
    wide = [tuple(s) for s in config["wide_scale_schedule"]]
    assert wide == infinity_scale_schedule(0.5, "0.06M")
    g = config["generation"]["greedy"]
    _check_generation(model, config, ref, "wide", wide, top_k=g["top_k"], top_p=g["top_p"], seed=g["g_seed"])


def test_official_layout_round_trip(golden, models):
    _, model = models
    sd = official_state_dict(model)
    _vae, again = golden_infinity(golden[0])
    again.load_state_dict(sd, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    _vae, fresh = tiny(d=8, text_channels=256)  # other bit depth
    with pytest.raises(RuntimeError, match="size mismatch"):  # strict: a different architecture is an error
        fresh.load_state_dict(sd)


def test_2b_meta_matches_manifest():
    manifest = json.loads((GOLDEN_DIR / "manifests" / "infinity_2b.manifest.json").read_text())
    with torch.device("meta"):
        vae = BSQVAE(codebook_dim=32, base_ch=128, num_res_blocks=2, ch_mult=(1, 2, 4, 4, 4))
        model = Infinity(vae, depth=32, embed_dim=2048, num_heads=16, mlp_ratio=4.0,
                         text_channels=2048, text_maxlen=512, block_chunks=8)
    got = {k: list(v.shape) for k, v in official_state_dict(model).items()}
    assert got == {e["key"]: e["shape"] for e in manifest["entries"]}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"] == 2_204_564_032
    assert "vae" not in dict(model.named_children())  # the tokenizer is not part of the transformer
    assert isinstance(model.blocks[0].sa.q, torch.nn.Linear)  # peft/Opacus can target q/k/v


@pytest.mark.parametrize("lvl_every_chunk,mode", [(False, "trilinear"), (True, "area")])
def test_cached_equals_no_cache_on_a_wide_schedule(lvl_every_chunk, mode):
    _, model = tiny(lvl_every_chunk)
    schedule = infinity_scale_schedule(0.5, "0.06M")  # 1:2, 7 scales, L = 451
    text, mask = torch.randn(2, 5, 128), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    kw = {"cfg": [1.0, 3.0, 3, 3, 3, 3, 3], "tau": 0.7, "top_k": 1, "top_p": 0.0, "next_scale_mode": mode, "return_logits": True}
    a = model.generate(text, mask, schedule, use_cache=True, **kw)
    b = model.generate(text, mask, schedule, use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) < 1e-4
    assert a.images.shape == (2, 3, 11 * 16, 22 * 16) and 0 <= a.images.min() and a.images.max() <= 1


def test_batch_items_are_independent():
    """Padding masks: a prompt's result does not depend on its batch neighbours (greedy)."""
    _, model = tiny()
    schedule = infinity_scale_schedule(1.0, "0.06M")[:5]
    text, mask = torch.randn(2, 6, 128), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    both = model.generate(text, mask, schedule, top_k=1, top_p=0.0, return_logits=True)
    alone = model.generate(text[:1, :3], mask[:1, :3], schedule, top_k=1, top_p=0.0, return_logits=True)
    assert all(torch.equal(x[:1], y) for x, y in zip(both.bits, alone.bits))
    torch.testing.assert_close(both.images[:1], alone.images, atol=1e-5, rtol=0)


def test_switches_and_teacher_forcing_consistency():
    vae, model = tiny()
    schedule = infinity_scale_schedule(1.0, "0.06M")[:4]
    text, mask = torch.randn(1, 3, 128), torch.ones(1, 3, dtype=torch.bool)
    out = model.generate(text, mask, schedule, cfg=1.0, top_k=1, top_p=0.0, return_logits=True)
    with torch.no_grad():  # teacher forcing on the sampled bits reproduces the sampler's logits
        logits = model(text, mask, vae.bits_to_var_input(out.bits, schedule), schedule)
    torch.testing.assert_close(logits, torch.cat(out.logits, 1), atol=1e-5, rtol=0)
    x = vae.bits_to_var_input(out.bits, schedule)
    _, model_fork = tiny(lvl_every_chunk=True)
    with torch.no_grad():
        assert not torch.allclose(model_fork(text, mask, x, schedule), logits)


def test_train_mode_condition_drop_and_checkpointing():
    _, model = tiny()
    model.train()
    for b in model.blocks:
        b.drop_path = 0.0
    schedule = infinity_scale_schedule(1.0, "0.06M")[:3]
    text, mask = torch.randn(2, 4, 128), torch.ones(2, 4, dtype=torch.bool)
    x = torch.randn(2, sum(h * w for _, h, w in schedule) - 1, 8)
    dropped = model(text, mask, x, schedule, cond_drop_B=torch.tensor([True, False]))
    uncond_text = text.clone()
    uncond_text[0] = model.uncond.cfg_uncond[:4].detach()
    kept = model(uncond_text, mask, x, schedule, cond_drop_B=torch.tensor([False, False]))
    torch.testing.assert_close(dropped, kept)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(text, mask, x, schedule, cond_drop_B=torch.zeros(2, dtype=torch.bool)).square().mean().backward()
        grads.append(model.blocks[1].ffn.fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs():
    _, model = tiny()
    schedule = infinity_scale_schedule(1.0, "0.06M")[:3]
    text, mask = torch.randn(1, 3, 128), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="x_BLC"):
        model(text, mask, torch.zeros(1, 4, 8), schedule)
    with pytest.raises(ConfigError, match="text"):
        model.generate(torch.randn(1, 3, 16), mask, schedule)
    with pytest.raises(ConfigError, match="cfg"):
        model.generate(text, mask, schedule, cfg=[3.0, 3.0])
    with pytest.raises(ConfigError):
        model.generate(text, torch.zeros(1, 3, dtype=torch.bool), schedule)


def test_arbooth_fork_switches_match_golden():
    """`lvl_embed_every_chunk` + `next_scale_mode='area'` reproduce the ARBooth fork (arbooth_tiny*.safetensors)."""
    config, g = arbooth_golden()
    _vae, model, token_PC = golden_arbooth(config)
    assert tuple(token_PC.shape) == (4, 2048)  # the fork's only extra entry (spliced by the caller)
    schedule = [tuple(s) for s in config["scale_schedule"]]
    text, mask = unpack_text(g["kv_compact"], config["text"]["lens_after_splice"])  # <S*> rows spliced in
    stride = config["strides"]
    with torch.no_grad():
        x = model.vae.bits_to_var_input(split_bits(g["train.gt_bits_int"], schedule, config["codebook_dim"]), schedule)
        assert (x[:, ::stride["x_BLC"]] - g["train.x_BLC_strided"]).abs().max().item() <= 1e-5
        logits = model(text, mask, x, schedule)
    assert (logits[:, ::stride["logits"]] - g["train.logits_strided"]).abs().max().item() <= 1e-5
    gen = config["generation"]
    out = model.generate(text, mask, schedule, cfg=gen["cfg_list"], tau=gen["tau_list"], top_k=1, top_p=0.0,
                         seed=gen["greedy"]["g_seed"], next_scale_mode="area")
    ref = split_bits(g["generate.greedy.bits_int"], schedule, config["codebook_dim"])
    for bits, rb in zip(out.bits, ref, strict=True):
        assert torch.equal(bits, rb.to(bits.dtype))


def test_kv_cache_is_kept_in_the_attention_dtype():
    """Under bf16 autocast the cached keys are bf16 like the values (RoPE computes in fp32, attention
    takes bf16): half the cache an fp32 copy would cost, same attention output."""
    from arbooth.models.infinity import SelfAttention, rope_cos_sin
    from arbooth.models.kv_cache import KVCache

    torch.manual_seed(0)
    sa = SelfAttention(64, 4).to(torch.bfloat16)
    schedule = [(1, 1, 1), (1, 2, 2)]
    cos, sin = rope_cos_sin(schedule, 16)
    x = torch.randn(2, 5, 64)
    cache = KVCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = sa(x[:, :1], cos[:1], sin[:1], cache=cache)
        second = sa(x[:, 1:], cos[1:], sin[1:], cache=cache)
        full = sa(x, cos, sin, mask_LL=torch.tensor([[1, 0, 0, 0, 0]] + [[1] * 5] * 4, dtype=torch.bool))
    assert [t.dtype for t in (cache.k_BHLc, cache.v_BHLc)] == [torch.bfloat16, torch.bfloat16]
    assert cache.k_BHLc.shape[2] == 5
    assert torch.allclose(torch.cat([first, second], 1).float(), full.float(), atol=1e-2)


def test_generate_without_decoding_gives_the_same_bits():
    """ARBooth's teacher needs only the bits: decode=False skips the VAE decoder and changes nothing else."""
    _, model = tiny()
    schedule = infinity_scale_schedule(1.0, "0.06M")[:5]
    text, mask = torch.randn(2, 4, 128), torch.ones(2, 4, dtype=torch.bool)
    a = model.generate(text, mask, schedule, cfg=1.0, seed=3)
    b = model.generate(text, mask, schedule, cfg=1.0, seed=3, decode=False)
    assert b.images is None and a.images is not None
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.summed_codes, b.summed_codes)


def test_weights_saved_with_the_raw_tensor_names_still_load() -> None:
    """State dicts written before the raw tensors moved into leaf modules (the shipped toy base, older
    runs) use the released names for them; they load strictly into today's layout, same values."""
    from arbooth.models.infinity_keys import to_official_name

    _, model = tiny(seed=1)
    ours = model.state_dict()
    old = {to_official_name(k): v for k, v in ours.items()}
    assert {"cfg_uncond", "pos_start", "text_proj_for_sos.query", "blocks.0.sa.scale_mul_1H11",
            "blocks.1.ada_gss"} <= set(old) and "uncond.cfg_uncond" not in old
    _, fresh = tiny(seed=2)
    fresh.load_state_dict(old, strict=True)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ours[k], rtol=0, atol=0)
