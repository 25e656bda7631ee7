"""Subject metrics with real (randomly initialised) DINO, CLIP and LPIPS networks."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from arbooth.data.images import read_image_folder
from arbooth.errors import ArboothError
from arbooth.metrics.subject import (
    ImageSimilarity,
    PairwiseDiversity,
    SubjectEvaluator,
    TextSimilarity,
    get_protocol,
)


@pytest.fixture(scope="module")
def vase(toy_subject_dir) -> list[Image.Image]:
    # Toy-world views of one object, enlarged once to the size the tests used for photos.
    ims = read_image_folder(toy_subject_dir).images[:3]
    return [im.resize((320, 288), Image.Resampling.BICUBIC) for im in ims]


def _evaluator(dino, clip, lpips_fn, protocol):
    return SubjectEvaluator(dino, clip, lpips_fn, protocol, "cpu", batch_size=4)


def test_image_similarity_hand_values():
    sim = ImageSimilarity(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    sim.update(torch.tensor([[3.0, 0.0]]))        # cos 1 and 0
    sim.update(torch.tensor([[1.0, 1.0]]))        # cos 1/sqrt2 twice
    assert sim.compute() == pytest.approx((1 + 0 + 2 * 2 ** -0.5) / 4)
    ts = TextSimilarity()
    ts.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 1.0]))
    assert ts.compute() == pytest.approx(2 ** -0.5)
    with pytest.raises(ArboothError):
        ImageSimilarity(torch.ones(1, 2)).compute()


@pytest.mark.parametrize("protocol", ["dreambooth", "dreammatcher"])
def test_identical_images_give_similarity_one(dino, clip, lpips_fn, vase, protocol):
    ev = _evaluator(dino, clip, lpips_fn, protocol)
    subject = vase[:1]
    d, c = ev.dino_features(subject), ev.clip_features(subject)
    m = ev.prompt_metrics([vase[0], vase[0].copy()], "a {} in the snow", "vase", d, c)
    assert m["I_DINO"] == pytest.approx(1.0, abs=1e-5)
    assert m["I_CLIP"] == pytest.approx(1.0, abs=1e-5)
    assert m["DIV"] == pytest.approx(0.0, abs=1e-6)  # identical pair: LPIPS distance 0


def test_folder_against_itself_is_mean_of_gram_matrix(dino, clip, lpips_fn, vase):
    # With several distinct photos the mean over all pairs includes off-diagonal pairs, so it is < 1.
    ev = _evaluator(dino, clip, lpips_fn, "dreammatcher")
    f = ev.dino_features(vase)
    sim = ImageSimilarity(f)
    sim.update(f)
    g = torch.nn.functional.normalize(f.double(), dim=-1)
    assert sim.compute() == pytest.approx(float((g @ g.T).mean()), abs=1e-9)
    assert sim.compute() < 1.0


def test_t_clip_text_per_protocol(dino, clip, lpips_fn, vase):
    template = "a {} in the jungle"
    assert get_protocol("dreambooth").clip_text(template, "vase") == "a vase in the jungle"
    assert get_protocol("dreammatcher").clip_text(template, "vase") == template  # raw line, as ARBooth
    results = {}
    for protocol in ("dreambooth", "dreammatcher"):
        ev = _evaluator(dino, clip, lpips_fn, protocol)
        d, c = ev.dino_features(vase[:1]), ev.clip_features(vase[:1])
        m = ev.prompt_metrics(vase[1:2], template, "vase", d, c)  # one image: no DIV pair
        assert m["DIV"] is None
        ts = TextSimilarity()
        ts.update(ev.clip_features(vase[1:2]), ev.text_features(["a vase in the jungle"])[0])
        assert m["T_CLIP_class_noun"] == pytest.approx(ts.compute(), abs=1e-6)
        results[protocol] = m
    assert results["dreambooth"]["T_CLIP"] == results["dreambooth"]["T_CLIP_class_noun"]
    assert results["dreammatcher"]["T_CLIP"] == results["dreammatcher"]["T_CLIP_raw_template"]
    assert results["dreammatcher"]["T_CLIP_raw_template"] != pytest.approx(
        results["dreammatcher"]["T_CLIP_class_noun"], abs=1e-6)


def test_pres_is_dino_similarity_to_class_images(dino, clip, lpips_fn, vase):
    ev = _evaluator(dino, clip, lpips_fn, "dreambooth")
    subj = ev.dino_features(vase[:1])
    # Class images = the subject itself and another photo: PRES = (1 + cos(a, b)) / 2.
    fb = ev.dino_features(vase[1:2])
    cos_ab = float(torch.nn.functional.cosine_similarity(subj.double(), fb.double()))
    assert ev.pres(subj, [vase[0], vase[1]]) == pytest.approx((1 + cos_ab) / 2, abs=1e-6)
    assert ev.pres(subj, [vase[0]]) == pytest.approx(1.0, abs=1e-5)


def test_div_is_mean_pairwise_lpips(lpips_fn):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    div = PairwiseDiversity(lpips_fn, batch_size=2)  # batch smaller than the 3 pairs
    div.update(x)
    with torch.no_grad():  # the ARBooth loop: every i < j pair, one at a time
        pairs = [float(lpips_fn(x[i:i + 1], x[j:j + 1])) for i in range(3) for j in range(i + 1, 3)]
    assert div.compute() == pytest.approx(sum(pairs) / 3, abs=1e-6)
    assert min(pairs) > 0
    # Averaged over groups by pair count: a second identical-pair group adds a zero.
    div.update(torch.stack([x[0], x[0]]))
    assert div.compute() == pytest.approx(sum(pairs) / 4, abs=1e-6)
    with pytest.raises(ArboothError):
        PairwiseDiversity(lpips_fn).compute()


def test_protocol_preprocessing_shapes(clip, vase):
    im = vase[0]  # 320x288, not square
    dm, db = get_protocol("dreammatcher"), get_protocol("dreambooth")
    x = dm.dino_input(im)
    assert x.shape == (3, 256, 256) and x.min() >= -1 and x.max() <= 1  # squashed, no crop, [-1, 1]
    assert db.dino_input(im).shape == (3, 224, 224)
    assert dm.clip_input(im, clip).shape == db.clip_input(im, clip).shape == (3, 224, 224)
    assert dm.lpips_input(im).shape == db.lpips_input(im).shape == (3, 256, 256)
    with pytest.raises(ArboothError, match="unknown protocol"):
        get_protocol("vico")


def test_vico_prompt_files_have_placeholders(vico_dir):
    for name in ("prompts_live_objects.txt", "prompts_nonlive_objects.txt"):
        lines = [ln.strip() for ln in (vico_dir / name).read_text().splitlines() if ln.strip()]
        assert len(lines) >= 25 and all("{}" in ln for ln in lines)
