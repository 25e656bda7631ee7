"""T5TextEncoder from a local folder (tiny random T5 + WordLevel tokenizer), and the end-to-end
text -> Infinity.generate -> PNG path through the `arbooth generate` CLI."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from arbooth.cli import main as cli_main
from arbooth.errors import CheckpointError
from arbooth.models import BSQVAE, Infinity, T5TextEncoder, infinity_scale_schedule
from arbooth.models.bsq_vae import official_vae_state_dict
from arbooth.models.infinity_loading import official_state_dict

WORDS = ["a", "photo", "of", "dog", "corgi", "on", "the", "beach", "cat"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    from arbooth.toy.text import word_level_tokenizer

    fast = word_level_tokenizer(WORDS)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(fast), d_model=128, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("tiny-t5")
    T5EncoderModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_encoder_pads_masks_and_caches(t5_dir):
    t5 = T5TextEncoder(t5_dir, cache_size=2)
    feats, mask = t5(["a corgi on the beach", "a cat"])
    assert feats.shape == (2, 6, 128) and feats.dtype == torch.float32
    assert mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    assert feats[1, 3:].abs().max() == 0
    alone, _ = t5("a cat")  # padding does not change a prompt's features
    torch.testing.assert_close(alone[0], feats[1, :3], atol=1e-5, rtol=0)
    assert list(t5._cache) == ["a corgi on the beach", "a cat"]
    again, _ = t5(["a cat", "a photo of dog"])  # one hit, one miss; the oldest entry is evicted
    torch.testing.assert_close(again[0, :3], feats[1, :3], atol=1e-5, rtol=0)
    assert list(t5._cache) == ["a cat", "a photo of dog"]


def test_missing_encoder_names_what_to_download(tmp_path):
    with pytest.raises(CheckpointError, match="google/flan-t5-xl"):
        T5TextEncoder(tmp_path / "no-such-folder")
    with pytest.raises(CheckpointError, match="google/flan-t5-xl"):
        T5TextEncoder("someone/not-in-the-cache")


def test_text_to_image_end_to_end(t5_dir, tmp_path):
    torch.manual_seed(0)
    vae = BSQVAE(codebook_dim=8, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 1, 1, 1)).eval()
    model = Infinity(vae, depth=2, embed_dim=64, num_heads=4, text_channels=128, text_maxlen=16,
                     block_chunks=1).eval()
    t5 = T5TextEncoder(t5_dir)
    schedule = infinity_scale_schedule(1.0, "0.06M")[:4]
    text, mask = t5(["a corgi on the beach", "a cat"])
    out = model.generate(text, mask, schedule, seed=3)
    assert out.images.shape == (2, 3, 96, 96) and len(out.bits) == 4
    again = model.generate(text, mask, schedule, seed=3)  # seeded: reproducible
    assert all(torch.equal(a, b) for a, b in zip(out.bits, again.bits))

    # the same through the CLI, from checkpoints in the released layout
    torch.save(official_state_dict(model), tmp_path / "model.pth")
    torch.save({"vae": official_vae_state_dict(vae)}, tmp_path / "vae.pth")
    args = ["generate", "--prompt", "a corgi on the beach", "--n", "2", "--model-ckpt", str(tmp_path / "model.pth"),
            "--vae-ckpt", str(tmp_path / "vae.pth"), "--t5", str(t5_dir), "--out", str(tmp_path / "img.png"),
            "--pn", "0.06M", "--seed", "3", "--cfg", "3", "--vae-kwargs",
            '{"codebook_dim": 8, "base_ch": 32, "num_res_blocks": 1, "ch_mult": [1, 1, 1, 1, 1]}',
            "--model-kwargs", ('{"depth": 2, "embed_dim": 64, "num_heads": 4, "text_channels": 128, '
            '"text_maxlen": 16, "block_chunks": 1}')]
    assert cli_main(args) == 0
    assert Image.open(tmp_path / "img_000.png").size == (256, 256)
    assert (tmp_path / "img_001.png").exists() and (tmp_path / "img.png").exists()
    assert cli_main(args[:-4] + ["--model-kwargs", '{"depth": 4}']) == 2  # mismatching checkpoint: clean error


def test_one_encode_path_for_generation_and_arbooth(t5_dir):
    """T5TextEncoder (generate) and ARBooth's encode_prompts (training, personalized sampling) share
    models.t5.t5_features: the same prompt gives the same features either way."""
    from arbooth.adapt.subject_token import encode_prompts

    t5 = T5TextEncoder(t5_dir)
    prompts = ["a corgi on the beach", "a cat"]
    feats, mask = t5(prompts)
    ours, ours_mask, placeholder = encode_prompts(t5.tokenizer, t5.encoder, prompts, max_length=t5.max_length,
                                                  prefix_length=1)
    assert torch.equal(ours_mask, mask) and not placeholder.any()
    torch.testing.assert_close(ours, feats, atol=0, rtol=0)
