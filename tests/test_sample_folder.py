"""arbooth/sample_folder.py: a sample folder knows what made it, resumes exactly the missing images,
keeps one record per (prompt, seed) and refuses another identity by name (issue 24, scope 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from arbooth.sample_folder import IDENTITY_FILE, SampleFolder, SampleFolderError, file_identity

IDENTITY = {"model": {"name": "a.safetensors", "sha256": "aa" * 32}, "guidance": 3.0, "prompts": ["a {}"]}


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def _fill(sf: SampleFolder, keys) -> None:
    for prompt, seed in sf.missing(keys):
        sf.add(prompt, seed, _image(seed), label=7)


KEYS = [("a {} in the snow", 0), ("a {} in the snow", 1), ("a {} on the beach", 0)]


def test_resume_samples_only_the_missing_and_keeps_one_record_each(tmp_path):
    sf = SampleFolder(tmp_path / "s", IDENTITY)
    assert sf.missing(KEYS) == KEYS
    _fill(sf, KEYS)
    again = SampleFolder(tmp_path / "s", dict(IDENTITY))
    assert again.missing(KEYS) == []
    recs = again.records()
    assert [(r["prompt"], r["seed"]) for r in recs] == sorted(KEYS) and recs[0]["label"] == 7
    assert all(r["path"].is_file() for r in recs)
    # a deleted image and a truncated one are missing, sampled once, and recorded once
    recs[0]["path"].unlink()
    data = recs[1]["path"].read_bytes()
    recs[1]["path"].write_bytes(data[: len(data) // 2])
    assert again.missing(KEYS) == KEYS[:2]  # records are sorted by (prompt, seed), as KEYS is
    assert len(again.records()) == 1 and len(again.records(KEYS)) == 1
    _fill(again, KEYS)
    assert again.missing(KEYS) == []
    lines = (tmp_path / "s" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len({(json.loads(x)["prompt"], json.loads(x)["seed"]) for x in lines}) == 3
    # asking for fewer keys scores only those
    assert [(r["prompt"], r["seed"]) for r in again.records(KEYS[:1])] == KEYS[:1]


def test_another_identity_is_refused_by_name_or_overwritten(tmp_path):
    sf = SampleFolder(tmp_path / "s", IDENTITY)
    _fill(sf, KEYS)
    (tmp_path / "s" / "eval_subject").mkdir()  # a report folder: never removed
    other_model = {**IDENTITY, "model": {"name": "b.safetensors", "sha256": "bb" * 32}}
    named = r"model: a\.safetensors@aaaaaaaaaaaa there, b\.safetensors@bbbbbbbbbbbb now"
    with pytest.raises(SampleFolderError, match=named) as e:
        SampleFolder(tmp_path / "s", other_model)
    assert "guidance" not in str(e.value) and "\n" not in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(SampleFolderError, match=r"guidance: 3\.0 there, 4\.0 now"):
        SampleFolder(tmp_path / "s", {**IDENTITY, "guidance": 4.0})
    with pytest.raises(SampleFolderError, match="prompts: "):
        SampleFolder(tmp_path / "s", {**IDENTITY, "prompts": ["a {}", "b {}"]})
    with pytest.raises(SampleFolderError, match="top_p: null there, 0.9 now"):  # a new key differs too
        SampleFolder(tmp_path / "s", {**IDENTITY, "top_p": 0.9})
    fresh = SampleFolder(tmp_path / "s", other_model, overwrite=True)
    assert fresh.missing(KEYS) == KEYS and fresh.records() == []
    assert not list((tmp_path / "s").rglob("*.png")) and (tmp_path / "s" / "eval_subject").is_dir()
    assert json.loads((tmp_path / "s" / IDENTITY_FILE).read_text())["identity"]["model"]["name"] == "b.safetensors"
    assert SampleFolder.open(tmp_path / "s").identity == fresh.identity


def test_a_legacy_manifest_is_of_unknown_origin(tmp_path):
    (tmp_path / "s" / "prompt_00").mkdir(parents=True)
    _image(0).save(tmp_path / "s" / "prompt_00" / "00.png")
    (tmp_path / "s" / "manifest.jsonl").write_text(json.dumps({"file": "prompt_00/00.png", "prompt": "a {}",
                                                               "seed": 0}) + "\n")
    with pytest.raises(SampleFolderError, match="unknown origin"):
        SampleFolder(tmp_path / "s", IDENTITY)
    SampleFolder(tmp_path / "s", IDENTITY, overwrite=True)
    assert not (tmp_path / "s" / "prompt_00" / "00.png").exists() and not (tmp_path / "s" / "manifest.jsonl").exists()


def test_a_torn_last_line_and_several_writers(tmp_path):
    a = SampleFolder(tmp_path / "s", IDENTITY, writer="rank0")
    b = SampleFolder(tmp_path / "s", IDENTITY, writer="rank1")
    _fill(a, KEYS[:2])
    _fill(b, KEYS[2:])
    with open(tmp_path / "s" / "records-rank1.jsonl", "a") as f:
        f.write('{"prompt": "a {} on the beach", "se')  # a crash in the middle of a line
    merged = SampleFolder(tmp_path / "s", IDENTITY)
    assert merged.missing(KEYS) == [] and len(merged.records()) == 3


def test_file_identity_names_no_absolute_path(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"weights")
    ident = file_identity(tmp_path / "m.bin")
    assert ident["name"] == "m.bin" and str(tmp_path) not in json.dumps(ident) and len(ident["sha256"]) == 64
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "w.safetensors").write_bytes(b"x")
    before = file_identity(tmp_path / "res")
    (tmp_path / "res" / "w.safetensors").write_bytes(b"y")
    assert file_identity(tmp_path / "res") != before and file_identity(None) is None
