"""Extractors load local weight files and name the file to fetch when it is absent."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from arbooth.errors import CheckpointError
from arbooth.metrics.extractors import DinoViT, InceptionFID, TinyFIDNet, build_lpips, find_weights


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    # Point both caches at empty folders so "default" cannot find anything on this machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_missing_default_weights_name_the_file(empty_caches):
    with pytest.raises(CheckpointError, match="alexnet-owt-7be5be79.pth"):
        build_lpips()
    with pytest.raises(CheckpointError, match="dino_deitsmall16_pretrain.pth|vit_small_patch16_224.dino"):
        DinoViT()
    with pytest.raises(CheckpointError, match="weights-inception-2015-12-05"):
        InceptionFID()
    with pytest.raises(CheckpointError, match="not found"):
        find_weights(empty_caches / "nope.pth", what="x")
    assert find_weights(None, what="x") is None


def test_torch_hub_cache_is_found(empty_caches):
    path = empty_caches / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert find_weights("default", what="x", hub_filename=path.name) == path


def test_lpips_backbone_loads_from_local_file(tmp_path):
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(alex.state_dict(), path)
    model = build_lpips(path)
    assert model.pretrained
    torch.testing.assert_close(model.net.slice1[0].weight, alex.features[0].weight)
    torch.testing.assert_close(model.net.slice5._modules["10"].weight, alex.features[10].weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="AlexNet"):
        build_lpips(tmp_path / "bad.pth")


def test_dino_loads_from_local_file(tmp_path, dino):
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in dino.model.state_dict().items()}, path)
    loaded = DinoViT(path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), dino(x))
        assert loaded(torch.randn(1, 3, 256, 256)).shape == (1, 384)  # resampled position embedding


def test_clip_towers(clip):
    with torch.no_grad():
        img = clip.encode_image(torch.randn(2, 3, 224, 224))
        txt = clip.encode_text(["a dog", "a photo of a cat"])
    assert img.shape == (2, 512) and txt.shape == (2, 512)
    assert not clip.pretrained


def test_tiny_fid_net_interface():
    net = TinyFIDNet(dim=16)
    out = net(torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8))
    assert out["pool"].shape == (2, 16) and net.feature_id
