"""T5 text encoder for Infinity: `transformers`' T5EncoderModel + tokenizer from a local folder or
the Hugging Face cache (never downloads), giving padded features and a bool mask of real tokens.

The release (tools/run_infinity.py encode_prompt) tokenizes with max_length 512 and truncation and
uses the encoder's last hidden state in fp32. We pad to the longest prompt instead of to 512: T5
masks padded keys, so the real tokens' features are the same.
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from arbooth.errors import ArboothError, CheckpointError
from arbooth.precision import torch_dtype

log = logging.getLogger(__name__)
DEFAULT_T5 = "google/flan-t5-xl"
_HOW_TO_GET = (f"download {DEFAULT_T5} (about 11 GB), e.g. `huggingface-cli download {DEFAULT_T5} "
               f"--local-dir weights/flan-t5-xl`, and pass that folder")


class T5TextEncoder(nn.Module):
    """`path`: a folder from `save_pretrained`, or a hub name already in the local HF cache.

    `dtype` ('fp32', 'bf16', 'fp16') is the encoder's weight dtype; features come back in fp32.
    `cache_size` > 0 keeps that many encoded prompts (CPU copies), most recent first.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_T5, *, dtype: str = "fp32", device: str | torch.device = "cpu",
                 max_length: int = 512, cache_size: int = 0):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel  # heavy import, only when used

        folder = Path(path).expanduser()
        if folder.is_dir():
            source = str(folder)
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # a hub name: the local HF cache only
            source = str(path)
        else:
            raise CheckpointError(f"T5 encoder folder {path} does not exist. To get it, {_HOW_TO_GET}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, legacy=True)
            self.encoder = T5EncoderModel.from_pretrained(source, local_files_only=True,
                                                          torch_dtype=torch_dtype(dtype))
        except OSError as e:
            raise CheckpointError(f"cannot load a T5 encoder from {source!r} ({type(e).__name__}). "
                                  f"To get it, {_HOW_TO_GET}") from e
        self.encoder.to(device).eval().requires_grad_(False)
        self.max_length, self.cache_size = max_length, cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def _encode(self, prompts: list[str]) -> list[torch.Tensor]:
        warn_truncation(self.tokenizer, prompts, self.max_length)
        _, mask_BT, feats_BTC = t5_features(self.tokenizer, self.encoder, prompts, max_length=self.max_length,
                                            device=self.device)
        return [f[: int(m.sum())] for f, m in zip(feats_BTC, mask_BT)]

    def forward(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (features (B, T, dim) fp32, zero-padded; mask (B, T) bool of real tokens)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        fresh = dict(zip(todo, self._encode(todo))) if todo else {}
        rows = [fresh[p] if p in fresh else self._cache[p].to(self.device) for p in prompts]
        if self.cache_size > 0:
            for p, f in fresh.items():
                self._cache[p] = f.cpu()
            for p in prompts:
                self._cache.move_to_end(p)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        T = max(r.shape[0] for r in rows)
        feats = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
        mask = torch.zeros(len(rows), T, dtype=torch.bool, device=feats.device)
        for i, r in enumerate(rows):
            feats[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return feats, mask

    encode = forward


@torch.no_grad()
def t5_features(tokenizer, encoder: nn.Module, prompts: Sequence[str], *, max_length: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one T5 encode step (T5TextEncoder and ARBooth's `encode_prompts`, arbooth/adapt/subject_token.py):
    tokenize padded to the longest prompt and cut at `max_length` tokens, run the encoder, and return
    (token ids (B, T), mask (B, T) bool of real tokens, last hidden state (B, T, C) fp32, as the release's
    encode_prompt). Padded rows hold the encoder's output for padding: mask them where it matters."""
    tok = tokenizer(list(prompts), max_length=max_length, padding="longest", truncation=True, return_tensors="pt")
    ids_BT, mask_BT = tok.input_ids.to(device), tok.attention_mask.to(device)
    feats_BTC = encoder(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.float()
    return ids_BT, mask_BT.bool(), feats_BTC


def warn_truncation(tokenizer, prompts: Sequence[str], limit: int, *, placeholder_id: int | None = None,
                    placeholder: str = "<S*>") -> None:
    """Log a warning for every prompt longer than `limit` tokens (the text encoder keeps the first
    `limit`, end-of-sequence token included); ArboothError when the cut removes `placeholder_id`."""
    full = tokenizer(list(prompts), truncation=False).input_ids
    cut = tokenizer(list(prompts), truncation=True, max_length=limit).input_ids
    for prompt, ids, kept in zip(prompts, full, cut, strict=True):
        if len(ids) <= limit:
            continue
        if placeholder_id is not None and placeholder_id in ids and placeholder_id not in kept:
            raise ArboothError(f"prompt of {len(ids)} tokens is cut to {limit}, which removes {placeholder} "
                               f"(token {ids.index(placeholder_id) + 1}): shorten it or move {placeholder} "
                               f"earlier: {prompt!r}")
        log.warning("prompt of %d tokens truncated to the text encoder's %d: %r", len(ids), limit, prompt)
