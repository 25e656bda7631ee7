"""LoRA for ARBooth on a tiny random Infinity: what trains, the adapter-disabled teacher, the LoRA
personalization file (apply, refusal on another base, merge into a full one); the peft adapter folder
(`PeftModel.from_pretrained` samples what arbooth's loader samples, bit for bit) and the single file
written before it."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from arbooth.adapt.personalization import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SUBJECT_FILE,
    is_personalization,
    load_personalization,
    merge_lora_personalization,
    save_lora_personalization,
    save_personalization,
)
from arbooth.adapt.selective import CROSS_ATTENTION, FFN, SELF_ATTENTION
from arbooth.adapt.subject_lora import LoRATuner, lora_targets
from arbooth.adapt.subject_token import SubjectToken
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models import BSQVAE, Infinity

SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]


def tiny_model(seed: int = 0, bf16_blocks: bool = False) -> Infinity:
    torch.manual_seed(seed)
    vae = BSQVAE(codebook_dim=4, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2)).eval()
    model = Infinity(vae, depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0, text_channels=128, text_maxlen=16,
                     block_chunks=1, drop_path_rate=0.0).eval().requires_grad_(False)
    if bf16_blocks:
        model.blocks.to(torch.bfloat16)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    return torch.randn(2, 5, 128, generator=g), mask, torch.randn(2, 20, 4, generator=g)


def logits(model, bf16: bool) -> torch.Tensor:
    t, m, x = inputs()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return model(t, m, x, SCHEDULE).float()


def train_steps(model: Infinity, tuner: LoRATuner, n: int = 3) -> None:
    opt = torch.optim.AdamW(tuner.params.values(), lr=5e-2)
    model.train()
    for _ in range(n):
        logits(model, bf16=model.blocks[0].ffn.fc1.base_layer.weight.dtype == torch.bfloat16).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_lora_adapts_exactly_the_selected_linears_in_fp32_over_a_frozen_bf16_base():
    model = tiny_model(bf16_blocks=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = LoRATuner(model, (CROSS_ATTENTION, FFN), rank=4)
    assert tuner.spec.alpha == 8.0 and tuner.spec.scaling == 2.0  # alpha defaults to 2 * rank
    assert tuner.spec.targets == tuple(f"blocks.{i}.{n}" for i in range(2)
                                       for n in ("ca.q", "ca.k", "ca.v", "ca.proj", "ffn.fc1", "ffn.fc2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora_" in n} and len(trainable) == 24
    # rank x (in + out) per layer: ca 4 x (64+64) x 4 layers, ffn 4 x (64+256) x 2, per block
    assert tuner.num_trainable() == 2 * (4 * 128 * 4 + 4 * 320 * 2)
    assert all(p.dtype == torch.float32 for p in tuner.params.values())
    assert model.blocks[0].ca.q.base_layer.weight.dtype == torch.bfloat16
    assert tuner.teacher_memory()["teacher_bytes"] == 0
    train_steps(model, tuner)
    assert any(v.abs().sum() > 0 for k, v in tuner.params.items() if "lora_B" in k)  # B moved from zero
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # base frozen
    sa = LoRATuner(tiny_model(), (SELF_ATTENTION,), rank=2, alpha=3)
    assert sa.spec.scaling == 1.5 and all(".sa." in t for t in sa.spec.targets)
    with pytest.raises(ConfigError, match="matches nothing"):
        lora_targets(tiny_model(), ("mlp",))
    with pytest.raises(ConfigError):
        LoRATuner(tiny_model(), rank=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_teacher_is_the_base_model_exactly(bf16):
    """Adapters disabled: the teacher's logits equal the untouched base model's bit for bit, while the
    student (adapters on) has moved; no weight copy is kept."""
    base = tiny_model(bf16_blocks=bf16)
    model = copy.deepcopy(base)
    tuner = LoRATuner(model, rank=4)
    train_steps(model, tuner)
    expected = logits(base, bf16)
    with tuner.teacher() as teacher:
        assert not teacher.training and not torch.is_grad_enabled()
        got = logits(teacher, bf16)
    assert torch.equal(got, expected)
    assert not torch.allclose(logits(model, bf16), expected, atol=1e-3)  # the student differs
    assert all(p.requires_grad for p in tuner.params.values())  # the context restores the adapters


def test_lora_personalization_round_trip_refusal_and_merge(tmp_path):
    model = tiny_model(bf16_blocks=True)
    tuner = LoRATuner(model, rank=4)
    train_steps(model, tuner)
    token = SubjectToken(2, 128)
    path = save_personalization(tmp_path / "p.safetensors", tuner.tuned_state_dict(), token.embedding_PC,
                                base_tuned_sha256=tuner.base_tuned_sha256,
                                metadata={"config": "{}", "placeholder": "<S*>", **tuner.file_metadata()})
    pers = load_personalization(path)
    assert pers.kind == "lora" and set(pers.tensors) == set(tuner.params)  # only adapter tensors are stored
    assert pers.metadata["base_dtype"] == "bfloat16"
    fresh = tiny_model(bf16_blocks=True)
    pers.apply(fresh)
    assert torch.equal(logits(fresh, True), logits(model, True))  # the trained model, rebuilt from the file
    with pytest.raises(CheckpointError, match="different base model"):
        pers.apply(tiny_model(seed=1, bf16_blocks=True))
    with pytest.raises(CheckpointError, match="different base model"):
        merge_lora_personalization(pers, tiny_model(seed=1))
    # merge into the full kind on an fp32 base: W + 2 B A in fp32, the other tuned tensors copied
    full = merge_lora_personalization(pers, tiny_model(), dtype=torch.float32)
    assert full.kind == "full" and "blocks.0.ca.q.bias" in full.tensors and "blocks.1.ffn.fc2.weight" in full.tensors
    out = tmp_path / "merged.safetensors"
    save_personalization(out, full.tensors, full.subject_token_PC, base_tuned_sha256=full.metadata["base_tuned_sha256"],
                         metadata={k: v for k, v in full.metadata.items() if k not in ("format", "base_tuned_sha256")})
    merged_model, lora_model = tiny_model(), tiny_model()
    load_personalization(out).apply(merged_model)
    pers.apply(lora_model)  # fp32 base: its bf16 hash still matches
    assert torch.allclose(logits(merged_model, False), logits(lora_model, False), atol=1e-4)
    with pytest.raises(CheckpointError, match="different base model"):
        load_personalization(out).apply(merged_model)  # already applied


def _trained(dropout: float = 0.0):
    model = tiny_model()
    tuner = LoRATuner(model, rank=4, alpha=6.0, dropout=dropout)
    train_steps(model, tuner)
    token = SubjectToken(2, 128)
    with torch.no_grad():
        token.embedding_PC.normal_()
    return tuner, token


def _images(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    text, mask = torch.randn(2, 5, 128, generator=g), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        return model.eval().generate(text, mask, SCHEDULE, cfg=3.0, seed=[0, 1], dtype="fp32").images


def test_peft_loads_the_folder_and_samples_what_arbooth_samples(tmp_path):
    tuner, token = _trained(dropout=0.1)
    folder = save_lora_personalization(tmp_path / "personalization", tuner.spec, tuner.tuned_state_dict(), token.embedding_PC,
                                       base_tuned_sha256=tuner.base_tuned_sha256, base_name="tiny-random seed=0",
                                       metadata={"config": "{}", **tuner.file_metadata()})
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["peft_type"]) == (4, 6.0, 0.1, "LORA")
    assert cfg["base_model_name_or_path"] == "tiny-random seed=0"
    ours = load_personalization(folder)
    assert ours.kind == "lora" and torch.equal(ours.subject_token_PC, token.embedding_PC.detach())
    by_peft = PeftModel.from_pretrained(tiny_model(), str(folder))
    by_arbooth = tiny_model()
    ours.apply(by_arbooth)
    lora_B = [v for k, v in by_peft.state_dict().items() if "lora_B" in k]
    assert len(lora_B) == len(tuner.spec.targets) and all(v.abs().sum() > 0 for v in lora_B)  # not a no-op
    assert torch.equal(_images(by_peft), _images(by_arbooth))
    assert not torch.equal(_images(by_arbooth), _images(tiny_model()))
    # the folder, or any file inside it
    for p in (folder, folder / ADAPTER_WEIGHTS, folder / SUBJECT_FILE, folder / ADAPTER_CONFIG):
        assert is_personalization(p)
        assert set(load_personalization(p).tensors) == set(ours.tensors)


def test_old_single_file_lora_keeps_loading_and_damage_is_one_line(tmp_path):
    tuner, token = _trained()
    old = save_personalization(tmp_path / "old.safetensors", tuner.tuned_state_dict(), token.embedding_PC,
                               base_tuned_sha256=tuner.base_tuned_sha256,
                               metadata={"config": "{}", **tuner.file_metadata()})
    folder = save_lora_personalization(tmp_path / "new", tuner.spec, tuner.tuned_state_dict(), token.embedding_PC,
                                       base_tuned_sha256=tuner.base_tuned_sha256, base_name="tiny",
                                       metadata={"config": "{}", **tuner.file_metadata()})
    a, b = tiny_model(), tiny_model()
    load_personalization(old).apply(a)
    load_personalization(folder).apply(b)
    assert torch.equal(_images(a), _images(b))
    (folder / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="needs adapter_config.json"):
        load_personalization(folder)
    assert not is_personalization(tmp_path)
