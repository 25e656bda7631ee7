"""The learnable subject token <S*> of ARBooth, spliced into the T5 text conditioning.

Shapes: B prompts, T text tokens (padded), C text channels (T5 width = the model's text_channels),
P = text_prefix_length rows of <S*>.

How it works (as the authors, jiwoogit/ARBooth booth_train_final.py L510-516 and L907-929,
tools/run_arbooth.py L41-81): the tokenizer knows one extra special token (we call it "<S*>", the
authors "<placeholder>"); the frozen T5 encoder runs on the prompt; then, per prompt, the ONE T5
output vector at the placeholder position is replaced by the P learnable rows, so that prompt's
length grows by P-1. The result goes through the model's normal text path.

Where the placeholder's T5 input embedding comes from: the authors add the token and resize the T5
embedding table to len(tokenizer). flan-t5 has 32128 embedding rows for 32100 tokens, so the new
id is 32100 and its (never trained) row is the released one; `add_placeholder_token` keeps that
row without resizing, which gives the same features. A tokenizer whose table is full gets one new
row set to the mean embedding (deterministic, unlike resize_token_embeddings' random row).

Initialisation (`init`): "zeros" as the authors (infinity_final.py L290-292; after the model's
text RMS-norm a zero row is a zero key/value), or "class_noun": every row starts at the mean T5
feature of the class noun in the class prompt, so the instance prompt starts out meaning
"a photo of <class> <class>" and training only has to move it towards the subject.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from arbooth.errors import ArboothError, ConfigError
from arbooth.models.t5 import t5_features, warn_truncation

PLACEHOLDER = "<S*>"
# The class prompt of prior preservation and PRES (arg_util.py L523; prompts.class_template's default)
CLASS_TEMPLATE = "a photo of {cls}"


class SubjectToken(nn.Module):
    """P learnable rows in the text-conditioning space."""

    def __init__(self, length: int = 4, channels: int = 2048) -> None:
        super().__init__()
        if length < 1:
            raise ConfigError(f"text_prefix_length must be at least 1, got {length}")
        self.embedding_PC = nn.Parameter(torch.zeros(length, channels))

    @property
    def length(self) -> int:
        return self.embedding_PC.shape[0]

    def forward(self, text_BTC: torch.Tensor, mask_BT: torch.Tensor,
                placeholder_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return splice_subject_token(text_BTC, mask_BT, placeholder_BT, self.embedding_PC)


def splice_subject_token(text_BTC: torch.Tensor, mask_BT: torch.Tensor, placeholder_BT: torch.Tensor,
                         token_PC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each prompt's placeholder feature by the P rows of `token_PC` (differentiable in it).

    Prompts without a placeholder pass unchanged; more than one placeholder in a prompt is an error.
    Returns padded (B, T', C) features and their (B, T') bool mask, T' = max length after the splice.
    """
    B, _, C = text_BTC.shape
    if token_PC.shape[1] != C:
        raise ArboothError(f"<S*> has width {token_PC.shape[1]} but the text features have {C}")
    counts = (placeholder_BT & mask_BT.bool()).sum(dim=1)
    if (counts > 1).any():
        raise ArboothError("a prompt may hold the subject token at most once")
    rows = []
    for b in range(B):
        n = int(mask_BT[b].sum())
        feats = text_BTC[b, :n]
        if counts[b] == 1:
            pos = int(placeholder_BT[b, :n].nonzero()[0, 0])
            feats = torch.cat([feats[:pos], token_PC.to(feats.dtype), feats[pos + 1:]])
        rows.append(feats)
    lens = torch.tensor([r.shape[0] for r in rows], device=text_BTC.device)
    T2 = int(lens.max())
    out_BTC = torch.stack([F.pad(r, (0, 0, 0, T2 - r.shape[0])) for r in rows])
    out_mask_BT = torch.arange(T2, device=text_BTC.device)[None] < lens[:, None]
    return out_BTC, out_mask_BT


def pack_text(text_BTC: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Padded features -> the official packed form (sum(lens), C) with lens (for comparisons)."""
    lens = mask_BT.sum(dim=1).tolist()
    return torch.cat([text_BTC[b, :n] for b, n in enumerate(lens)]), lens


def add_placeholder_token(tokenizer, encoder: nn.Module, placeholder: str = PLACEHOLDER) -> int:
    """Make `placeholder` one special token of `tokenizer` with an input embedding row in `encoder`.

    `tokenizer` is a transformers tokenizer and `encoder` a T5 encoder (anything with
    get_input_embeddings/resize_token_embeddings). Returns the token id.
    """
    if placeholder not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [placeholder]})
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    table = encoder.get_input_embeddings().weight
    if token_id >= table.shape[0]:
        mean = table.detach().mean(dim=0)
        encoder.resize_token_embeddings(token_id + 1)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[token_id:] = mean
    return token_id


@torch.no_grad()
def encode_prompts(tokenizer, encoder: nn.Module, prompts: Sequence[str], *, max_length: int,
                   placeholder: str = PLACEHOLDER, prefix_length: int = 4,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the frozen T5 on `prompts`: (features (B, T, C) float32, mask (B, T) bool, placeholder (B, T) bool).

    Prompts are truncated so that the splice (+P-1 rows) still fits `max_length` (the model's text_maxlen):
    a truncated prompt is logged as a warning, and ArboothError is raised when the truncation cuts off
    the placeholder (the image would silently be the one without the subject).
    """
    token_id = tokenizer.convert_tokens_to_ids(placeholder) if placeholder in tokenizer.get_vocab() else None
    if token_id is None and any(placeholder in p for p in prompts):
        raise ArboothError(f"{placeholder} is not a token of this tokenizer; call add_placeholder_token first")
    limit = max_length - (prefix_length - 1)
    warn_truncation(tokenizer, prompts, limit, placeholder_id=token_id, placeholder=placeholder)
    ids_BT, mask_BT, feats_BTC = t5_features(tokenizer, encoder, prompts, max_length=limit, device=device)
    placeholder_BT = (ids_BT == token_id) & mask_BT if token_id is not None else torch.zeros_like(mask_BT)
    return feats_BTC * mask_BT[..., None], mask_BT, placeholder_BT


@torch.no_grad()
def class_noun_features(tokenizer, encoder: nn.Module, class_prompt: str, class_noun: str,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """(C,) mean T5 output feature of the class noun's tokens inside `class_prompt`."""
    noun_ids = tokenizer(class_noun, add_special_tokens=False).input_ids
    tok = tokenizer([class_prompt], return_tensors="pt")
    ids = tok.input_ids[0].tolist()
    starts = [i for i in range(len(ids) - len(noun_ids) + 1) if ids[i:i + len(noun_ids)] == noun_ids]
    if not noun_ids or not starts:
        raise ArboothError(f"class noun {class_noun!r} not found in the class prompt {class_prompt!r}")
    feats = encoder(input_ids=tok.input_ids.to(device),
                    attention_mask=tok.attention_mask.to(device)).last_hidden_state[0].float()
    return feats[starts[-1]:starts[-1] + len(noun_ids)].mean(dim=0)


def init_subject_token(token: SubjectToken, init: Literal["zeros", "class_noun"],
                       class_features_C: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        if init == "zeros":
            token.embedding_PC.zero_()
        elif init == "class_noun":
            if class_features_C is None:
                raise ArboothError("init 'class_noun' needs the class noun's T5 features")
            token.embedding_PC.copy_(class_features_C.expand_as(token.embedding_PC))
        else:
            raise ConfigError(f"unknown <S*> init {init!r}; choose zeros or class_noun")


def instance_prompt(template: str, class_noun: str, placeholder: str = PLACEHOLDER) -> str:
    """"a photo of {token} {cls}" -> "a photo of <S*> dog"."""
    return template.format(token=placeholder, cls=class_noun)
