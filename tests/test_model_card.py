"""Model cards (arbooth/model_card.py): front matter that huggingface_hub reads back, no local paths."""
from __future__ import annotations

from huggingface_hub import ModelCard
from PIL import Image

from arbooth.model_card import shareable, write_model_card


def test_card_front_matter_parses_and_holds_no_absolute_path(tmp_path):
    grid = tmp_path / "elsewhere" / "g.png"
    grid.parent.mkdir()
    Image.new("RGB", (8, 8)).save(grid)
    out = tmp_path / "result"
    path = write_model_card(out, title="t", summary="s", base_model=str(tmp_path / "weights" / "var_d16.pth"),
                            base_sha256="ab" * 32, method="lora", adapter=True, tags=["var"],
                            prompts=["a <S*> dog"], grid=grid, metrics={"fid": 12.345678},
                            privacy={"epsilon": 1.5, "delta": 1e-3})
    card = ModelCard.load(path)
    d = card.data.to_dict()
    assert d["library_name"] == "arbooth" and d["base_model"] == "var_d16.pth"
    assert {"peft", "lora", "differential-privacy"} <= set(d["tags"])
    assert d["epsilon"] == 1.5 and d["delta"] == 1e-3 and d["base_model_sha256"] == "ab" * 32
    assert (out / "grid.png").is_file() and "![samples](grid.png)" in card.text
    assert str(tmp_path) not in path.read_text()


def test_shareable_cuts_absolute_paths_only():
    assert shareable({"a": "/home/u/w/x.pth", "b": ["rel/y.pth", 3], "c": "text"}) == \
        {"a": "x.pth", "b": ["rel/y.pth", 3], "c": "text"}
