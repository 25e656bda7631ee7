"""The toy world: deterministic, held-out appearance, captions match attributes, subject folders."""
import json

import numpy as np
import pytest

from arbooth.data.subject import load_subject
from arbooth.errors import ConfigError
from arbooth.toy.text import EOS_ID, build_toy_tokenizer
from arbooth.toy.world import (
    COLOURS,
    DEMO_SUBJECT,
    ToyAttributes,
    ToyWorld,
    caption,
    images_to_array,
    render,
    vocabulary,
    write_subject,
)


def test_items_are_a_pure_function_of_seed_and_index():
    a, b = ToyWorld(3, 32), ToyWorld(3, 32)
    np.testing.assert_array_equal(images_to_array([a[17], a[5]]), images_to_array([b[17], b[5]]))
    assert a[17].caption == b[17].caption and a[17].attrs == b[17].attrs
    assert not np.array_equal(images_to_array([a[17]]), images_to_array([ToyWorld(4, 32)[17]]))
    assert a[0].image.size == (32, 32) and ToyWorld(0, 48)[0].image.size == (48, 48)


def test_excluded_appearance_never_occurs_and_captions_only_name_true_attributes():
    world = ToyWorld(0, 16, exclude=[("star", "dotted")], p_texture=0.9)
    seen = set()
    for i in range(400):
        attrs, parts = world.attributes(i)
        seen.add((attrs.shape, attrs.texture))
        words = caption(attrs, parts).split()
        assert attrs.shape in words and attrs.colour != attrs.background
        if "colour" in parts:
            assert words[words.index(attrs.shape) - 1 - (attrs.texture != "plain" and "texture" in parts)] == attrs.colour
        if "background" in parts:
            assert words[-2] == attrs.background
        assert set(words) <= set(vocabulary())
    assert ("star", "dotted") not in seen and ("star", "striped") in seen and ("heart", "dotted") in seen


def test_render_shows_the_colours_asked_for():
    attrs = ToyAttributes("square", "red", background="blue", size="big")
    arr = np.asarray(render(attrs, 32)).reshape(-1, 3)
    assert (np.abs(arr - COLOURS["red"]).sum(1) < 10).mean() > 0.3
    assert (np.abs(arr - COLOURS["blue"]).sum(1) < 10).mean() > 0.3
    dotted = np.asarray(render(ToyAttributes("square", "red", "dotted", "yellow", "big", "blue"), 32)).reshape(-1, 3)
    assert (np.abs(dotted - COLOURS["yellow"]).sum(1) < 60).mean() > 0.03


def test_bad_attributes_are_clear_errors():
    with pytest.raises(ConfigError, match="shape"):
        ToyAttributes("hexagon", "red")
    with pytest.raises(ConfigError, match="colour"):
        ToyAttributes("star", "teal")


def test_tokenizer_is_word_level_with_eos_and_placeholder():
    tok = build_toy_tokenizer()
    ids = tok("a small red star on a blue background").input_ids
    assert ids[-1] == EOS_ID and len(ids) == 9 and tok.unk_token_id not in ids
    with_token = tok("a <S*> star").input_ids
    assert len(with_token) == 4 and with_token[1] == tok.convert_tokens_to_ids("<S*>")
    assert tok("a zebra").input_ids[1] == tok.unk_token_id


def test_write_subject_is_a_readable_subject_folder(tmp_path):
    folder = write_subject(tmp_path / "s", n=4)
    data = load_subject(folder, 32)
    assert len(data) == 4 and data.info.class_noun == DEMO_SUBJECT.shape and data.info.prompts
    assert json.loads((folder / "attributes.json").read_text())["texture"] == "dotted"
