"""The CLI end to end on a tiny model: train-class from official-layout checkpoint files, sample grids,
export --merge to a strict official-layout state dict, profile's FLOP counts."""
from __future__ import annotations

import json

import torch
from _class_tiny import tiny_config, write_dataset

from arbooth.adapt.finetuned import build_vae_var, load_finetuned
from arbooth.checkpoint import read_state_dict, save_torch
from arbooth.cli import main as cli
from arbooth.config import save_config
from arbooth.data.images import pil_to_tensor_m11, read_image
from arbooth.models import official_state_dict
from arbooth.models.var_training import encode_batch


def test_train_export_profile(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "unused", "lora", train={"max_steps": 2},
                      log={"sample_every": 2, "sample_classes": [0, 1], "sample_top_k": 5})
    save_config(cfg, tmp_path / "tiny.yaml")
    torch.manual_seed(123)  # "released" base weights, different from the run seed's
    base_vae, base_var = build_vae_var(cfg.model)
    save_torch(official_state_dict(base_vae), tmp_path / "vae.pth")
    save_torch(official_state_dict(base_var, include_buffers=True), tmp_path / "var.pth")

    out = tmp_path / "run"
    rc = cli(["train-class", "--config", str(tmp_path / "tiny.yaml"), "--data", str(data), "--out-dir", str(out),
              "--vae-ckpt", str(tmp_path / "vae.pth"), "--var-ckpt", str(tmp_path / "var.pth"),
              "optim.lr=0.01", "method.name=lora"])
    assert rc == 0
    assert (out / "samples" / "step_00000002.png").is_file() and (out / "final" / "arbooth.yaml").is_file()

    rc = cli(["export", str(out / "final"), "--merge", "--out", str(tmp_path / "merged.safetensors")])
    assert rc == 0
    sd = read_state_dict(tmp_path / "merged.safetensors")
    assert set(sd) == set(official_state_dict(base_var))  # the official layout, nothing extra
    _, fresh = build_vae_var(cfg.model)
    fresh.load_state_dict(sd, strict=True)
    ft = load_finetuned(out / "final")  # base paths recorded in the result
    x_BLCv = encode_batch(ft.vae, torch.rand(2, 3, 8, 8) * 2 - 1)[1]
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(labels, x_BLCv), ft.var(labels, x_BLCv))
        assert not torch.equal(base_var.eval()(labels, x_BLCv), ft.var(labels, x_BLCv))  # it did train
    for k, v in official_state_dict(ft.vae).items():
        assert torch.equal(v, official_state_dict(base_vae)[k])  # tokenizer from the base checkpoint

    rc = cli(["sample", "--result", str(out / "final"), "--classes", "0", "1", "--per-class", "2", "--top-k", "1",
              "--out", str(tmp_path / "ft_grid.png"), "--out-dir", str(tmp_path / "ft")])
    assert rc == 0 and (tmp_path / "ft_grid.png").is_file() and len(list((tmp_path / "ft").glob("*.png"))) == 4
    greedy = ft.var.generate(torch.tensor([0, 0]), cfg=1.5, top_k=1, seed=0)  # what `sample` drew for class 0
    first = pil_to_tensor_m11(read_image(tmp_path / "ft" / "class0000_00.png")).add(1).div(2)
    assert (first - greedy[0]).abs().max() < 1 / 255 + 1e-6  # the fine-tuned model, not the base, drew it

    capsys.readouterr()
    rc = cli(["profile", "--config", str(tmp_path / "tiny.yaml"), "--num-images", "64", "--methods", "fft", "lora",
              "--json", str(tmp_path / "profile.json")])
    assert rc == 0
    prof = json.loads((tmp_path / "profile.json").read_text())
    fft, lora = prof["methods"]["fft"], prof["methods"]["lora"]
    assert fft["flops_step"] > lora["flops_step"] > lora["flops_forward"] > 0
    assert prof["micro_steps"] == 2 and abs(fft["run_pflops"] - fft["flops_step"] * 2 / 1e15) < 1e-12
    assert "lora" in capsys.readouterr().out
