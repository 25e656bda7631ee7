"""Regenerate the golden vectors in tests/golden from the OFFICIAL code (never imported by `arbooth`).

    python tests/golden/make_golden.py --var /path/to/FoundationVision/VAR \
        --infinity /path/to/FoundationVision/Infinity --arbooth /path/to/jiwoogit/ARBooth [--only var]

Each path is a checkout (or an export with a `COMMIT` file holding the commit hash). The official
models are built on the CPU in float32 with one thread, their weights are rebuilt from a seed by
`seeded.seeded_state_dict` in the official key layout, and the files written keep only config, seed,
inputs and outputs (see tests/golden/README.md). The CPU shims needed to run the official code
(flash-attn absent, torch.compile'd norms) are applied here, to the official modules, and are listed in
each file's config under "shims"; none of them changes the math.
"""
from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from seeded import (  # noqa: E402  (script: the helper sits beside it)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--var", type=Path)
    p.add_argument("--infinity", type=Path)
    p.add_argument("--arbooth", type=Path)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.var:
        make_var(args.var.resolve(), args.out)
    if args.infinity:
        make_infinity(args.infinity.resolve(), args.out)
    if args.arbooth:
        make_arbooth(args.arbooth.resolve(), args.infinity.resolve() if args.infinity else None, args.out)


if __name__ == "__main__":
    main()
