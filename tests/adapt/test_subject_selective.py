"""Selective tuning, the swap-in teacher, distillation and the personalization file on a tiny random Infinity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arbooth.adapt.arbooth_losses import distill_loss
from arbooth.adapt.personalization import load_personalization, save_personalization
from arbooth.adapt.selective import SelectiveTuner, tensors_sha256, tuned_module_kinds
from arbooth.adapt.subject_teacher import teacher_targets
from arbooth.adapt.subject_token import SubjectToken, splice_subject_token
from arbooth.errors import CheckpointError, ConfigError
from arbooth.models import BSQVAE, Infinity

SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]


def tiny_model(seed: int = 0) -> Infinity:
    torch.manual_seed(seed)
    vae = BSQVAE(codebook_dim=4, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2)).eval()
    return Infinity(vae, depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0, text_channels=128, text_maxlen=16,
                    block_chunks=1, drop_path_rate=0.0)


def text(B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, 4] = False
    return torch.randn(B, 5, 128, generator=g), mask


def one_step(model: Infinity, tuner: SelectiveTuner, token: SubjectToken) -> None:
    opt = torch.optim.AdamW([token.embedding_PC, *tuner.params.values()], lr=1e-2, weight_decay=0.005)
    t, m = text()
    ph = torch.zeros_like(m)
    ph[:, 2] = True
    t2, m2 = token(t, m, ph)
    x = torch.randn(2, 20, 4)
    model(t2, m2, x, SCHEDULE).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("flags,kinds", [((False, True, True, False), ("ca", "ffn")),
                                         ((True, True, True, False), ("sa", "ca", "ffn")),
                                         ((False, False, False, True), ("sa", "ca", "ffn"))])
def test_only_selected_parameters_and_token_change(flags, kinds) -> None:
    model = tiny_model().train()
    assert tuned_module_kinds(*flags) == kinds
    tuner = SelectiveTuner(model, tuned_module_kinds(*flags))
    token = SubjectToken(4, 128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok0 = token.embedding_PC.detach().clone()
    one_step(model, tuner, token)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    expected = {k for k in before if k.split(".")[0] == "blocks" and k.split(".")[2] in kinds}
    assert changed == expected and expected
    assert not torch.equal(token.embedding_PC, tok0)
    assert f"{tuner.num_trainable():,}" in tuner.summary()


def test_no_sublayer_selected_is_an_error() -> None:
    with pytest.raises(ConfigError):
        tuned_module_kinds(False, False, False, False)
    with pytest.raises(ConfigError, match="no sub-layer"):
        SelectiveTuner(tiny_model(), ("mlp",))


def test_teacher_is_the_base_model_and_costs_only_the_tuned_modules() -> None:
    model, base = tiny_model(), tiny_model()
    tuner = SelectiveTuner(model)
    t, m = text()
    x = torch.randn(2, 20, 4)
    base_logits = base.eval()(t, m, x, SCHEDULE)
    one_step(model.train(), tuner, SubjectToken(4, 128))
    assert not torch.allclose(model.eval()(t, m, x, SCHEDULE), base_logits)
    for _ in range(2):  # the teacher's outputs never change during training
        with tuner.teacher() as teacher:
            assert not teacher.training
            torch.testing.assert_close(teacher(t, m, x, SCHEDULE), base_logits, rtol=0, atol=0)
        one_step(model.train(), tuner, SubjectToken(4, 128))
    assert model.training  # mode restored
    mem = tuner.teacher_memory()
    tuned_bytes = sum(p.numel() * 4 for p in tuner.params.values())
    assert mem["teacher_bytes"] == tuned_bytes < mem["full_copy_bytes"]


def test_distillation_zero_for_the_same_model_and_positive_after_a_step() -> None:
    model = tiny_model()
    tuner = SelectiveTuner(model)
    t, m = text()
    g = torch.Generator().manual_seed(0)
    with tuner.teacher() as teacher:
        x_cls, teacher_logits = teacher_targets(teacher, t, m, SCHEDULE, generator=g)
    assert x_cls.shape == (2, 20, 4) and teacher_logits.shape == (2, 21, 8)
    student = model.eval()(t, m, x_cls, SCHEDULE)
    assert distill_loss(student, teacher_logits).item() < 1e-6
    one_step(model.train(), tuner, SubjectToken(4, 128))
    assert distill_loss(model.eval()(t, m, x_cls, SCHEDULE), teacher_logits).item() > 1e-6
    # the authors' cache-less teacher: its context differs from the student's, so the KL is not zero
    model2 = tiny_model()
    tuner2 = SelectiveTuner(model2)
    with tuner2.teacher() as teacher:
        x2, logits2 = teacher_targets(teacher, t, m, SCHEDULE, mode="arbooth_compat", generator=g)
    assert x2.shape == (2, 20, 4) and logits2.shape == (2, 21, 8)
    assert distill_loss(model2(t, m, x2, SCHEDULE), logits2).item() > 1e-6


def test_personalization_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    tuner = SelectiveTuner(model)
    token = SubjectToken(4, 128)
    base_hash = tensors_sha256(tuner.originals)
    one_step(model.train(), tuner, token)
    path = save_personalization(tmp_path / "p.safetensors", tuner.tuned_state_dict(), token.embedding_PC,
                                base_tuned_sha256=base_hash, metadata={"class_noun": "dog", "config": "{}"})
    t, m = text()
    x = torch.randn(2, 20, 4)
    ph = torch.zeros_like(m)
    ph[0, 1] = True
    expected = model.eval()(*token(t, m, ph), x, SCHEDULE)
    fresh = tiny_model().eval()
    pers = load_personalization(path)
    assert set(pers.tensors) == set(tuner.params) and pers.metadata["class_noun"] == "dog"
    pers.apply(fresh)
    got = fresh(*splice_subject_token(t, m, ph, pers.subject_token_PC), x, SCHEDULE)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    tuned_bytes = sum(v.numel() * 4 for v in tuner.params.values()) + token.embedding_PC.numel() * 4
    assert path.stat().st_size < tuned_bytes + 64 * 1024  # only tuned tensors (+ header)
    assert path.stat().st_size < sum(p.numel() * 4 for p in model.parameters())
    with pytest.raises(CheckpointError, match="different base model"):
        pers.apply(fresh)  # already applied: not the base any more
    with pytest.raises(CheckpointError, match="different base model"):
        pers.apply(tiny_model(seed=3))
    with pytest.raises(CheckpointError, match="not found"):
        load_personalization(tmp_path / "missing.safetensors")


def test_personalization_with_released_raw_names_still_applies(tmp_path: Path) -> None:
    """A full file written before the raw tensors moved into leaf modules (self-attention tuned: the
    temperature is `blocks.{i}.sa.scale_mul_1H11`) applies to today's model, base check included."""
    model = tiny_model()
    tuner = SelectiveTuner(model, ("sa",))
    token = SubjectToken(4, 128)
    old = {k.replace("sa.head_scale.scale_mul_1H11", "sa.scale_mul_1H11"): v for k, v in tuner.originals.items()}
    assert "blocks.0.sa.scale_mul_1H11" in old and "blocks.0.sa.head_scale.scale_mul_1H11" in tuner.params
    one_step(model.train(), tuner, token)
    tuned = {k.replace("sa.head_scale.scale_mul_1H11", "sa.scale_mul_1H11"): v
             for k, v in tuner.tuned_state_dict().items()}
    path = save_personalization(tmp_path / "old.safetensors", tuned, token.embedding_PC,
                                base_tuned_sha256=tensors_sha256(old), metadata={"config": "{}"})
    fresh = tiny_model()
    load_personalization(path).apply(fresh)
    for k, p in tuner.params.items():
        torch.testing.assert_close(dict(fresh.named_parameters())[k], p, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="different base model"):
        load_personalization(path).apply(tiny_model(seed=3))
