"""<S*> splice against the authors' tensors in arbooth_tiny.pt, and prompt encoding with a tiny T5."""
from __future__ import annotations

import pytest
import torch
from _golden import arbooth_golden, golden_arbooth

from arbooth.adapt.subject_token import (
    PLACEHOLDER,
    SubjectToken,
    add_placeholder_token,
    class_noun_features,
    encode_prompts,
    init_subject_token,
    instance_prompt,
    pack_text,
    splice_subject_token,
)
from arbooth.errors import ArboothError
from arbooth.toy.tiny import build_tiny_t5


def test_splice_matches_the_authors() -> None:
    """Against the fork's training splice (booth_train_final.py) in tests/golden/arbooth_tiny.safetensors."""
    config, g = arbooth_golden()
    txt = config["text"]
    _vae, _model, token_PC = golden_arbooth(config)
    placeholder_BT = g["input_ids"] == txt["special_token_id"]
    assert placeholder_BT.nonzero()[:, 1].tolist() == txt["placeholder_pos"]
    mask_BT = g["attention_mask"].bool()
    out_BTC, out_mask_BT = splice_subject_token(g["text_features"], mask_BT, placeholder_BT, token_PC)
    packed, lens = pack_text(out_BTC, out_mask_BT)
    assert lens == txt["lens_after_splice"] and out_BTC.shape[1] == max(txt["lens_after_splice"])
    torch.testing.assert_close(packed, g["kv_compact"], rtol=0, atol=0)


def test_splice_is_differentiable_and_leaves_other_prompts_alone() -> None:
    tok = SubjectToken(3, 4)
    torch.nn.init.normal_(tok.embedding_PC)
    text = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    ph = torch.zeros(2, 5, dtype=torch.bool)
    ph[0, 1] = True
    out, out_mask = tok(text, mask, ph)
    assert out.shape == (2, 6, 4) and out_mask.sum(1).tolist() == [6, 3]
    assert torch.equal(out[0, 1:4], tok.embedding_PC.detach()) and torch.equal(out[0, 4:6], text[0, 2:4])
    assert torch.equal(out[1, :3], text[1, :3]) and not out[1, 3:].any()
    out.sum().backward()
    assert torch.equal(tok.embedding_PC.grad, torch.ones(3, 4))
    ph[0, 2] = True
    with pytest.raises(ArboothError, match="at most once"):
        tok(text, mask, ph)


def test_encode_prompts_with_tiny_t5() -> None:
    tokenizer, encoder = build_tiny_t5(16)
    token_id = add_placeholder_token(tokenizer, encoder)
    assert token_id < encoder.get_input_embeddings().weight.shape[0]  # spare row used, no resize
    assert add_placeholder_token(tokenizer, encoder) == token_id  # idempotent
    prompts = [instance_prompt("a photo of {token} {cls}", "dog"), "a photo of dog"]
    assert prompts[0] == f"a photo of {PLACEHOLDER} dog"
    feats, mask, ph = encode_prompts(tokenizer, encoder, prompts, max_length=16)
    assert feats.shape == (2, 6, 16) and mask.sum(1).tolist() == [6, 5] and ph.nonzero().tolist() == [[0, 3]]
    token = SubjectToken(4, 16)
    cls = class_noun_features(tokenizer, encoder, prompts[1], "dog")
    torch.testing.assert_close(cls, feats[1, 3])  # "dog" is one token at position 3
    init_subject_token(token, "class_noun", cls)
    spliced, smask = token(feats, mask, ph)
    assert smask.sum(1).tolist() == [9, 5] and torch.equal(spliced[0, 3:7], cls.expand(4, -1))
    init_subject_token(token, "zeros")
    assert not token.embedding_PC.any()
    with pytest.raises(ArboothError, match="not found"):
        class_noun_features(tokenizer, encoder, prompts[1], "teapot")


def test_placeholder_gets_a_row_when_the_table_is_full() -> None:
    tokenizer, encoder = build_tiny_t5(8)
    encoder.resize_token_embeddings(len(tokenizer))
    token_id = add_placeholder_token(tokenizer, encoder)
    table = encoder.get_input_embeddings().weight
    assert table.shape[0] == token_id + 1
    torch.testing.assert_close(table[token_id], table[:token_id].mean(0))


def test_placeholder_missing_from_tokenizer_is_an_error() -> None:
    tokenizer, encoder = build_tiny_t5(8)
    with pytest.raises(ArboothError, match="add_placeholder_token"):
        encode_prompts(tokenizer, encoder, [f"a {PLACEHOLDER} dog"], max_length=16)


def test_truncation_warns_and_never_drops_the_placeholder(caplog) -> None:
    """Issue 18.6: a 44-token prompt with <S*> at token 41, text length 32 (prefix 4: 29 tokens fit):
    the image equalled the one without <S*>, silently. Right: an error naming the cut; a long prompt
    whose <S*> survives the cut is only warned about."""
    tokenizer, encoder = build_tiny_t5(16)
    add_placeholder_token(tokenizer, encoder)
    words = ["dog"] * 43  # + </s> = 44 tokens
    late = " ".join(words[:40] + [PLACEHOLDER] + words[41:])
    assert len(tokenizer(late).input_ids) == 44 and tokenizer(late).input_ids[40] == tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    with pytest.raises(ArboothError, match=r"44 tokens is cut to 29, which removes <S\*> \(token 41\)"):
        encode_prompts(tokenizer, encoder, ["a dog", late], max_length=32, prefix_length=4)
    early = " ".join(words[:2] + [PLACEHOLDER] + words[3:])
    with caplog.at_level("WARNING"):
        _, mask, ph = encode_prompts(tokenizer, encoder, [early], max_length=32, prefix_length=4)
    assert "44 tokens truncated to the text encoder's 29" in caplog.text
    assert mask.sum() == 29 and ph.sum() == 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        encode_prompts(tokenizer, encoder, ["a <S*> dog"], max_length=32, prefix_length=4)
    assert "truncated" not in caplog.text  # short prompts: no warning


def test_personalization_encode_at_exactly_the_text_length(caplog) -> None:
    """Mutant caught (issue 28): the truncation limit one off. Text length 32, prefix 4: a prompt of exactly
    29 tokens fits whole and splices to exactly 32 rows; one token more is cut (warned) back to 32."""
    from arbooth.adapt.personalization import Personalization

    tokenizer, encoder = build_tiny_t5(16)
    pers = Personalization({}, torch.randn(4, 16), {"placeholder": PLACEHOLDER})
    for n_tokens, warned in ((29, False), (30, True)):
        words = [PLACEHOLDER] + ["dog"] * (n_tokens - 2)  # + </s>
        prompt = " ".join(words)
        add_placeholder_token(tokenizer, encoder)
        assert len(tokenizer(prompt).input_ids) == n_tokens
        caplog.clear()
        with caplog.at_level("WARNING"):
            text, mask = pers.encode(tokenizer, encoder, [prompt], max_length=32)
        assert ("truncated" in caplog.text) == warned, n_tokens
        assert text.shape[1] == 32 and int(mask.sum()) == 32
        assert torch.equal(text[0, :4], pers.subject_token_PC)
