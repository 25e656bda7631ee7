"""A tiny random T5 text encoder with a word-level tokenizer, built in memory (no download).

Used by `train_subject.py --tiny`, the tests and the CPU benchmark, so that the whole ARBooth
recipe runs end to end without any checkpoint. The tokenizer is a `transformers`
PreTrainedTokenizerFast over a fixed word list (unknown words map to <unk>), with T5's
conventions: pad id 0, eos "</s>" appended to every prompt.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

_WORDS = ["a", "an", "the", "of", "photo", "picture", "in", "on", "with", "and", "at", "top", "wearing", "is", "dog", "cat", "teapot", "toy", "vase", "clock", "sunglasses", "statue", "barn", "bear", "duck", "monster", "elephant", "red", "blue", "green", "pink", "black", "brown", "white", "jungle", "snow", "beach", "street", "fabric", "table", "grass", "city", "water", "floor", "santa", "hat", "sitting", "purple", "rainbow"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_t5(channels: int = 32, *, seed: int = 0) -> tuple[PreTrainedTokenizerFast, T5EncoderModel]:
    """(tokenizer, encoder) with `channels`-wide outputs, random weights from `seed`, eval mode, frozen."""
    tokenizer = build_tiny_tokenizer()
    config = T5Config(vocab_size=len(tokenizer) + 8, d_model=channels, d_kv=8, d_ff=2 * channels,
                      num_layers=1, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(config).eval().requires_grad_(False)
    return tokenizer, encoder
