# ruff: noqa: C408, ISC004, S102  (keyword dicts mirror the official constructors; exec recompiles one official method, see SHIMS)
"""Regenerate the golden vectors in tests/golden from the OFFICIAL code (never imported by `arbooth`).

    python tests/golden/make_golden.py --var /path/to/FoundationVision/VAR \
        --infinity /path/to/FoundationVision/Infinity --arbooth /path/to/jiwoogit/ARBooth [--only var]
    python tests/golden/make_golden.py --infinity-8b /path/to/FoundationVision/Infinity   # 8B switches + manifests

Each path is a checkout (or an export with a `COMMIT` file holding the commit hash). The official
models are built on the CPU in float32 with one thread, their weights are rebuilt from a seed by
`seeded.seeded_state_dict` in the official key layout, and the files written keep only config, seed,
inputs and outputs (see tests/golden/README.md). The CPU shims needed to run the official code
(flash-attn absent, torch.compile'd norms) are applied here, to the official modules, and are listed in
each file's config under "shims"; none of them changes the math.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from seeded import (
    bits_to_int,
    fingerprint,
    image_from_small,
    probe_image,
    save_golden,
    seeded_state_dict,
)


def commit_of(checkout: Path) -> str:
    if (checkout / "COMMIT").is_file():
        return (checkout / "COMMIT").read_text().strip()
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def versions() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version()}


def small_image(gen: torch.Generator, B: int, h: int, w: int) -> torch.Tensor:
    """A uint8 thumbnail: smooth colour ramps plus noise, so the encoders see structure."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 1 - xx * yy])[None].expand(B, -1, -1, -1)
    noise = torch.rand(B, 3, h, w, generator=gen)
    return ((0.6 * base + 0.4 * noise) * 255).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- VAR
VAR_CONFIGS = {
    "var_tiny": dict(depth=2, embed_dim=64, num_heads=2, vocab_size=64, z_channels=8, ch=32,
                     patch_nums=[1, 2, 3, 4], num_classes=10, shared_aln=False, seed=1701, labels=[3, 7]),
    "var_tiny_shared_aln": dict(depth=3, embed_dim=96, num_heads=3, vocab_size=96, z_channels=8, ch=32,
                                patch_nums=[1, 2, 4], num_classes=7, shared_aln=True, seed=1702, labels=[0, 6]),
}
VAR_COMMON = dict(attn_l2_norm=True, share_quant_resi=4, norm_eps=1e-6, mlp_ratio=4.0, cfg=1.5, top_k=1, g_seed=0)


def make_var(root: Path, out: Path) -> None:
    sys.path.insert(0, str(root))
    from models import VAR, VQVAE  # the official package

    commit = commit_of(root)
    for name, c in VAR_CONFIGS.items():
        c = {**c, **VAR_COMMON}
        vae = VQVAE(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"], test_mode=True,
                    share_quant_resi=c["share_quant_resi"], v_patch_nums=tuple(c["patch_nums"]))
        var = VAR(vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["embed_dim"],
                  num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.0, norm_eps=c["norm_eps"], shared_aln=c["shared_aln"], cond_drop_rate=0.0,
                  attn_l2_norm=c["attn_l2_norm"], patch_nums=tuple(c["patch_nums"]),
                  flash_if_available=False, fused_if_available=False)
        vae_sd = seeded_state_dict(vae.state_dict(), c["seed"])
        var_sd = seeded_state_dict({k: v for k, v in var.state_dict().items() if not k.startswith("vae")},
                                   c["seed"] + 1)
        vae.load_state_dict(vae_sd, strict=True)
        missing, unexpected = var.load_state_dict(var_sd, strict=False)
        assert not unexpected and all(k.startswith(("vae_proxy", "vae_quant_proxy")) for k in missing), missing
        vae.eval(), var.eval()
        gen = torch.Generator().manual_seed(c["seed"])
        H = 16 * c["patch_nums"][-1]
        small = small_image(gen, 2, H // 4, H // 4)
        image = image_from_small(small, 4)
        labels = torch.tensor(c["labels"])
        with torch.no_grad():
            idx_Bl = vae.img_to_idxBl(image)
            var_input = vae.quantize.idxBl_to_var_input(idx_Bl)
            logits = var(labels, var_input)
            decoded = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)
            recon = vae.img_to_reconstructed_img(image, last_one=True)
            images = var.autoregressive_infer_cfg(B=2, label_B=labels, g_seed=c["g_seed"], cfg=c["cfg"],
                                                  top_k=c["top_k"], top_p=0.0)
        tensors = {"image_small_u8": small, "labels": labels, "idx": torch.cat(idx_Bl, 1),
                   "var_input": var_input, "logits": logits}
        for what, x in (("decoded", decoded), ("reconstructed", recon), ("greedy_cfg_images", images)):
            tensors.update({f"{what}.{k}": v for k, v in probe_image(x).items()})
        config = {"name": name, "model": c, "image_factor": 4, "vae_seed": c["seed"], "var_seed": c["seed"] + 1,
                  "vae_fingerprint": fingerprint(vae_sd), "var_fingerprint": fingerprint(var_sd),
                  "official": {"repo": "FoundationVision/VAR", "commit": commit}, "versions": versions(),
                  "stats": {"logits_std": logits.std().item(),
                            "unique_tokens_per_scale": [int(i.unique().numel()) for i in idx_Bl]},
                  "shims": ["none: flash_if_available=False, fused_if_available=False (pure-torch paths)"]}
        save_golden(out / f"{name}.safetensors", config, tensors)
        print(name, config["stats"])
    sys.path.remove(str(root))
    for mod in [m for m in sys.modules if m == "models" or m.startswith("models.") or m in ("dist", "utils")]:
        del sys.modules[mod]


# ------------------------------------------------------------------------------------------ Infinity
SHIMS = [
    "flash_attn absent: a stub module whose kernels raise if called; flash_attn.ops absent, so basic.py uses "
    "its pure-torch rms_norm and SelfAttention its scaled_dot_product_attention path (customized_flash_attn=False)",
    "basic.flash_attn_varlen_kvpacked_func (the only cross-attention kernel, used by text_proj_for_sos and every "
    "block's ca) -> per-sequence F.scaled_dot_product_attention over the cu_seqlens slices (same semantics)",
    "CrossAttention.forward recompiled from its own source with the float32 -> bfloat16 cast before that kernel "
    "disabled, so the goldens are pure float32",
    "fused_ada_layer_norm / fused_ada_rms_norm run undecorated (their torch.compile wrapper's original function)",
    "pytz / imageio / cv2 / wandb stubbed when absent (logging and image files only)",
    "tiny BSQ-VAE: official vae_model() with AutoEncoder args base_ch / num_res_blocks overridden",
]


def _varlen_sdpa(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                 **_):
    """flash_attn_varlen_kvpacked_func semantics: q (Nq, H, c), kv (Nk, 2, H, c), per-sequence attention."""
    out = []
    for b in range(len(cu_seqlens_q) - 1):
        qb = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].transpose(0, 1)
        kb, vb = kv[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].unbind(1)
        out.append(F.scaled_dot_product_attention(qb, kb.transpose(0, 1), vb.transpose(0, 1),
                                                  scale=softmax_scale).transpose(0, 1))
    return torch.cat(out, 0)


def import_infinity_package(root: Path, model_module: str) -> types.SimpleNamespace:
    """Import the `infinity` package under `root` (official or fork) with the CPU shims in SHIMS."""
    import inspect
    import textwrap

    for mod in [m for m in sys.modules if m == "infinity" or m.startswith("infinity.")]:
        del sys.modules[mod]
    def _raise(*a, **k):
        raise RuntimeError("flash-attn kernel called in the golden generator")
    stub = types.ModuleType("flash_attn")
    stub.flash_attn_func = stub.flash_attn_varlen_kvpacked_func = _raise
    sys.modules["flash_attn"] = stub
    for name in ("pytz", "imageio", "cv2", "wandb"):  # I/O and logging only, never on the math path
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(root))
    import importlib

    basic = importlib.import_module("infinity.models.basic")
    basic.flash_attn_varlen_kvpacked_func = _varlen_sdpa
    src = textwrap.dedent(inspect.getsource(basic.CrossAttention.forward))
    assert src.count("if q_compact.dtype == torch.float32:") == 1
    src = src.replace("if q_compact.dtype == torch.float32:", "if False:")
    scope: dict = {}
    exec(compile(src, inspect.getsourcefile(basic.CrossAttention), "exec"), basic.__dict__, scope)
    basic.CrossAttention.forward = scope["forward"]
    model = importlib.import_module(f"infinity.models.{model_module}")
    for name in ("fused_ada_layer_norm", "fused_ada_rms_norm"):
        fn = getattr(model, name, None)
        if fn is not None:
            setattr(model, name, getattr(fn, "_torchdynamo_orig_callable", fn))
    for mod in (basic, model):
        for name in ("fused_ada_layer_norm", "fused_ada_rms_norm", "fused_rms_norm"):
            fn = getattr(mod, name, None)
            if fn is not None:
                setattr(mod, name, getattr(fn, "_torchdynamo_orig_callable", fn))
    vae_mod = importlib.import_module("infinity.models.bsq_vae.vae")
    bsc = importlib.import_module("infinity.models.bitwise_self_correction")
    sys.path.remove(str(root))
    return types.SimpleNamespace(basic=basic, model=model, vae=vae_mod, bsc=bsc)


def build_bsq_vae(pkg, codebook_dim: int, ch_mult: list[int], base_ch: int, num_res_blocks: int,
                  patch_size: int = 16):
    real = pkg.vae.AutoEncoder

    def tiny_autoencoder(args):
        args.base_ch, args.num_res_blocks = base_ch, num_res_blocks
        return real(args)

    pkg.vae.AutoEncoder = tiny_autoencoder
    try:
        vae = pkg.vae.vae_model(None, "dynamic", codebook_dim, 2 ** codebook_dim, patch_size=patch_size,
                                encoder_ch_mult=ch_mult, decoder_ch_mult=ch_mult, test_mode=True)
    finally:
        pkg.vae.AutoEncoder = real
    return vae


INFINITY_VAE = dict(codebook_dim=16, ch_mult=[1, 1, 2, 2, 2], base_ch=32, num_res_blocks=1)
INFINITY_KW = dict(text_channels=256, text_maxlen=16, shared_aln=True, raw_scale_schedule=None,
                   checkpointing="full-block", customized_flash_attn=False, fused_norm=True, pad_to_multiplier=128,
                   use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
                   rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="0.06M", apply_spatial_patchify=0,
                   inference_mode=True, train_h_div_w_list=[1.0], depth=2, embed_dim=64, num_heads=4,
                   drop_path_rate=0.1, mlp_ratio=4, block_chunks=2, cond_drop_rate=0.0)


def text_features(gen: torch.Generator, lens: list[int], channels: int) -> torch.Tensor:
    """Packed text features (sum(lens), C), std 0.4, rounded to float16 so they are stored exactly."""
    return (torch.randn(sum(lens), channels, generator=gen) * 0.4).half()


def packed(kv: torch.Tensor, lens: list[int]) -> tuple:
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return kv, list(lens), cu, max(lens)


def bsc_args(apply_spatial_patchify: int = 0):
    return argparse.Namespace(noise_apply_layers=-1, noise_apply_requant=1, noise_apply_strength=0.0,
                              apply_spatial_patchify=apply_spatial_patchify, debug_bsc=0)


def bitwise_ce(logits_BLV: torch.Tensor, gt_BLd: torch.Tensor) -> torch.Tensor:
    """Official trainer (bitloss_type='mean'): 2-way CE per bit, averaged over the bits -> (B, L)."""
    B, L, _ = logits_BLV.shape
    return F.cross_entropy(logits_BLV.reshape(B, L, -1, 2).permute(0, 3, 1, 2), gt_BLd.long(),
                           reduction="none").mean(-1)


class Recorder:
    """Records every call of `obj.name` (an instance attribute shadows the method): args and output."""

    def __init__(self, obj, name):
        self.obj, self.name, self.real, self.calls = obj, name, getattr(obj, name), []
        setattr(obj, name, self)

    def __call__(self, *a, **k):
        out = self.real(*a, **k)
        self.calls.append((a, k, out))
        return out

    def close(self):
        delattr(self.obj, self.name)


def record_generations(t: dict, stats: dict, model, vae, kv_tuple, schedule, gen_cfg: dict, modes: dict, *,
                       bits: str, unique: str) -> None:
    """Run the official generation once per mode (greedy / sampled) and store its bits (under `bits`),
    strided logits, summed codes and image probe in `t`, the distinct codes per scale in `stats`."""
    for mode, kw in modes.items():
        out_bits, seen, summed, image_out = official_generate(model, vae, kv_tuple, schedule, gen_cfg, **kw)
        t[f"generate.{mode}.{bits}"] = bits_to_int(torch.cat(out_bits, 1)).to(torch.int32)
        t[f"generate.{mode}.logits_strided"] = torch.cat([lg[:, ::3] for lg in seen], 1)
        t[f"generate.{mode}.summed_codes"] = summed
        t.update({f"generate.{mode}.image.{k}": v for k, v in probe_image(image_out).items()})
        stats[f"{mode}_{unique}"] = [int(bits_to_int(b).unique().numel()) for b in out_bits]


def official_generate(model, vae, kv_tuple, schedule, gen_cfg, top_k, top_p, g_seed):
    """Official autoregressive_infer_cfg (bit labels, CFG on logits). Returns the per-scale bits (B, h*w, d)
    list, the per-scale logits of both CFG halves, the summed codes and the decoded image in [-1, 1]."""
    logits, codes, decode = (Recorder(model, "get_logits"), Recorder(vae.quantizer.lfq, "indices_to_codes"),
                             Recorder(vae, "decode"))
    try:
        with torch.no_grad():
            model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=schedule, label_B_or_BLT=kv_tuple, B=len(kv_tuple[1]), g_seed=g_seed,
                cfg_list=gen_cfg["cfg_list"], tau_list=gen_cfg["tau_list"], cfg_sc=3, top_k=top_k, top_p=top_p,
                returns_vemb=1, ratio_Bl1=None, gumbel=0, norm_cfg=False, cfg_exp_k=0.0, cfg_insertion_layer=[0],
                vae_type=1, softmax_merge_topk=-1, ret_img=True, trunk_scale=1000, gt_leak=0, gt_ls_Bl=None,
                inference_mode=True, sampling_per_bits=1)
    finally:
        for r in (logits, codes, decode):
            r.close()
    bits = [a[0].reshape(a[0].shape[0], -1, a[0].shape[-1]) for a, _, _ in codes.calls]
    assert len(bits) == len(schedule) and len(decode.calls) == 1
    return bits, [out.detach().clone() for _, _, out in logits.calls], decode.calls[0][0][0], decode.calls[0][2]


def make_infinity(root: Path, out: Path) -> None:
    pkg = import_infinity_package(root, "infinity")
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w, h_div_w_templates  # noqa: F401

    commit, seed = commit_of(root), 20240601
    vae = build_bsq_vae(pkg, **INFINITY_VAE)
    model = pkg.model.Infinity(vae_local=vae, **INFINITY_KW)
    vae_sd = seeded_state_dict(vae.state_dict(), seed)
    inf_sd = seeded_state_dict(model.state_dict(), seed + 1)
    vae.load_state_dict(vae_sd, strict=True)
    model.load_state_dict(inf_sd, strict=True)
    vae.eval(), model.eval()
    gen = torch.Generator().manual_seed(seed)
    lens = [5, 11]
    kv16 = text_features(gen, lens, INFINITY_KW["text_channels"])
    kv_tuple = packed(kv16.float(), lens)
    schedule = [(1, h, w) for _, h, w in dynamic_resolution_h_w[1.0]["0.06M"]["scales"]]
    H = schedule[-1][1] * 16
    small = small_image(gen, 2, H // 8, H // 8)
    image = image_from_small(small, 8)
    d = INFINITY_VAE["codebook_dim"]
    t: dict = {"image_small_u8": small, "text_kv_f16": kv16}
    with torch.no_grad():
        h, z, _, all_bit_indices, _, var_input = vae.encode(image, scale_schedule=schedule)
        t["vae.raw_features"], t["vae.encode_z"] = h, z.squeeze(-3) if z.dim() == 5 else z
        t["vae.encode_bits_int"] = torch.cat([bits_to_int(b.reshape(2, -1, d)) for b in all_bit_indices], 1).to(torch.int32)
        t["vae.encode_var_inputs"] = torch.cat([v.reshape(2, d, -1) for v in var_input], 2)
        t.update({f"vae.recon.{k}": v for k, v in probe_image(vae.decode(t["vae.encode_z"])).items()})
        bsc = pkg.bsc.BitwiseSelfCorrection(vae, bsc_args())
        x_BLC, gt_ms = bsc.flip_requant(schedule, image, h, "cpu")
        gt_BL = torch.cat(gt_ms, 1)
        t["train.x_BLC_wo_prefix"], t["train.gt_bits_int"] = x_BLC, bits_to_int(gt_BL).to(torch.int32)
        logits = model((kv_tuple[0].clone(), *kv_tuple[1:]), x_BLC, scale_schedule=schedule)
        t["train.logits"], t["train.loss_per_token"] = logits, bitwise_ce(logits, gt_BL)
        kv_n = model.text_norm(kv_tuple[0])
        cond_BD = model.text_proj_for_sos((kv_n, kv_tuple[2], kv_tuple[3]))
        t["train.cond_BD"], t["train.cond_BD_or_gss"] = cond_BD, model.shared_ada_lin(cond_BD)
    gen_cfg = {"cfg_list": [2.0 + 0.25 * i for i in range(len(schedule))], "tau_list": [0.5] * len(schedule)}
    modes = {"greedy": dict(top_k=1, top_p=0.0, g_seed=40601), "sampled": dict(top_k=900, top_p=0.97, g_seed=40601)}
    stats = {"logits_std": logits.std().item(),
             "gt_unique_tokens_per_scale": [int(bits_to_int(b).unique().numel()) for b in gt_ms]}
    record_generations(t, stats, model, vae, kv_tuple, schedule, gen_cfg, modes, bits="bits_int",
                       unique="unique_tokens_per_scale")
    # a second aspect ratio (1:2 template): greedy generation, KV cache, 2D RoPE on a non-square grid
    wide = [(1, h, w) for _, h, w in dynamic_resolution_h_w[0.5]["0.06M"]["scales"]]
    bits, seen, _, _ = official_generate(model, vae, kv_tuple, wide, gen_cfg, **modes["greedy"])
    t["wide.bits_int"] = bits_to_int(torch.cat(bits, 1)).to(torch.int32)
    t["wide.logits_strided"] = torch.cat([lg[:, ::3] for lg in seen], 1)
    stats["wide_unique_tokens_per_scale"] = [int(bits_to_int(b).unique().numel()) for b in bits]
    config = {"name": "infinity_tiny", "seed": seed, "vae_seed": seed, "infinity_seed": seed + 1,
              "vae": INFINITY_VAE, "infinity": INFINITY_KW, "text_lens": lens, "image_factor": 8,
              "scale_schedule": schedule, "wide_scale_schedule": wide, "generation": {**gen_cfg, **modes},
              "logits_stride": 3, "codebook_dim": d,
              "vae_fingerprint": fingerprint(vae_sd), "infinity_fingerprint": fingerprint(inf_sd),
              "official": {"repo": "FoundationVision/Infinity", "commit": commit}, "versions": versions(),
              "stats": stats, "shims": SHIMS}
    gen_keys = [k for k in t if k.startswith(("generate.", "wide."))]  # two files, each well under 1 MB
    save_golden(out / "infinity_tiny.safetensors", config, {k: v for k, v in t.items() if k not in gen_keys})
    save_golden(out / "infinity_tiny_generate.safetensors", config, {k: t[k] for k in gen_keys})
    print("infinity_tiny", stats)


# ------------------------------------------------------------------------------- Infinity-8B switches
# Every switch of the 8B release (tools/run_infinity.py load_visual_tokenizer / load_transformer with the
# flags of tools/interactive_infer_8b.ipynb): vae_type 14-style tokenizer with apply_spatial_patchify=1
# (patch_size 8, one ch_mult level fewer), rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2,
# add_lvl_embeding_only_first_block=1, use_bit_label=1, several blocks per chunk; sampling_per_bits=1 in
# official_generate. Tiny sizes: 6 bits per latent position -> 24 bits per token.
INFINITY_8B_VAE = dict(codebook_dim=6, ch_mult=[1, 1, 2, 2], base_ch=32, num_res_blocks=1, patch_size=8)
INFINITY_8B_KW = {**INFINITY_KW, "apply_spatial_patchify": 1, "depth": 4, "block_chunks": 2}


def make_infinity_8b(root: Path, out: Path) -> None:
    pkg = import_infinity_package(root, "infinity")
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    commit, seed = commit_of(root), 20250214
    vae = build_bsq_vae(pkg, **INFINITY_8B_VAE)
    model = pkg.model.Infinity(vae_local=vae, **INFINITY_8B_KW)
    assert model.d_vae == 4 * INFINITY_8B_VAE["codebook_dim"]
    vae_sd = seeded_state_dict(vae.state_dict(), seed)
    inf_sd = seeded_state_dict(model.state_dict(), seed + 1)
    vae.load_state_dict(vae_sd, strict=True)
    model.load_state_dict(inf_sd, strict=True)
    vae.eval(), model.eval()
    gen = torch.Generator().manual_seed(seed)
    lens = [7, 4]
    kv16 = text_features(gen, lens, INFINITY_8B_KW["text_channels"])
    kv_tuple = packed(kv16.float(), lens)
    schedule = [(1, h, w) for _, h, w in dynamic_resolution_h_w[1.0]["0.06M"]["scales"]]
    vae_schedule = [(t, 2 * h, 2 * w) for t, h, w in schedule]  # autoregressive_infer_cfg's vae_scale_schedule
    H = schedule[-1][1] * 16
    small = small_image(gen, 2, H // 8, H // 8)
    image = image_from_small(small, 8)
    d = INFINITY_8B_VAE["codebook_dim"]
    t: dict = {"image_small_u8": small, "text_kv_f16": kv16}
    with torch.no_grad():
        h, z, _, all_bit_indices, _, _ = vae.encode(image, scale_schedule=vae_schedule)
        t["vae.raw_features"], t["vae.encode_z"] = h, z.squeeze(-3) if z.dim() == 5 else z
        # latent bits (B, 1, 2h, 2w, d) as the VAE gives them, one int per latent position
        t["vae.encode_bits_int"] = torch.cat([bits_to_int(b.reshape(2, -1, d)) for b in all_bit_indices], 1).to(torch.int32)
        t.update({f"vae.recon.{k}": v for k, v in probe_image(vae.decode(t["vae.encode_z"])).items()})
        bsc = pkg.bsc.BitwiseSelfCorrection(vae, bsc_args(apply_spatial_patchify=1))
        x_BLC, gt_ms = bsc.flip_requant(vae_schedule, image, h, "cpu")  # token layout: (B, h*w, 4d)
        gt_BL = torch.cat(gt_ms, 1)
        t["train.x_BLC_wo_prefix"], t["train.gt_bits_int"] = x_BLC, bits_to_int(gt_BL).to(torch.int32)
        logits = model((kv_tuple[0].clone(), *kv_tuple[1:]), x_BLC, scale_schedule=schedule)
        t["train.logits"], t["train.loss_per_token"] = logits, bitwise_ce(logits, gt_BL)
    gen_cfg = {"cfg_list": [3.0] * len(schedule), "tau_list": [0.5 + 0.1 * i for i in range(len(schedule))]}
    modes = {"greedy": dict(top_k=1, top_p=0.0, g_seed=11), "sampled": dict(top_k=900, top_p=0.97, g_seed=12)}
    stats = {"logits_std": logits.std().item(),
             "gt_unique_tokens_per_scale": [int(bits_to_int(b).unique().numel()) for b in gt_ms]}
    # `bits`: what indices_to_codes received, i.e. after the official pixel_shuffle: latent bits
    record_generations(t, stats, model, vae, kv_tuple, schedule, gen_cfg, modes, bits="latent_bits_int",
                       unique="unique_latent_codes_per_scale")
    config = {"name": "infinity_8b_tiny", "seed": seed, "vae_seed": seed, "infinity_seed": seed + 1,
              "vae": INFINITY_8B_VAE, "infinity": INFINITY_8B_KW, "text_lens": lens, "image_factor": 8,
              "scale_schedule": schedule, "vae_scale_schedule": vae_schedule, "generation": {**gen_cfg, **modes},
              "logits_stride": 3, "codebook_dim": d, "token_dim": 4 * d,
              "vae_fingerprint": fingerprint(vae_sd), "infinity_fingerprint": fingerprint(inf_sd),
              "official": {"repo": "FoundationVision/Infinity", "commit": commit}, "versions": versions(),
              "stats": stats, "shims": SHIMS}
    gen_keys = [k for k in t if k.startswith("generate.")]  # two files, each under 1 MB
    save_golden(out / "infinity_8b_tiny.safetensors", config, {k: v for k, v in t.items() if k not in gen_keys})
    save_golden(out / "infinity_8b_tiny_generate.safetensors", config, {k: t[k] for k in gen_keys})
    print("infinity_8b_tiny", stats)


def _manifest_entries(sd: dict, buffers: set[str]) -> list[dict]:
    return [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "buffer": k in buffers,
             "numel": v.numel()} for k, v in sd.items()]


class _ScalarsOnCPU(torch.overrides.TorchFunctionMode):
    """The official constructor reads Python numbers from tensors (`torch.linspace(...)[i].item()` for the
    drop-path rates, `torch.log(torch.tensor(100)).item()` in SelfAttention), which the meta device cannot
    answer: inside this mode (pushed after `torch.device("meta")`) those two factories run on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.linspace, torch.tensor):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def make_manifests_8b(root: Path, out: Path) -> None:
    """Key manifests of the released 8B files, from the official constructors on the meta device:
    `infinity_8b.manifest.json` (the sharded `infinity_8b_weights` folder) and
    `infinity_vae_d56.manifest.json` (`infinity_vae_d56_f8_14_patchify.pth`)."""
    import json

    pkg = import_infinity_package(root, "infinity")
    commit = commit_of(root)
    vae_kw = dict(vqgan_ckpt=None, schedule_mode="dynamic", codebook_dim=14, codebook_size=2 ** 14, patch_size=8,
                  encoder_ch_mult=[1, 2, 4, 4], decoder_ch_mult=[1, 2, 4, 4], test_mode=True)
    model_kw = dict(depth=40, embed_dim=3584, num_heads=28, drop_path_rate=0.1, mlp_ratio=4, block_chunks=8)
    inf_kw = {**INFINITY_KW, **model_kw, "text_channels": 2048, "text_maxlen": 512, "pn": "1M",
              "apply_spatial_patchify": 1}
    del inf_kw["cond_drop_rate"]  # load_infinity() leaves it at the constructor default
    with torch.device("meta"), _ScalarsOnCPU():
        vae = pkg.vae.vae_model(**vae_kw)
        model = pkg.model.Infinity(vae_local=vae, **inf_kw)
    for name, module, what, cfg, built_by in (
        ("infinity_vae_d56", vae, "BSQ-VAE (official infinity/models/bsq_vae) for infinity_vae_d56_f8_14_patchify.pth",
         {"vae_model_kwargs": vae_kw},
         "infinity.models.bsq_vae.vae.vae_model(**config.vae_model_kwargs) (tools/run_infinity.py "
         "load_visual_tokenizer, vae_type=14, apply_spatial_patchify=1), on the meta device"),
        ("infinity_8b", model, "Infinity transformer (official infinity/models/infinity.py) for infinity_8b_weights/",
         inf_kw,
         "infinity.models.infinity.Infinity(vae_local=<d56 patchify vae>, **config) as tools/run_infinity.py "
         "load_infinity() + load_transformer(model_type=\"infinity_8b\") with the flags of "
         "tools/interactive_infer_8b.ipynb (pn=1M, vae_type=14, apply_spatial_patchify=1, rope2d_each_sa_layer=1, "
         "rope2d_normalized_by_hw=2, add_lvl_embeding_only_first_block=1, use_bit_label=1, text_channels=2048, "
         "checkpoint_type=torch_shard; use_scale_schedule_embedding=0 is never passed to the constructor), "
         "on the meta device"),
    ):
        sd = module.state_dict()
        buffers = {k for k, _ in module.named_buffers(remove_duplicate=False)}
        manifest = {"model": what, "built_by": built_by, "config": cfg,
                    "official": {"repo": "FoundationVision/Infinity", "commit": commit},
                    "num_parameters": sum(p.numel() for p in module.parameters()),
                    "num_state_dict_entries": len(sd), "entries": _manifest_entries(sd, buffers)}
        if module is model:
            manifest["derived"] = {"V": model.V, "d_vae": model.d_vae, "head_dim": model.C // model.num_heads,
                                   "num_blocks_in_a_chunk": model.num_blocks_in_a_chunk}
        path = out / "manifests" / f"{name}.manifest.json"
        path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(name, manifest["num_parameters"], len(sd))


# ------------------------------------------------------------------------------------------- ARBooth
ARBOOTH_KW = {**INFINITY_KW, "text_channels": 2048, "pn": "0.25M", "depth": 4}
ARBOOTH_TEXT = dict(special_token_id=32100, placeholder_pos=[4, 6], lens_before_splice=[7, 10], class_len=6,
                    text_prefix_length=4, maxlen=16)
ARBOOTH_LOSSES = dict(scale_weighted_first_scales=8, far_scale_weight=0.5, reg_lambda=0.5, distill_temperature=1.0)


def fork_splice(input_ids, lens, text_features, special_token, special_token_id):
    """booth_train_final.py L906-925 (the training splice), step for step: each placeholder row of the T5
    output is replaced by the rows of `special_token`; lens and cu_seqlens are rebuilt."""
    new_kv, new_lens = [], []
    for b in range(input_ids.shape[0]):
        valid_len = lens[b]
        feats = []
        for i, token in enumerate(input_ids[b, :valid_len]):
            feats.append(special_token if token.item() == special_token_id else text_features[b, i].unsqueeze(0))
        sample = torch.cat(feats, 0)
        new_kv.append(sample)
        new_lens.append(sample.shape[0])
    cu = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32)
    return torch.cat(new_kv, 0), new_lens, cu


def make_arbooth(root: Path, infinity_root: Path | None, out: Path) -> None:
    pkg = import_infinity_package(root, "infinity_final")
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    commit, seed = commit_of(root), 31337
    txt, losses = ARBOOTH_TEXT, ARBOOTH_LOSSES
    vae = build_bsq_vae(pkg, **INFINITY_VAE)
    model = pkg.model.Infinity(vae_local=vae, prefix_config=types.SimpleNamespace(ti_seq_len=txt["text_prefix_length"]),
                               **ARBOOTH_KW)
    vae_sd = seeded_state_dict(vae.state_dict(), seed)
    inf_sd = seeded_state_dict(model.state_dict(), seed + 1)
    vae.load_state_dict(vae_sd, strict=True)
    model.load_state_dict(inf_sd, strict=True)
    vae.eval(), model.eval()
    gen = torch.Generator().manual_seed(seed)
    d, B = INFINITY_VAE["codebook_dim"], 2
    schedule = [(1, h, w) for _, h, w in dynamic_resolution_h_w[1.0]["0.25M"]["scales"]]
    L = sum(h * w for _, h, w in schedule)
    # text: T5-like features (float16-exact), a placeholder token in each instance prompt
    input_ids = torch.randint(5, 32000, (B, txt["maxlen"]), generator=gen)
    attention_mask = torch.zeros(B, txt["maxlen"], dtype=torch.long)
    for b, (n, pos) in enumerate(zip(txt["lens_before_splice"], txt["placeholder_pos"])):
        attention_mask[b, :n] = 1
        input_ids[b, n:] = 0
        input_ids[b, pos] = txt["special_token_id"]
        input_ids[b, n - 1] = 1  # </s>
    text16 = (torch.randn(B, txt["maxlen"], 2048, generator=gen) * 0.4).half()
    text_features = text16.float()
    lens = attention_mask.sum(-1).tolist()
    kv, new_lens, cu = fork_splice(input_ids, lens, text_features, model.special_token.detach(),
                                   txt["special_token_id"])
    text_cond_train = (kv, new_lens, cu, max(lens))   # the fork keeps the pre-splice max_seqlen_k
    text_cond_infer = (kv, new_lens, cu, max(new_lens))
    reg16 = (torch.randn(txt["class_len"], 2048, generator=gen) * 0.4).half()
    reg_kv = reg16.float().repeat(B, 1)
    reg_text_cond = packed(reg_kv, [txt["class_len"]] * B)
    H = schedule[-1][1] * 16
    small = small_image(gen, B, H // 8, H // 8)
    image = image_from_small(small, 8)
    t = {"image_small_u8": small, "input_ids": input_ids, "attention_mask": attention_mask,
         "text_features_f16": text16, "reg_text_f16": reg16, "kv_compact": kv}
    stride_x, stride_l, stride_d = 7, 3, 6
    with torch.no_grad():
        h = vae.encode_for_raw_features(image, schedule)[0]
        bsc = pkg.bsc.BitwiseSelfCorrection(vae, bsc_args())
        x_BLC, gt_ms = bsc.flip_requant(schedule, image, h, "cpu")
        gt_BL = torch.cat(gt_ms, 1)
        logits = model((kv.clone(), *text_cond_train[1:]), x_BLC, scale_schedule=schedule)
        loss = bitwise_ce(logits, gt_BL)  # booth_trainer_final.py L193-199
        first = sum(h_ * w_ for _, h_, w_ in schedule[:losses["scale_weighted_first_scales"]])
        scaling_factor = torch.ones_like(loss)  # L205-213
        scaling_factor[:, first:] *= losses["far_scale_weight"]
        loss_instance = (loss * scaling_factor).mul(1.0 / L).sum(-1).mean()
    t.update({"train.gt_bits_int": bits_to_int(gt_BL).to(torch.int32), "train.x_BLC_strided": x_BLC[:, ::stride_x],
              "train.logits_strided": logits[:, ::stride_l], "train.loss_per_token": loss,
              "train.scaling_factor": scaling_factor, "train.loss_instance": loss_instance})
    stats = {"logits_std": logits.std().item(), "instance_loss": loss_instance.item()}
    teacher_modes = {"greedy": dict(top_k=1, top_p=0.0), "sampled": dict(top_k=900, top_p=0.97)}
    for mode, kw in teacher_modes.items():
        torch.manual_seed(seed)  # the teacher samples from the global RNG (rng=None)
        with torch.no_grad():
            class_BLC, ori, cond_BD, gss, ca_kv = model.autoregressive_cls_infer(
                vae, reg_text_cond, scale_schedule=schedule, cfg_list=[1.0] * len(schedule),
                tau_list=[0.5] * len(schedule), B=B, **kw)
            reg = model(reg_text_cond, class_BLC, scale_schedule=schedule, cond_BD=cond_BD, cond_BD_or_gss=gss,
                        ca_kv=ca_kv)
            T = losses["distill_temperature"]  # booth_trainer_final.py L248-272 (soft)
            kl = F.kl_div(torch.log_softmax(reg / T, -1), torch.softmax(ori / T, -1), reduction="none").sum(-1)
            reg_loss = kl.mul(1.0 / L).sum(-1).mean() * losses["reg_lambda"]
            reg_gt = ori.reshape(B, L, -1, 2).argmax(-1)
        t.update({f"teacher.{mode}.ori_logits_strided": ori[:, ::stride_d],
                  f"reg.{mode}.reg_logits_strided": reg[:, ::stride_d], f"reg.{mode}.kl_per_token": kl,
                  f"reg.{mode}.reg_loss": reg_loss, f"reg.{mode}.reg_gt_bits_int": bits_to_int(reg_gt).to(torch.int32)})
        stats[f"reg_loss_{mode}"] = reg_loss.item()
    gen_cfg = {"cfg_list": [4.0] * len(schedule), "tau_list": [0.5] * len(schedule)}
    bits, _seen, _, _ = official_generate(model, vae, text_cond_infer, schedule, gen_cfg, top_k=1, top_p=0.0,
                                          g_seed=seed)
    t["generate.greedy.bits_int"] = bits_to_int(torch.cat(bits, 1)).to(torch.int32)
    stats["gen_unique_tokens_per_scale"] = [int(bits_to_int(b).unique().numel()) for b in bits]
    config = {"name": "arbooth_tiny", "seed": seed, "vae_seed": seed, "infinity_seed": seed + 1,
              "vae": INFINITY_VAE, "infinity": ARBOOTH_KW, "text": {**txt, "lens_after_splice": new_lens},
              "image_factor": 8, "scale_schedule": schedule, "losses": losses, "codebook_dim": d,
              "strides": {"x_BLC": stride_x, "logits": stride_l, "distill_logits": stride_d},
              "teacher": {"method": "autoregressive_cls_infer", "cfg": 1.0, "tau": 0.5, "global_torch_seed": seed,
                          **{m: kw for m, kw in teacher_modes.items()}},
              "generation": {**gen_cfg, "greedy": {"top_k": 1, "top_p": 0.0, "g_seed": seed}},
              "vae_fingerprint": fingerprint(vae_sd), "infinity_fingerprint": fingerprint(inf_sd),
              "official": {"repo": "jiwoogit/ARBooth", "commit": commit}, "versions": versions(),
              "stats": stats, "shims": SHIMS}
    train_keys = [k for k in t if not k.startswith(("teacher.", "reg."))]
    save_golden(out / "arbooth_tiny.safetensors", config, {k: t[k] for k in train_keys})
    save_golden(out / "arbooth_tiny_distill.safetensors", config, {k: v for k, v in t.items() if k not in train_keys})
    print("arbooth_tiny", stats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--var", type=Path)
    p.add_argument("--infinity", type=Path)
    p.add_argument("--arbooth", type=Path)
    p.add_argument("--infinity-8b", type=Path, help="official Infinity checkout: the 8B-switch golden and manifests")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.var:
        make_var(args.var.resolve(), args.out)
    if args.infinity:
        make_infinity(args.infinity.resolve(), args.out)
    if args.infinity_8b:
        make_infinity_8b(args.infinity_8b.resolve(), args.out)
        make_manifests_8b(args.infinity_8b.resolve(), args.out)
    if args.arbooth:
        make_arbooth(args.arbooth.resolve(), args.infinity.resolve() if args.infinity else None, args.out)


if __name__ == "__main__":
    main()
