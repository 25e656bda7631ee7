"""Subject-fidelity metrics for personalization: I_DINO, I_CLIP, T_CLIP, PRES, DIV.

Definitions (docs/metrics.md has the full text and references):
- I_DINO / I_CLIP (Ruiz et al. 2023, DreamBooth, Sec. 4.1): mean cosine similarity over all
  (real subject image, generated image) pairs, with DINO ViT-S/16 or CLIP ViT-B/32 image embeddings.
- T_CLIP (DreamBooth Sec. 4.1): mean cosine similarity between each generated image's CLIP embedding
  and the CLIP text embedding of its prompt.
- PRES (DreamBooth Sec. 4.3): I_DINO between the real subject images and images generated from the
  plain class prompt by the personalized model; lower means the class prior is better preserved.
- DIV (DreamBooth Sec. 4.3): mean LPIPS distance over pairs of images generated for the same prompt.

Two named protocols fix the preprocessing, because published numbers depend on it:
`dreambooth` (the standard recipe) and `dreammatcher` (what the DreamMatcher / ARBooth evaluator,
jiwoogit/ARBooth tools/evaluate.py and booth_evaluation/*.py, actually computes).

Shapes: N, M image counts, D feature dimension.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from arbooth.data.images import center_crop_resize, pil_to_tensor_m11
from arbooth.errors import ArboothError
from arbooth.metrics.extractors import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, OpenClip

log = logging.getLogger(__name__)

PROTOCOLS = ("dreambooth", "dreammatcher")


# ----------------------------------------------------------------------------- metric accumulators

class ImageSimilarity:
    """Mean pairwise cosine similarity in [-1, 1] between reference features (N, D) and every generated
    feature (M, D) given to update(); compute() raises ArboothError before any update.

    I_DINO, I_CLIP and PRES are this with different features (DreamBooth Sec. 4.1; ARBooth
    booth_evaluation/clip_eval.py `img_to_img_similarity`: (src @ gen.T).mean() of unit vectors)."""

    def __init__(self, reference_ND: torch.Tensor) -> None:
        self.ref_ND = nn.functional.normalize(reference_ND.double(), dim=-1)
        self.total = 0.0
        self.count = 0

    def update(self, generated_MD: torch.Tensor) -> None:
        gen_MD = nn.functional.normalize(generated_MD.double().to(self.ref_ND.device), dim=-1)
        self.total += float((self.ref_ND @ gen_MD.T).sum())
        self.count += self.ref_ND.shape[0] * gen_MD.shape[0]

    def compute(self) -> float:
        if self.count == 0:
            raise ArboothError("no generated images were added")
        return self.total / self.count


class TextSimilarity:
    """T_CLIP: mean cosine similarity in [-1, 1] between generated image embeddings (M, D) and their
    prompt's text embedding (D,) (DreamBooth Sec. 4.1; ARBooth booth_evaluation/clip_eval.py
    `img_to_text_similarity`); compute() raises ArboothError before any update."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, image_MD: torch.Tensor, text_D: torch.Tensor) -> None:
        img = nn.functional.normalize(image_MD.double(), dim=-1)
        txt = nn.functional.normalize(text_D.double().reshape(-1).to(img.device), dim=-1)
        self.total += float((img @ txt).sum())
        self.count += img.shape[0]

    def compute(self) -> float:
        if self.count == 0:
            raise ArboothError("no generated images were added")
        return self.total / self.count


class PairwiseDiversity:
    """DIV: mean LPIPS distance over all unordered pairs (i < j) within each group of images.

    Matches ARBooth booth_evaluation/lpips_eval.py `compute_pairwise_distance` (one group per prompt),
    batched over pairs. update() takes one group (N, 3, H, W) in [-1, 1]; compute() averages the LPIPS
    distances (>= 0, higher = more diverse) over all pairs seen and raises ArboothError when no group had
    two images."""

    def __init__(self, lpips_fn: nn.Module, batch_size: int = 32) -> None:
        self.lpips_fn = lpips_fn
        self.batch_size = batch_size
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, images_N3HW_m11: torch.Tensor) -> None:
        n = images_N3HW_m11.shape[0]
        i_idx, j_idx = torch.triu_indices(n, n, offset=1)
        device = next(self.lpips_fn.parameters()).device
        for s in range(0, i_idx.numel(), self.batch_size):
            a = images_N3HW_m11[i_idx[s:s + self.batch_size]].to(device)
            b = images_N3HW_m11[j_idx[s:s + self.batch_size]].to(device)
            self.total += float(self.lpips_fn(a, b).double().sum())
        self.count += i_idx.numel()

    def compute(self) -> float:
        if self.count == 0:
            raise ArboothError("DIV needs at least two images generated for one prompt")
        return self.total / self.count


# ----------------------------------------------------------------------------- protocols

def _dreammatcher_load(im: Image.Image) -> torch.Tensor:
    # ARBooth booth_evaluation/personalized.py: PIL resize to 256x256 bicubic, no crop (aspect is not
    # kept), then x / 127.5 - 1. Every metric of that evaluator starts from this tensor.
    return pil_to_tensor_m11(im.resize((256, 256), resample=Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class SubjectProtocol:
    """How images and prompts are prepared for each metric. Build with `get_protocol(name)`."""

    name: str

    def dino_input(self, im: Image.Image) -> torch.Tensor:
        if self.name == "dreammatcher":
            # dino_eval.py feeds the [-1, 1] 256x256 tensor straight to the DINO model: no ImageNet
            # normalisation, no crop; the position embedding is interpolated to 16x16 patches.
            return _dreammatcher_load(im)
        x = TF.resize(im, 224, interpolation=TF.InterpolationMode.BICUBIC)
        x = TF.to_tensor(TF.center_crop(x, 224))
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def clip_input(self, im: Image.Image, clip: OpenClip) -> torch.Tensor:
        if self.name == "dreammatcher":
            # clip_eval.py: [-1, 1] -> [0, 1], then CLIP's Resize(224, bicubic) and CenterCrop(224) on
            # the tensor, then CLIP normalisation.
            x = _dreammatcher_load(im).add(1.0).div(2.0)
            x = TF.resize(x, clip.image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            return TF.normalize(TF.center_crop(x, clip.image_size), CLIP_MEAN, CLIP_STD)
        return clip.preprocess(im)

    def lpips_input(self, im: Image.Image) -> torch.Tensor:
        if self.name == "dreammatcher":
            return _dreammatcher_load(im)
        return pil_to_tensor_m11(center_crop_resize(im, 256))

    def clip_text(self, template: str, class_noun: str) -> str:
        """T_CLIP text for a prompt template with a `{}` placeholder."""
        if self.name == "dreammatcher":
            # tools/evaluate.py tokenizes the raw template line, braces included.
            return template
        return template.replace("{}", class_noun)


def get_protocol(name: str) -> SubjectProtocol:
    if name not in PROTOCOLS:
        raise ArboothError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return SubjectProtocol(name)


# ----------------------------------------------------------------------------- evaluator

def _encode(fn: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor], device: torch.device,
            batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(xs), batch_size):
            out.append(fn(torch.stack(xs[s:s + batch_size]).to(device)).float().cpu())
    return torch.cat(out)


class SubjectEvaluator:
    """Binds the extractors, a protocol and a device; computes the subject metrics for image lists."""

    def __init__(self, dino: nn.Module, clip: OpenClip, lpips_fn: nn.Module, protocol: str,
                 device: torch.device | str = "cpu", batch_size: int = 16) -> None:
        self.protocol = get_protocol(protocol)
        self.device = torch.device(device)
        self.dino = dino.to(self.device).eval()
        self.clip = clip.to(self.device).eval()
        self.lpips_fn = lpips_fn.to(self.device).eval()
        self.batch_size = batch_size

    def dino_features(self, images: list[Image.Image]) -> torch.Tensor:
        return _encode(self.dino, [self.protocol.dino_input(im) for im in images], self.device, self.batch_size)

    def clip_features(self, images: list[Image.Image]) -> torch.Tensor:
        xs = [self.protocol.clip_input(im, self.clip) for im in images]
        return _encode(self.clip.encode_image, xs, self.device, self.batch_size)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.encode_text(texts).float().cpu()

    def diversity(self, images: list[Image.Image]) -> float | None:
        """Mean pairwise LPIPS within `images`; None for fewer than two images."""
        if len(images) < 2:
            return None
        div = PairwiseDiversity(self.lpips_fn, self.batch_size)
        div.update(torch.stack([self.protocol.lpips_input(im) for im in images]))
        return div.compute()

    def prompt_metrics(self, images: list[Image.Image], template: str, class_noun: str,
                       subject_dino_ND: torch.Tensor, subject_clip_ND: torch.Tensor) -> dict[str, float | None]:
        """All per-prompt metrics for the images generated from one prompt template."""
        dino_MD, clip_MD = self.dino_features(images), self.clip_features(images)
        i_dino, i_clip = ImageSimilarity(subject_dino_ND), ImageSimilarity(subject_clip_ND)
        i_dino.update(dino_MD)
        i_clip.update(clip_MD)
        class_text = template.replace("{}", class_noun)
        txt_2D = self.text_features([self.protocol.clip_text(template, class_noun), class_text, template])
        t_values = []
        for t in range(3):
            ts = TextSimilarity()
            ts.update(clip_MD, txt_2D[t])
            t_values.append(ts.compute())
        return {"I_DINO": i_dino.compute(), "I_CLIP": i_clip.compute(), "T_CLIP": t_values[0],
                "T_CLIP_class_noun": t_values[1], "T_CLIP_raw_template": t_values[2],
                "DIV": self.diversity(images), "n_images": len(images)}

    def pres(self, subject_dino_ND: torch.Tensor, class_images: list[Image.Image]) -> float:
        """PRES: DINO similarity of the real subject to class-prompt generations (lower is better)."""
        sim = ImageSimilarity(subject_dino_ND)
        sim.update(self.dino_features(class_images))
        return sim.compute()
