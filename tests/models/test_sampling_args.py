"""Per-image seeds and range-checked sampling arguments in the Python API (issue 19.1, 19.4)."""
from __future__ import annotations

import math

import pytest
import torch

from arbooth.errors import ConfigError
from arbooth.models.sampling import check_sampling_args, seed_generators
from arbooth.toy.tiny import build_tiny_var


@pytest.fixture(scope="module")
def var():
    return build_tiny_var(seed=0)


@pytest.mark.parametrize("more_smooth", [False, True])
def test_var_image_depends_only_on_its_seed(var, more_smooth):
    labels, seeds = [1, 4, 2, 1], [5, 6, 7, 8]
    batch = var.generate(labels, seed=seeds, more_smooth=more_smooth)
    for b in range(4):
        alone = var.generate(labels[b:b + 1], seed=seeds[b:b + 1], more_smooth=more_smooth)[0]
        assert (batch[b] - alone).abs().max() < 1e-4, b  # float noise of batched decoding; another token moves pixels by >> 1/255
    assert not torch.equal(batch[0], batch[3])  # same class, different seeds
    assert torch.equal(var.generate([1, 4], seed=0), var.generate([1, 4], seed=0))  # int seed: as before


def test_var_generate_range_checks(var):
    for kwargs, msg in (({"top_p": 1.5}, "top_p must be in"), ({"top_p": -0.5}, "top_p must be in"),
                        ({"top_k": -3}, "top_k must be"), ({"top_k": 2.5}, "top_k must be"),
                        ({"cfg": -1.0}, "cfg must be"), ({"cfg": math.inf}, "cfg must be"),
                        ({"seed": [1, 2, 3]}, "3 seeds for 2")):
        with pytest.raises(ConfigError, match=msg):
            var.generate([1, 4], **kwargs)
    var.generate([1], top_k=0, top_p=0.0, cfg=0.0)  # 0 = off, at the edges of the ranges
    var.generate([1], top_p=1.0)


def test_check_sampling_args_ranges():
    check_sampling_args(top_k=0, top_p=1.0, cfg=[1.0, 4.0], tau=[0.5, 1.0])
    for kwargs in ({"tau": 0.0}, {"tau": [0.5, -1.0]}, {"tau": float("nan")}, {"cfg": []}, {"top_k": True},
                   {"top_p": float("nan")}):
        with pytest.raises(ConfigError):
            check_sampling_args(**kwargs)
    with pytest.raises(ConfigError, match="^teacher: top_p"):
        check_sampling_args(top_p=2.0, where="teacher")
    gens = seed_generators([3, 4], 2, "cpu")
    assert [torch.rand(1, generator=g).item() for g in gens] == \
        [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in (3, 4)]
