"""Random-weight extractors, built once per session (real timm / open_clip / lpips networks)."""
from __future__ import annotations

import pytest

from arbooth.metrics.extractors import DinoViT, OpenClip, build_lpips


@pytest.fixture(scope="session")
def dino() -> DinoViT:
    return DinoViT(weights=None)


@pytest.fixture(scope="session")
def clip() -> OpenClip:
    return OpenClip(weights=None)


@pytest.fixture(scope="session")
def lpips_fn():
    return build_lpips(backbone_weights=None)
