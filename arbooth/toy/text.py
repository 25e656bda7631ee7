"""Word-level tokenizer of the toy world, as a `transformers` PreTrainedTokenizerFast with T5's conventions.

Built with `tokenizers` over `arbooth.toy.world.vocabulary()`: "<pad>" = 0, "</s>" = 1 (appended to every
prompt, like T5's sentencepiece tokenizer), "<unk>" = 2, then the words. The subject placeholder "<S*>"
is a special token from the start, so `add_placeholder_token` finds it and the toy T5 has an embedding
row for it. Saved with the toy T5 (`save_pretrained`), `AutoTokenizer.from_pretrained` reloads it, so
`arbooth.models.T5TextEncoder` works on the shipped folder as on flan-t5-xl.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from arbooth.adapt.subject_token import PLACEHOLDER
from arbooth.toy.world import vocabulary

if TYPE_CHECKING:  # transformers is imported when a tokenizer is built, not with this module
    from transformers import PreTrainedTokenizerFast

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def word_level_tokenizer(words: Iterable[str], *, split_punctuation: bool = True,
                         model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with T5's conventions: "<pad>" = 0, "</s>" = 1 appended to every prompt,
    "<unk>" = 2 for unknown words, then `words` in order (duplicates once). `split_punctuation` splits
    punctuation off words (`tokenizers` Whitespace); False splits on whitespace only, so a
    placeholder such as "<S*>" stays one piece. The one builder of the toy and tiny text encoders."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  **extra)


def build_toy_tokenizer(placeholder: str = PLACEHOLDER) -> PreTrainedTokenizerFast:
    """The toy world's tokenizer (see the module docstring), with `placeholder` as a special token."""
    fast = word_level_tokenizer(vocabulary(), split_punctuation=False, model_max_length=64)
    fast.add_special_tokens({"additional_special_tokens": [placeholder]})
    return fast


def tokenize_ids(tokenizer: PreTrainedTokenizerFast, prompts: list[str], length: int):
    """(B, length) long ids, padded with 0 and truncated (used by the toy CLIP's text tower)."""
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                     return_tensors="pt").input_ids
