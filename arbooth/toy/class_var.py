"""The shipped tiny class-conditional VAR and the toy feature extractor: configs, builders, loaders.

The generator is the real `arbooth.models.VQVAE` / `VAR` with a tiny config (16x16 images, scales
1-2-3-4, 30 tokens, vocabulary 256, 4 blocks of width 96), pretrained on the five source classes of
the class toy world (arbooth/toy/class_world.py) by `arbooth pretrain-toy-class`. It is stored in the
official VAR layout (`vae.safetensors`, `var.safetensors`), so the ordinary class recipe loads it through
`model.vae_ckpt` / `model.var_ckpt` like a released VAR: `model_config()` gives that ModelConfig.

`ToyFeatureNet` is a small CNN trained to name the toy attributes (shape, texture, colour, background);
its 32-d penultimate embedding stands in for Inception's pool features in FID / precision / recall on
toy images (`eval-class --extractor toy`). It is a toy stand-in: numbers are comparable only with
other numbers from the same extractor, never with Inception FIDs.

`toy_class.json` lists the configs, the pretraining log and the sha256 of every file; the loaders
refuse files that do not match it. Shape letters: B batch, D feature width.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arbooth.checkpoint import check_file_hashes, read_state_dict
from arbooth.errors import CheckpointError
from arbooth.toy.class_world import COLOURS, SHAPES, TEXTURES

TOY_CLASS_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_class"
MANIFEST = "toy_class.json"
# ModelConfig fields of the tiny generator (arbooth/adapt/finetuned.py); image size 4 * 4 = 16 px.
MODEL = {"depth": 4, "embed_dim": 96, "num_heads": 3, "mlp_ratio": 4.0, "num_classes": 5,
         "patch_nums": [1, 2, 3, 4], "vocab_size": 256, "z_channels": 16, "vae_ch": 32, "vae_ch_mult": [1, 2, 2],
         "vae_num_res_blocks": 1, "share_quant_resi": 4}
EXTRACTOR = {"width": 32, "dim": 32, "input_size": 16}
HEADS = {"shape": len(SHAPES), "texture": len(TEXTURES), "colour": len(COLOURS), "background": len(COLOURS)}


# ----------------------------------------------------------------------------- feature extractor

class ToyFeatureNet(nn.Module):
    """Toy stand-in for the FID Inception: uint8 images (B, 3, H, W) -> {"pool": (B, dim)}.

    Images are resized to `input_size` (bilinear, antialiased) and scaled to [-1, 1]; three strided
    conv blocks and a global average pool give the embedding; linear heads name the attributes
    (training only)."""

    def __init__(self, width: int = 32, dim: int = 32, input_size: int = 16) -> None:
        super().__init__()
        self.input_size = input_size

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(*block(3, width, 1), *block(width, width, 1), *block(width, 2 * width, 2),
                                  *block(2 * width, 2 * width, 1), *block(2 * width, 4 * width, 2))
        self.proj = nn.Linear(4 * width, dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in HEADS.items()})
        self.feature_id = f"toy-feature-net-{dim}"

    def embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at input_size -> (B, dim)."""
        h_BC = self.body(x_B3HW).mean(dim=(2, 3))
        return self.proj(h_BC)

    def logits(self, x_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        e_BD = F.silu(self.embed(x_B3HW))
        return {k: head(e_BD) for k, head in self.heads.items()}

    def forward(self, x_B3HW_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x_B3HW_uint8.float() / 127.5 - 1.0
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return {"pool": self.embed(x)}


# ----------------------------------------------------------------------------- files

def read_manifest(folder: str | Path = TOY_CLASS_DIR, *, check: bool = True) -> dict:
    """toy_class.json of `folder`; with `check`, every listed file must exist and match its sha256.
    Raises CheckpointError otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no tiny class VAR in {folder} ({MANIFEST} missing): run "
                              f"`arbooth pretrain-toy-class out={folder}`")
    manifest = json.loads(path.read_text())
    if check:
        check_file_hashes(folder, manifest["sha256"], MANIFEST)
    return manifest


def model_fields(folder: str | Path = TOY_CLASS_DIR) -> dict:
    """The `model` section (ModelConfig fields) of the shipped tiny VAR, with `vae_ckpt` / `var_ckpt`
    pointing at its weight files, after checking their sha256 (CheckpointError on a mismatch)."""
    folder = Path(folder)
    man = read_manifest(folder)
    return {**man["model"], "vae_ckpt": str(folder / "vae.safetensors"), "var_ckpt": str(folder / "var.safetensors")}


def base_id(folder: str | Path = TOY_CLASS_DIR) -> str:
    """Identifies the shipped generator in reports: the sha256 of its transformer weights."""
    return f"toy_class var.safetensors sha256={read_manifest(folder, check=False)['sha256']['var.safetensors']}"


def load_toy_extractor(folder: str | Path = TOY_CLASS_DIR) -> ToyFeatureNet:
    """The shipped toy feature extractor, frozen, in eval mode, on the CPU (hash-checked)."""
    folder = Path(folder)
    man = read_manifest(folder)
    net = ToyFeatureNet(**man["extractor"])
    net.load_state_dict(read_state_dict(folder / "extractor.safetensors"))
    return net.eval().requires_grad_(False)
