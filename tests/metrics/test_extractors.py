"""Extractors load local weight files and name the file to fetch when it is absent."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from arbooth.errors import CheckpointError
from arbooth.metrics.extractors import (
    DinoViT,
    InceptionFID,
    TinyFIDNet,
    _dino_pos_embed,
    build_lpips,
    find_weights,
)


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
    if importlib.util.find_spec("torch_fidelity") is not None:
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


def test_fid_inception_pool_and_spatial_features():
    pytest.importorskip("torch_fidelity")
    net = InceptionFID(weights=None, spatial=True)  # the real architecture, random weights
    with torch.no_grad():
        out = net(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 7 * 17 * 17)
    assert not net.net.Mixed_6d.branch1x1.conv._forward_hooks  # the hook lives for one call only


def test_dino_forward_matches_timm_at_224_and_dino_resampling_at_256(dino):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dino(x), dino.model(x), rtol=1e-5, atol=1e-5)  # token assembly
        # At 256 the official hub model's resampling (scale factor 16.1/14) differs from timm's.
        x256 = torch.randn(1, 3, 256, 256)
        ours, timms = dino(x256), dino.model(x256)
    assert ours.shape == (1, 384) and not torch.allclose(ours, timms, atol=1e-6)
    pos = _dino_pos_embed(dino.model.pos_embed, 16, 16)
    # Reference: dino vision_transformer.py interpolate_pos_encoding, written out independently.
    p = dino.model.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(p, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic")
    torch.testing.assert_close(pos[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, -1))
