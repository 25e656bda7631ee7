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


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    """Issue 19.2: `export --merge --out <result>/adapter_model.safetensors` exited 0 and replaced the
    adapter, so the result no longer loaded. Right: one line, the result untouched and still usable.
    Also: a run folder inside the data folder, or under a regular file, is refused before any work."""
    data = write_dataset(tmp_path / "data", per_class=4)
    save_config(tiny_config(data, tmp_path / "unused", "lora", train={"max_steps": 1}), tmp_path / "tiny.yaml")
    train = ["train-class", "--config", str(tmp_path / "tiny.yaml"), "--data", str(data)]
    (tmp_path / "file").write_bytes(b"x")
    for out_dir, msg in ((data / "run", "overlaps the data folder"), (tmp_path / "file" / "run", "not a folder")):
        capsys.readouterr()
        assert cli([*train, "--out-dir", str(out_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert not (data / "run").exists()
    assert cli([*train, "--out-dir", str(tmp_path / "run")]) == 0
    final = tmp_path / "run" / "final"
    adapter = final / "adapter_model.safetensors"
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    capsys.readouterr()
    assert cli(["export", str(final), "--merge", "--out", str(adapter)]) == 2
    err = capsys.readouterr().err.strip()
    assert "would overwrite the input" in err and "\n" not in err, err
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert cli(["export", str(final), "--merge", "--out", str(tmp_path / "merged.safetensors")]) == 0
    assert cli(["sample", "--result", str(final), "--classes", "0", "--per-class", "1", "--top-k", "1",
                "--out", str(tmp_path / "g.png")]) == 0  # the result still loads
    capsys.readouterr()
    assert cli(["sample", "--result", str(final), "--out", str(tmp_path / "g.png"), "--out-dir", str(final)]) == 2
    assert "overlaps the --result folder" in capsys.readouterr().err


def test_profile_measures_a_checkpointed_step(tmp_path):
    """Issue 23.1: profile set `var.grad_checkpointing`, which VAR never reads, so
    `model.gradient_checkpointing=true` profiled a plain step. A checkpointed step runs each block's forward
    again in backward: more FLOPs per step, the same forward."""
    data = write_dataset(tmp_path / "data", per_class=4)
    save_config(tiny_config(data, tmp_path / "unused", "lora", train={"max_steps": 1}), tmp_path / "tiny.yaml")
    flops = {}
    for flag in ("false", "true"):
        out = tmp_path / f"profile_{flag}.json"
        assert cli(["profile", "--config", str(tmp_path / "tiny.yaml"), "--num-images", "8", "--device", "fake",
                    "--json", str(out), f"model.gradient_checkpointing={flag}"]) == 0
        flops[flag] = json.loads(out.read_text())["methods"]["lora"]
    assert flops["true"]["flops_forward"] == flops["false"]["flops_forward"]
    assert flops["true"]["flops_step"] > flops["false"]["flops_step"] + 0.5 * flops["false"]["flops_forward"]
