"""`model.preset=infinity_8b` end to end: the real loading path of the 8B release (a sharded weights folder, a
spatial-patchify BSQ-VAE `.pth`, a T5 folder) on a tiny random model of the 8B family (the release's switches,
small sizes through `model.model_kwargs` / `model.vae_kwargs`), then `arbooth generate` from the result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _infinity_8b_tiny import MODEL_KW, VAE_KW, write_sharded
from PIL import Image

from arbooth.adapt.personalization import load_personalization
from arbooth.config import load_config
from arbooth.models.bsq_vae import BSQVAE, official_vae_state_dict
from arbooth.models.infinity import Infinity
from arbooth.models.infinity_loading import official_state_dict
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import check_config
from arbooth.toy.tiny import build_tiny_t5

ROOT = Path(__file__).resolve().parents[2]


def _write_8b_style_files(root: Path) -> None:
    torch.manual_seed(0)
    vae = BSQVAE(**{**VAE_KW, "ch_mult": tuple(VAE_KW["ch_mult"])}).eval()
    model = Infinity(vae, **MODEL_KW).eval()
    torch.save({"vae": official_vae_state_dict(vae)}, root / "vae.pth")
    write_sharded(root / "weights", official_state_dict(model), 2)
    tokenizer, encoder = build_tiny_t5(MODEL_KW["text_channels"])
    tokenizer.save_pretrained(root / "t5")
    encoder.save_pretrained(root / "t5")


def test_shipped_8b_config_loads_and_checks() -> None:
    """configs/subject/infinity_8b.yaml is a valid config of the registered preset (13 scales at 1M)."""
    cfg = load_config(SubjectTrainConfig, ROOT / "configs" / "subject" / "infinity_8b.yaml", [])
    assert cfg.model.preset == "infinity_8b" and len(check_config(cfg)) == 13


def test_train_subject_and_generate_on_a_tiny_8b_style_model(toy_subject_dir: Path, tmp_path: Path) -> None:
    _write_8b_style_files(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    args = [sys.executable, str(ROOT / "train_subject.py"), "--subject", str(toy_subject_dir), "--class-noun", "dog",
            "--model-ckpt", str(tmp_path / "weights"), "--vae-ckpt", str(tmp_path / "vae.pth"),
            "--t5", str(tmp_path / "t5"), "--out", str(out), "model.preset=infinity_8b", "model.pn=0.06M",
            f"model.model_kwargs={json.dumps(MODEL_KW)}", f"model.vae_kwargs={json.dumps(VAE_KW)}",
            "model.tuned_dtype=fp32", "dtype=fp32", "device=cpu", "steps=2", "batch_size=1", "validate_every=0",
            "save_every=0", "prompts.validation=[]"]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    pers = load_personalization(out / "personalization.safetensors")
    assert "weights sha256=" in pers.metadata["base_model"]  # the sharded folder's id
    assert pers.subject_token_PC.abs().sum() > 0
    png = tmp_path / "dog.png"
    r = subprocess.run([sys.executable, "-m", "arbooth.cli", "generate", "--personalization",
                        str(out / "personalization.safetensors"), "--prompt", "a <S*> dog on the beach",
                        "--dtype", "fp32", "--out", str(png)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(png).size == (256, 256)  # 0.06M: a 16 x 16 token map, 16 px per token


def test_every_missing_release_file_is_named_in_one_line(tmp_path: Path) -> None:
    """All three missing files in one error, before any is read (a new-user trial saw only the first)."""
    import pytest

    from arbooth.errors import CheckpointError
    from arbooth.subject_bases import ModelConfig, build_models

    (tmp_path / "t5").mkdir()
    cfg = ModelConfig(preset="infinity_8b", model_ckpt=str(tmp_path / "w"), vae_ckpt=str(tmp_path / "v.pth"),
                      t5=str(tmp_path / "t5"))
    with pytest.raises(CheckpointError, match=r"not found: model.model_ckpt=.*w, model.vae_ckpt=.*v.pth \(preset"):
        build_models(cfg)
