import pytest
import torch

from arbooth.checkpoint import (
    check_file_hashes,
    file_sha256,
    read_state_dict,
    save_safetensors,
    save_torch,
    state_dict_mismatch,
)
from arbooth.errors import CheckpointError


def test_roundtrip_formats(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_safetensors(sd, tmp_path / "m.safetensors", metadata={"k": "v"})
    save_torch(sd, tmp_path / "m.pth")
    save_torch({"model": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("m.safetensors", "m.pth", "wrapped.pth"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_read_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="folder"):
        read_state_dict(tmp_path)


def test_mismatch_report():
    expected = {"a": (2, 2), "b": (3,), "c": (1,)}
    got = {"a": torch.zeros(2, 2), "b": torch.zeros(4), "x": torch.zeros(1), "buf": torch.zeros(1)}
    report = state_dict_mismatch(expected, got, ignore={"buf"})
    assert "1 missing: c" in report and "1 unexpected: x" in report and "b: checkpoint (4,) vs model (3,)" in report
    assert state_dict_mismatch({"a": (2, 2)}, {"a": torch.zeros(2, 2)}) is None


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.ones(1)}, path)
    shared = torch.zeros(2)
    with pytest.raises(Exception, match="share memory"):  # safetensors refuses aliased tensors mid-write
        save_safetensors({"a": shared, "b": shared}, path)
    assert torch.equal(read_state_dict(path)["a"], torch.ones(1))
    assert not list(tmp_path.glob("*.tmp"))


def test_check_file_hashes_refuses_a_changed_or_missing_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"weights")
    hashes = {"a.bin": file_sha256(tmp_path / "a.bin")}
    check_file_hashes(tmp_path, hashes, "toy.json")  # matches: no error
    (tmp_path / "a.bin").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="a.bin is missing or does not match the sha256 in toy.json"):
        check_file_hashes(tmp_path, hashes, "toy.json")
    with pytest.raises(CheckpointError, match="b.bin"):
        check_file_hashes(tmp_path, {"b.bin": hashes["a.bin"]}, "toy.json")
