"""Feature extractors for evaluation, each built through its home library.

Every extractor takes `weights`:
- `"default"`: the released weights, found in the Hugging Face cache or the torch hub cache; never
  downloaded here. When absent, a CheckpointError names the file to fetch and where to put it.
- a path: that local file.
- `None`: random initialisation. Only for tests and smoke runs: the numbers are meaningless.

Shapes: B batch, D feature dimension, H/W image size.
"""
from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from arbooth.errors import ArboothError, CheckpointError

log = logging.getLogger(__name__)

DEFAULT = "default"
Weights = str | Path | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (open_clip.constants.OPENAI_DATASET_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def find_weights(weights: Weights, *, what: str, hf_repo: str | None = None,
                 hf_filenames: tuple[str, ...] = (), hub_filename: str | None = None,
                 url: str | None = None, option: str = "") -> Path | None:
    """Resolve `weights` to a local file (or None for random init) without downloading anything."""
    if weights is None:
        return None
    if str(weights) != DEFAULT:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{what}: weights file {path} not found")
        return path
    if hf_repo:
        from huggingface_hub import try_to_load_from_cache
        for name in hf_filenames:
            hit = try_to_load_from_cache(hf_repo, name)
            if isinstance(hit, str):
                return Path(hit)
    if hub_filename:
        path = Path(torch.hub.get_dir()) / "checkpoints" / hub_filename
        if path.is_file():
            return path
    where = []
    if hf_repo and hf_filenames:
        where.append(f"`huggingface-cli download {hf_repo} {hf_filenames[0]}` (Hugging Face cache)")
    if url:
        dest = Path(torch.hub.get_dir()) / "checkpoints" / (hub_filename or Path(url).name)
        where.append(f"download {url} to {dest}")
    hint = f" or pass {option} PATH" if option else ""
    raise CheckpointError(f"{what} weights not found locally: {' or '.join(where)}{hint} "
                          "(use --random-weights only for smoke tests)")


# ----------------------------------------------------------------------------- DINO ViT-S/16

class DinoViT(nn.Module):
    """DINO ViT-S/16 CLS embedding (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers"), through timm `vit_small_patch16_224.dino`.

    Input: (B, 3, H, W) already preprocessed by the protocol, H and W multiples of 16. Output: (B, 384)
    CLS token after the final LayerNorm, which is what `torch.hub.load('facebookresearch/dino:main',
    'dino_vits16')` returns (its head is Identity). For sizes other than 224 the position embedding is
    resampled exactly as the hub model does (`interpolate_pos_encoding`, see `_dino_pos_embed`), not
    with timm's own resampling, so the dreammatcher protocol's 256x256 input sees the same numbers.
    """

    name = "vit_small_patch16_224.dino"

    def __init__(self, weights: Weights = DEFAULT) -> None:
        super().__init__()
        import timm
        path = find_weights(weights, what="DINO ViT-S/16", hf_repo="timm/vit_small_patch16_224.dino",
                            hf_filenames=("model.safetensors", "pytorch_model.bin"),
                            hub_filename="dino_deitsmall16_pretrain.pth",
                            url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
                                "dino_deitsmall16_pretrain.pth", option="--dino-weights")
        kwargs = {"num_classes": 0, "global_pool": "token", "dynamic_img_size": True}
        try:
            if path is None:
                self.model = timm.create_model(self.name, pretrained=False, **kwargs)
            else:
                self.model = timm.create_model(self.name, pretrained=True,
                                               pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except (RuntimeError, KeyError, OSError) as e:
            raise CheckpointError(f"DINO ViT-S/16: cannot load {path}: {e}") from e
        self.pretrained = path is not None
        self.eval().requires_grad_(False)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        # facebookresearch/dino vision_transformer.py prepare_tokens + forward, on timm's modules.
        m = self.model
        x_BhwC = m.patch_embed(x_B3HW)  # dynamic_img_size: patches stay (B, h, w, C)
        b, h, w, c = x_BhwC.shape
        x_BLC = torch.cat([m.cls_token.expand(b, -1, -1), x_BhwC.reshape(b, h * w, c)], dim=1)
        x_BLC = m.pos_drop(x_BLC + _dino_pos_embed(m.pos_embed, h, w))
        x_BLC = m.norm(m.blocks(m.norm_pre(x_BLC)))
        return x_BLC[:, 0]  # (B, 384)


def _dino_pos_embed(pos_1LC: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding` (vision_transformer.py L174-194): bicubic with
    scale_factor (n + 0.1) / 14 rather than a target size, which shifts the sampling grid a little."""
    n = pos_1LC.shape[1] - 1
    side = int(math.sqrt(n))
    if h * w == n and h == w:
        return pos_1LC
    patch_1Chw = nn.functional.interpolate(
        pos_1LC[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
        scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
    if patch_1Chw.shape[-2:] != (h, w):
        raise ArboothError(f"DINO position embedding resampled to {tuple(patch_1Chw.shape[-2:])}, "
                           f"expected {(h, w)}")
    return torch.cat([pos_1LC[:, :1], patch_1Chw.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


# ----------------------------------------------------------------------------- CLIP ViT-B/32

class OpenClip(nn.Module):
    """CLIP (Radford et al. 2021) image and text towers through open_clip; OpenAI ViT-B/32 by default.

    `preprocess` is open_clip's own eval transform (PIL -> normalised (3, 224, 224)): resize the short
    side to 224 (bicubic), centre crop, CLIP mean/std.
    """

    def __init__(self, weights: Weights = DEFAULT, model_name: str = "ViT-B-32") -> None:
        super().__init__()
        import open_clip
        path = find_weights(weights, what=f"CLIP {model_name} (OpenAI)",
                            hf_repo="timm/vit_base_patch32_clip_224.openai",
                            hf_filenames=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
                            url="https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/"
                                "open_clip_model.safetensors", option="--clip-weights")
        try:
            # OpenAI weights were trained with QuickGELU; open_clip's plain config uses nn.GELU.
            self.model = open_clip.create_model(model_name, pretrained=str(path) if path else None,
                                                force_quick_gelu=True)
        except (RuntimeError, KeyError, OSError) as e:
            raise CheckpointError(f"CLIP {model_name}: cannot load {path}: {e}") from e
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple) else size)
        self.preprocess = open_clip.image_transform(self.image_size, is_train=False, mean=CLIP_MEAN,
                                                    std=CLIP_STD, interpolation="bicubic")
        self.name = f"open_clip:{model_name}"
        self.pretrained = path is not None
        self.eval().requires_grad_(False)

    def encode_image(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x_B3HW)  # (B, D)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device))  # (B, D)


# ----------------------------------------------------------------------------- Inception (FID)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class InceptionFID(nn.Module):
    """The TensorFlow FID Inception-v3 (pt_inception-2015-12-05, Heusel et al. 2017) via torch-fidelity.

    `weights=None` gives the same network with random weights (tests, benchmarks).
    Input: (B, 3, H, W) uint8; resized to 299 inside, like the TF graph. Output dict: `pool` (B, 2048)
    pool3 features; with `spatial=True` also `spatial` (B, 2023): the first 7 channels of the
    `mixed_6/conv` 17x17 map (= Mixed_6d.branch1x1 conv, before batch norm), which is what the
    guided-diffusion evaluator uses for sFID (Nash et al. 2021).
    """

    def __init__(self, weights: Weights = DEFAULT, spatial: bool = False) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise CheckpointError("FID Inception needs the torch-fidelity package (pip install "
                                  "torch-fidelity)") from e
        path = find_weights(weights, what="FID Inception-v3", hub_filename=INCEPTION_FILE,
                            url=f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                                f"{INCEPTION_FILE}", option="--inception-weights")
        with tempfile.TemporaryDirectory() as tmp:
            if path is None:
                # torch-fidelity only builds from a weights file (else it downloads): give it a file of
                # random weights in its key layout (tests and benchmarks only).
                path = Path(tmp) / "random_inception.pth"
                torch.save(_random_inception_state(), path)
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(path))
        self.spatial = spatial
        self.feature_id = "inception-2015-12-05" + ("+spatial" if spatial else "")

    def forward(self, x_B3HW_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = None
        if self.spatial:
            handle = self.net.Mixed_6d.branch1x1.conv.register_forward_hook(
                lambda _m, _i, out: captured.append(out[:, :7].flatten(1)))
        try:
            (pool_BD,) = self.net(x_B3HW_uint8)
        finally:
            if handle is not None:
                handle.remove()
        out = {"pool": pool_BD}
        if captured:
            out["spatial"] = captured[0].float()
        return out


def _random_inception_state() -> dict[str, torch.Tensor]:
    """Random weights with the key layout of torch-fidelity's FeatureExtractorInceptionV3."""
    from torch_fidelity import feature_extractor_inceptionv3 as m
    net = nn.Module()
    net.Conv2d_1a_3x3 = m.BasicConv2d(3, 32, kernel_size=3, stride=2)
    net.Conv2d_2a_3x3 = m.BasicConv2d(32, 32, kernel_size=3)
    net.Conv2d_2b_3x3 = m.BasicConv2d(32, 64, kernel_size=3, padding=1)
    net.Conv2d_3b_1x1 = m.BasicConv2d(64, 80, kernel_size=1)
    net.Conv2d_4a_3x3 = m.BasicConv2d(80, 192, kernel_size=3)
    net.Mixed_5b = m.InceptionA(192, pool_features=32)
    net.Mixed_5c = m.InceptionA(256, pool_features=64)
    net.Mixed_5d = m.InceptionA(288, pool_features=64)
    net.Mixed_6a = m.InceptionB(288)
    net.Mixed_6b = m.InceptionC(768, channels_7x7=128)
    net.Mixed_6c = m.InceptionC(768, channels_7x7=160)
    net.Mixed_6d = m.InceptionC(768, channels_7x7=160)
    net.Mixed_6e = m.InceptionC(768, channels_7x7=192)
    net.Mixed_7a = m.InceptionD(768)
    net.Mixed_7b = m.InceptionE_1(1280)
    net.Mixed_7c = m.InceptionE_2(2048)
    net.fc = nn.Linear(2048, 1008)
    return net.state_dict()


class TinyFIDNet(nn.Module):
    """A small random CNN with the FID extractor interface, for tests and `--random-weights` smoke runs."""

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(32, dim, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(1, p[0].numel())) ** 0.5)
        self.feature_id = f"tiny-random-{dim}-{seed}"
        self.eval().requires_grad_(False)

    def forward(self, x_B3HW_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.interpolate(x_B3HW_uint8.float() / 127.5 - 1.0, size=(64, 64),
                                            mode="bilinear", align_corners=False)
        return {"pool": self.net(x)}


# ----------------------------------------------------------------------------- LPIPS (AlexNet)

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def build_lpips(backbone_weights: Weights = DEFAULT) -> nn.Module:
    """LPIPS-AlexNet v0.1 (Zhang et al. 2018) from the `lpips` package.

    The package ships its linear-layer weights; the AlexNet backbone (torchvision's ImageNet weights)
    is loaded here from a local file instead of torchvision's download. Input: two (B, 3, H, W) in
    [-1, 1]; output (B, 1, 1, 1) distances.
    """
    import lpips
    path = find_weights(backbone_weights, what="LPIPS AlexNet backbone (torchvision)",
                        hub_filename=ALEXNET_FILE, url=f"https://download.pytorch.org/models/{ALEXNET_FILE}",
                        option="--lpips-backbone")
    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument; nothing to act on here.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = model.net.state_dict()  # keys like slice2.3.weight <- features.3.weight
        mapped = {k: state[f"features.{k.split('.', 1)[1]}"] for k in own
                  if f"features.{k.split('.', 1)[1]}" in state}
        if set(mapped) != set(own):
            raise CheckpointError(f"{path}: not a torchvision AlexNet checkpoint "
                                  f"(missing {sorted(set(own) - set(mapped))[:3]})")
        model.net.load_state_dict(mapped, strict=True)
    model.pretrained = path is not None
    return model.eval().requires_grad_(False)
