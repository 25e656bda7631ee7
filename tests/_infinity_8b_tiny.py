"""A tiny model of the Infinity-8B family (spatial-patchify BSQ-VAE, the release's switches, small sizes) and a
writer of sharded checkpoint folders in the layout transformers' `save_pretrained` writes: shared by the 8B
loading tests (tests/models/test_infinity_sharded.py) and the recipe's 8B test (tests/recipes)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from arbooth.models.infinity_loading import INDEX_NAMES

VAE_KW = {"codebook_dim": 4, "base_ch": 32, "num_res_blocks": 1, "ch_mult": [1, 1, 1, 1], "patch_size": 8,
          "spatial_patchify": True}
MODEL_KW = {"depth": 4, "embed_dim": 64, "num_heads": 4, "text_channels": 128, "text_maxlen": 16, "block_chunks": 2}



def write_sharded(folder, sd: dict[str, torch.Tensor], n_shards: int, kind: str = "safetensors") -> dict:
    """`sd` split into `n_shards` files with the index transformers' save_pretrained writes."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, weight_map = list(sd), {}
    for i in range(n_shards):
        name = (f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" if kind == "safetensors"
                else f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin")
        part = {k: sd[k].contiguous().clone() for k in keys[i::n_shards]}
        save_file(part, str(folder / name)) if kind == "safetensors" else torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (folder / INDEX_NAMES[0 if kind == "safetensors" else 1]).write_text(json.dumps(index))
    return weight_map
