"""train-class recipe on a tiny VAR and a tiny PNG dataset: learning, frozen sets, exact resume,
adapter round trip, config validation."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _class_tiny import tiny_config, write_dataset

from arbooth.adapt.finetuned import build_vae_var, load_finetuned
from arbooth.adapt.methods import unwrap_peft
from arbooth.config import from_dict, load_config
from arbooth.errors import ConfigError
from arbooth.models.var_training import drop_labels, encode_batch, var_loss
from arbooth.recipes.class_config import ClassTrainConfig
from arbooth.recipes.train_class import train

ROOT = Path(__file__).resolve().parents[2]
LR = {"fft": 2e-3, "lora": 1e-2, "lora_attn": 1e-2, "lora_mlp": 1e-2, "lntuning": 1e-2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cls_data"))


def _base_name(n: str) -> str:
    """Name of a peft-wrapped parameter in the plain model (None for adapter parameters)."""
    n = n.removeprefix("base_model.model.")
    return None if ("lora_" in n or "ln_tuning_layers" in n) else n.replace(".base_layer.", ".")


@pytest.mark.parametrize("method", ["fft", "lora", "lntuning", "lora_attn"])
def test_loss_falls_and_only_the_method_parameters_change(method, data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", method, train={"max_steps": 14}, optim={"lr": LR[method]})
    run = train(cfg)
    losses = [h["loss"] for h in run.history]
    assert len(losses) == 14 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.15, losses
    torch.manual_seed(cfg.train.seed)
    vae0, var0 = build_vae_var(cfg.model)  # the same random initialisation as the run
    before = dict(var0.named_parameters())
    model = unwrap_peft(run.accelerator.unwrap_model(run.model))
    changed, frozen_checked = 0, 0
    for n, p in model.named_parameters():
        base = _base_name(n) if method != "fft" else n
        if base is None:
            continue
        if method == "fft":
            changed += not torch.equal(p, before[base])
        else:  # every base parameter stays bit-identical
            assert torch.equal(p, before[base]), n
            frozen_checked += 1
    assert changed > 0 if method == "fft" else frozen_checked == len(before)
    for (n, p), p0 in zip(run.vae.state_dict().items(), vae0.state_dict().values()):
        assert torch.equal(p, p0), n  # the tokenizer never trains


def test_resume_continues_exactly(data_root, tmp_path):
    over = {"train": {"max_steps": 4, "grad_accum": 2, "checkpoint_every": 2}, "optim": {"lr": 1e-2}}
    full = train(tiny_config(data_root, tmp_path / "full", "lora", **over))
    cfg = tiny_config(data_root, tmp_path / "split", "lora", **over)
    first = train(cfg, stop_at=2)
    assert (tmp_path / "split" / "checkpoints" / "step_00000002" / "train_state.pt").is_file()
    assert not (tmp_path / "split" / "final").exists()
    second = train(cfg, resume="auto")
    assert [h["loss"] for h in first.history + second.history] == [h["loss"] for h in full.history]
    a = dict(full.accelerator.unwrap_model(full.model).named_parameters())
    b = dict(second.accelerator.unwrap_model(second.model).named_parameters())
    for n, p in a.items():
        assert torch.equal(p, b[n]), n
    assert (tmp_path / "split" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "lntuning", "fft"])
def test_saved_result_reloads_with_the_same_logits(method, data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", method, train={"max_steps": 3}, optim={"lr": LR[method]})
    run = train(cfg)
    final = tmp_path / "run" / "final"
    expected = {"fft": {"transformer.safetensors"},
                "lora": {"adapter_model.safetensors", "adapter_config.json"},
                "lntuning": {"adapter_model.safetensors", "adapter_config.json"}}[method]
    assert {p.name for p in final.iterdir()} == expected | {"arbooth.yaml", "README.md"}  # README: the model card
    model = run.accelerator.unwrap_model(run.model).eval()
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    idx_BL, x_BLCv = encode_batch(run.vae, img)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(labels, x_BLCv)
        res = load_finetuned(final, merge=False)
        assert res.method == method and res.step == 3 and res.classes == ("class_0", "class_1")
        assert torch.equal(res.var(labels, x_BLCv), ref)
        merged = load_finetuned(final).var
        assert type(merged).__name__ == "VAR"
        assert torch.allclose(merged(labels, x_BLCv), ref, atol=1e-5)
    assert float(var_loss(ref, idx_BL)) > 0


def test_loss_pieces():
    logits = torch.randn(3, 5, 7)
    idx = torch.randint(0, 7, (3, 5))
    per = var_loss(logits, idx, reduction="none")
    assert per.shape == (3,)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), idx.reshape(-1))
    assert torch.allclose(var_loss(logits, idx), ce, atol=1e-6)  # uniform 1/L weights = token mean
    assert torch.allclose(var_loss(logits, idx, reduction="sum"), per.sum())
    labels = torch.arange(1000) % 10
    dropped = drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert 0.07 < frac < 0.13 and torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert torch.equal(dropped, drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0)))


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ClassTrainConfig, {"optim": {"lrr": 1e-4}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ClassTrainConfig, {"trian": {}})
    with pytest.raises(ConfigError, match="method.name"):
        from_dict(ClassTrainConfig, {"method": {"name": "dora"}})
    with pytest.raises(ConfigError, match="image_size"):
        from_dict(ClassTrainConfig, {"data": {"image_size": 224}})
    # YAML 1.1 (PyYAML) reads "1e-4" as a string: write 1.0e-4 (config.py note in the report)
    cfg = load_config(ClassTrainConfig, None, ["optim.lr=1.0e-4", "method.name=lntuning"])
    assert cfg.optim.lr == 1e-4 and cfg.method.name == "lntuning"


def test_shipped_configs_validate():  # values: tests/recipes/test_class_configs.py
    files = sorted((ROOT / "configs" / "class").glob("*.yaml"))
    assert len(files) >= 30  # 5 datasets x 3 methods x 2 depths
    for f in files:
        cfg = load_config(ClassTrainConfig, f)
        m = re.fullmatch(r"(\w+?)_(fft|lora|lntuning)_d(16|20)", f.stem)
        assert m, f.name
        assert cfg.method.name == m[2] and cfg.model.depth == int(m[3])


def test_unreadable_files_are_left_out_never_substituted(tmp_path, bad_inputs_dir, caplog):
    # issue 18 case 4, non-private: the 3 bad files are dropped before training (N = 8), never replaced
    # by a neighbour (which would enter the data twice)
    data = write_dataset(tmp_path / "data", per_class=4)
    for name in ("truncated.jpg", "zero_bytes.png", "not_an_image.jpg"):
        (data / "class_0" / name).symlink_to(bad_inputs_dir / name)
    cfg = tiny_config(data, tmp_path / "run", "lora", train={"max_steps": 3, "batch_size": 4})
    with caplog.at_level("WARNING"):
        run = train(cfg)
    assert len(run.history) == 3 and len(run.dataset) == 8
    assert {Path(p).name for p in run.dataset.unreadable} == {"truncated.jpg", "zero_bytes.png", "not_an_image.jpg"}
    assert not {s.path.name for s in run.dataset.samples} & {"truncated.jpg", "zero_bytes.png", "not_an_image.jpg"}
    assert any("3 unreadable image file(s) were left out" in r.getMessage() for r in caplog.records)
    meta = yaml.safe_load((tmp_path / "run" / "final" / "arbooth.yaml").read_text())
    assert meta["result"]["run"]["unreadable_files"] == 3
