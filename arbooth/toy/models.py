"""The shipped toy base (tiny BSQ-VAE + tiny T5 + tiny Infinity) and toy evaluators (tiny open_clip CLIP,
attribute probe): configs, builders, and loaders that check the shipped files' sha256 hashes.

Everything is the real architecture with a tiny config: `arbooth.models.BSQVAE` / `Infinity`,
`transformers.T5EncoderModel`, `open_clip.CLIP`. The folder (arbooth/assets/toy by default) holds
`vae.safetensors`, `infinity.safetensors`, `t5/` (save_pretrained: config, weights, tokenizer),
`clip.safetensors`, `probe.safetensors` and `toy.json` (configs, scale schedule, sha256 of every file,
the pretraining log). `arbooth pretrain-toy` (arbooth/toy/pretrain.py) writes it.

Shape letters: B batch, D feature width.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arbooth.checkpoint import check_file_hashes, read_state_dict
from arbooth.errors import CheckpointError
from arbooth.toy.world import COLOURS, SHAPES, SIZES, TEXTURES

log = logging.getLogger(__name__)
TOY_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"

# Default configs (pretrain-toy writes the ones it used into toy.json; loaders read toy.json).
IMAGE_SIZE = 32
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]  # 121 tokens; 8x8 latent = 32 px / 4
VAE = {"codebook_dim": 32, "base_ch": 32, "num_res_blocks": 1, "ch_mult": [1, 1, 2], "patch_size": 4}
MODEL = {"depth": 4, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 2.0, "text_channels": 128, "text_maxlen": 24,
         "block_chunks": 2}
T5 = {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
      "relative_attention_max_distance": 16, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu"}
CLIP = {"embed_dim": 64,
        "vision": {"layers": 3, "width": 96, "head_width": 32, "patch_size": 4, "image_size": IMAGE_SIZE,
                   "mlp_ratio": 2.0},
        "text": {"context_length": 16, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}}
PROBE_HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES, "texture_colour": tuple(COLOURS),
               "size": SIZES, "background": tuple(COLOURS)}  # texture_colour: the split's top half (split only)


# ----------------------------------------------------------------------------- builders


def build_vae(cfg: dict = VAE):
    from arbooth.models import BSQVAE
    return BSQVAE(**{**cfg, "ch_mult": tuple(cfg["ch_mult"])})


def build_infinity(vae, cfg: dict = MODEL, **kwargs):
    from arbooth.models import Infinity
    return Infinity(vae, **cfg, **kwargs)


def build_t5(cfg: dict, vocab_size: int):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=vocab_size, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **cfg)
    return T5EncoderModel(config)


def build_clip(cfg: dict, vocab_size: int):
    """open_clip's CLIP (ViT image tower, causal text transformer) with a tiny config; the text tower
    pools at the "</s>" token of the toy tokenizer."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    text = CLIPTextCfg(vocab_size=vocab_size, pool_type="eos", eos_id=1, pad_id=0, **cfg["text"])
    return CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision"]), text)


class AttributeProbe(nn.Module):
    """Small CNN predicting every toy attribute; its pooled features are the toy identity embedding
    (the stand-in for DINO) and its heads the oracle for attribute accuracy. Input: (B, 3, H, W) in [0, 1]."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(  # 32 -> 16 -> 8 -> 4, then a linear map of the whole 4x4 map
            *block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1), *block(2 * w, 4 * w, 2),
            *block(4 * w, 4 * w, 1), *block(4 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * w, dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in PROBE_HEADS.items()})

    def embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.features(x_B3HW * 2 - 1)

    def forward(self, x_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(x_B3HW)
        return {k: head(f) for k, head in self.heads.items()}


# ----------------------------------------------------------------------------- loading


def read_manifest(folder: str | Path = TOY_DIR, *, check: bool = True) -> dict:
    """toy.json of `folder`; with `check`, every listed file's sha256 must match."""
    folder = Path(folder)
    path = folder / "toy.json"
    if not path.is_file():
        raise CheckpointError(f"no toy base in {folder} (toy.json missing): run `arbooth pretrain-toy out={folder}`")
    manifest = json.loads(path.read_text())
    if check:
        check_file_hashes(folder, manifest["sha256"], "toy.json")
    return manifest


@dataclass
class ToyBase:
    vae: nn.Module
    model: nn.Module
    tokenizer: object
    encoder: nn.Module
    schedule: list[tuple[int, int, int]]
    image_size: int
    base_id: str


def load_toy_base(folder: str | Path = TOY_DIR, **model_kwargs) -> ToyBase:
    """The pretrained toy text-to-image model, frozen and in eval mode, on the CPU."""
    from transformers import AutoTokenizer, T5EncoderModel
    folder = Path(folder)
    man = read_manifest(folder)
    vae = build_vae(man["vae"])
    vae.load_state_dict(read_state_dict(folder / "vae.safetensors"))
    model = build_infinity(vae, man["model"], **model_kwargs)
    model.load_state_dict(read_state_dict(folder / "infinity.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder / "t5")
    encoder = T5EncoderModel.from_pretrained(folder / "t5")
    for m in (vae, model, encoder):
        m.eval().requires_grad_(False)
    base_id = f"toy infinity.safetensors sha256={man['sha256']['infinity.safetensors']}"
    return ToyBase(vae, model, tokenizer, encoder, [tuple(s) for s in man["schedule"]], man["image_size"], base_id)


def toy_infinity_base(model_cfg, model_kwargs: dict) -> tuple:
    """`model.preset=toy`: the pretrained toy base in `model_cfg.model_ckpt` (default: the shipped one) as
    (vae, model, tokenizer, t5_encoder, base_id), frozen, eval mode, on the CPU."""
    base = load_toy_base(model_cfg.model_ckpt or TOY_DIR, **model_kwargs)
    return base.vae, base.model, base.tokenizer, base.encoder, base.base_id


def toy_schedule(model_cfg) -> list[tuple[int, int, int]]:
    """The toy base's scale schedule (32x32 images, 5 scales: not a released one), from its toy.json."""
    return [tuple(s) for s in read_manifest(model_cfg.model_ckpt or TOY_DIR, check=False)["schedule"]]


class ToyEvaluator:
    """Toy CLIP (image/text embeddings) + attribute probe (identity embedding, oracle attributes).
    Images are (B, 3, H, W) tensors in [0, 1] at the toy resolution."""

    def __init__(self, folder: str | Path = TOY_DIR):
        from transformers import AutoTokenizer
        folder = Path(folder)
        man = read_manifest(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "t5")
        self.clip = build_clip(man["clip"], len(self.tokenizer)).eval().requires_grad_(False)
        self.clip.load_state_dict(read_state_dict(folder / "clip.safetensors"))
        self.probe = AttributeProbe().eval().requires_grad_(False)
        self.probe.load_state_dict(read_state_dict(folder / "probe.safetensors"))
        self.context_length = man["clip"]["text"]["context_length"]

    @torch.no_grad()
    def clip_image(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(clip_normalize(x_B3HW)), dim=-1)

    @torch.no_grad()
    def clip_text(self, prompts: list[str]) -> torch.Tensor:
        from arbooth.toy.text import tokenize_ids
        return F.normalize(self.clip.encode_text(tokenize_ids(self.tokenizer, prompts, self.context_length)), dim=-1)

    @torch.no_grad()
    def identity(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.probe.embed(x_B3HW), dim=-1)

    @torch.no_grad()
    def attributes(self, x_B3HW: torch.Tensor) -> list[dict[str, str]]:
        logits = self.probe(x_B3HW)
        preds = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: PROBE_HEADS[k][preds[k][i]] for k in preds} for i in range(x_B3HW.shape[0])]


def clip_normalize(x_B3HW: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the toy CLIP's input ([-1, 1]; the toy images need no dataset statistics)."""
    return x_B3HW * 2 - 1
