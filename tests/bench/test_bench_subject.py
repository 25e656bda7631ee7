"""`arbooth bench-subject`: benchmark discovery, option checks, the whole pipeline on the toy base at tiny
sizes (reports, resume, refusals), 2 processes = 1 process, the ViCo layout end to end (optional), and the
HTML page in a headless browser (skips without one)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from arbooth.bench.plan import BenchConfig, Variant, discover_subjects, make_plan
from arbooth.bench.subject import run_bench
from arbooth.errors import ArboothError, ConfigError
from arbooth.sample_folder import SampleFolderError
from arbooth.toy.world import ToyAttributes, subject_views

ROOT = Path(__file__).resolve().parents[2]
# Tiny and fast: 2 toy subjects (one live, one object), 2 training steps, 1 prompt x 2 images, 2 class images.
TINY = {"subjects": ("star_green_yellow", "star_blue_green"), "prompts_per_subject": 1, "images_per_prompt": 2,
            "pres_samples": 2, "overrides": ("steps=2",), "random_weights": True, "n_boot": 200,
            "variants": (Variant("full"), Variant("lora", ("tuning.method=lora",)))}
TINY_CLI = ["--subjects", "star_green_yellow", "star_blue_green", "--prompts-per-subject", "1",
            "--images-per-prompt", "2", "--pres-samples", "2", "--random-weights", "--n-boot", "200",
            "--variant", "full", "--variant", "lora:tuning.method=lora", "steps=2"]


def _bench_folder(root: Path, *, yaml_kinds: dict[str, str | None]) -> Path:
    """A ViCo-layout folder of toy photos; `yaml_kinds`: subject -> kind in subject.yaml (None: no yaml)."""
    (root / "prompts_live_objects.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "prompts_live_objects.txt").write_text("a {} in the snow\na {} on the beach\n")
    (root / "prompts_nonlive_objects.txt").write_text("a {} on a table\n")
    for name, kind in yaml_kinds.items():
        d = root / name
        d.mkdir()
        for k, it in enumerate(subject_views(ToyAttributes("circle", "red"), 3)):
            it.image.save(d / f"{k}.png")
        if kind is not None:
            (d / "subject.yaml").write_text(yaml.safe_dump({"class_noun": "ball", "kind": kind}))
    return root


def test_subjects_take_kind_and_noun_from_yaml_options_or_the_vico_table(tmp_path):
    folder = _bench_folder(tmp_path / "b", yaml_kinds={"pet": "live", "vase_1": "object", "red_teapot": None})
    subs = {s.name: s for s in discover_subjects(folder, BenchConfig(benchmark=str(folder)))}
    assert (subs["pet"].live, subs["pet"].templates) == (True, ("a {} in the snow", "a {} on the beach"))
    assert (subs["vase_1"].live, subs["vase_1"].templates) == (False, ("a {} on a table",))
    assert (subs["red_teapot"].class_noun, subs["red_teapot"].live) == ("teapot", False)  # ARBooth's ViCo table
    opts = BenchConfig(benchmark=str(folder), live=("vase_1",), class_nouns=("pet=dog",), prompts_per_subject=1)
    subs = {s.name: s for s in discover_subjects(folder, opts)}
    assert (subs["pet"].live, subs["pet"].class_noun, subs["vase_1"].live) == (False, "dog", True)
    assert subs["vase_1"].templates == ("a {} in the snow",)


def test_a_subject_of_unknown_kind_or_noun_is_one_error_naming_it(tmp_path):
    folder = _bench_folder(tmp_path / "b", yaml_kinds={"mystery": None})
    with pytest.raises(ArboothError, match="subject mystery: live or object"):
        discover_subjects(folder, BenchConfig(benchmark=str(folder)))
    with pytest.raises(ArboothError, match="subject mystery: no class noun"):
        discover_subjects(folder, BenchConfig(benchmark=str(folder), live=()))
    with pytest.raises(ArboothError, match=r"\['nope'\] not in"):
        discover_subjects(folder, BenchConfig(benchmark=str(folder), subjects=("nope",)))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"images_per_prompt": 0}, "images-per-prompt must be at least 1"),
    ({"pres_samples": -1}, "pres-samples must be >= 0"),
    ({"gen_batch_size": 0}, "gen-batch-size must be at least 1"),
    ({"class_prompt": "a photo"}, "has no"),
    ({"variants": (Variant("a"), Variant("a"))}, "variant names must differ"),
    ({"protocol": "mine"}, "protocol 'mine'"),
    ({"top_p": 2.0}, "top_p must be in"),   # sampling ranges before any subject is trained
    ({"tau": 0.0}, "tau"),
    ({"top_k": -1}, "top_k must be an integer"),
])
def test_options_are_checked_before_any_work(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**kwargs)


def test_variant_parses_a_name_and_overrides():
    assert Variant.parse("r4:tuning.method=lora tuning.lora_rank=4") == \
        Variant("r4", ("tuning.method=lora", "tuning.lora_rank=4"))
    assert Variant.parse("full") == Variant("full")
    with pytest.raises(ConfigError, match="not a key=value"):
        Variant.parse("x:tuning.method")


def test_the_toy_benchmark_is_written_with_its_defaults(tmp_path):
    plan = make_plan(BenchConfig(out=str(tmp_path)))
    assert [s.name for s in plan.subjects] == ["star_blue_green", "star_green_yellow", "star_purple_yellow",
                                              "star_yellow_purple"]
    assert sum(s.live for s in plan.subjects) == 2 and all(s.attributes["texture"] == "split" for s in plan.subjects)
    assert [v.name for v in plan.variants] == ["full", "lora"]
    assert (plan.images_per_prompt, plan.pres_samples, plan.class_prompt) == (4, 16, "a {}")


# ----------------------------------------------------------------------------- the pipeline, tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    report = run_bench(BenchConfig(out=str(out), **TINY))
    return out, report, _image_hashes(out)  # the hashes before the rerun test regenerates an image


def _metrics(report: dict) -> dict:
    """The report's numbers that do not depend on timing."""
    keep = {}
    for v, rows in report["per_subject"].items():
        for r in rows:
            keep[f"{v}/{r['subject']}"] = {k: x for k, x in r.items() if k not in ("train_s", "sample_s_per_image")}
    return {"per_subject": keep, "differences": report["differences"],
            "overall": {v: {g: {k: x for k, x in m.items() if k not in ("train_s", "sample_s_per_image")}
                            for g, m in groups.items()} for v, groups in report["overall"].items()}}


def _flat(tree, prefix="") -> dict:
    """Nested dicts and lists -> {"a/b/0": number}; strings, flags and NaN (p of equal differences) left out."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        number = isinstance(tree, (int, float)) and not isinstance(tree, bool) and not math.isnan(tree)
        return {prefix: tree} if number else {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}/{k}"))
    return out


def test_tiny_pipeline_writes_the_three_reports(tiny_run):
    out, report, _ = tiny_run
    assert set(report["overall"]) == {"full", "lora"}
    assert set(report["overall"]["full"]) == {"all", "live", "object"}
    for v in ("full", "lora"):
        rows = report["per_subject"][v]
        assert [r["subject"] for r in rows] == ["star_blue_green", "star_green_yellow"]
        for r in rows:
            assert 0 <= r["subject_acc"] <= 1 and r["PRES"] is not None and r["I_DINO"] is not None
            assert r["train_s"] > 0 and r["sample_s_per_image"] > 0 and r["n_images"] == 2
        # overall = mean over subjects; live / object = that subject alone here
        assert report["overall"][v]["all"]["I_DINO"] == pytest.approx(sum(r["I_DINO"] for r in rows) / 2)
        assert report["overall"][v]["live"]["I_DINO"] == pytest.approx(rows[1]["I_DINO"])
    d = report["differences"]["lora"]["I_DINO"]
    lo, hi = d["ci95"]
    assert d["n"] == 2 and lo <= d["mean"] <= hi
    assert report["random_weights"] is True
    md = (out / "report.md").read_text()
    assert "RANDOM-WEIGHT EXTRACTORS" in md and "| lora - full |" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 5 + 2 * 2 * (2 + 2)  # photos + 2 variants x (2 + 2 class)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert json.loads((out / "report.json").read_text())["per_subject"] == report["per_subject"]
    assert (out / "README.md").read_text().startswith("---")  # the model card


def test_rerun_trains_and_samples_nothing_and_a_deleted_image_is_sampled_once(tiny_run):
    out, report, _ = tiny_run
    unit = out / "full" / "star_blue_green"
    trained = (unit / "run" / "bench_train.json").read_text()
    again = run_bench(BenchConfig(out=str(out), **TINY))
    assert (unit / "run" / "bench_train.json").read_text() == trained
    assert json.loads((out / "_parts" / "rank0.json").read_text())["sampling"] == {}
    assert _metrics(again) == _metrics(report)
    victim = next((unit / "samples").glob("a_*background*/000001.png"))
    victim.unlink()
    third = run_bench(BenchConfig(out=str(out), **TINY))
    assert next(iter(json.loads((out / "_parts" / "rank0.json").read_text())["sampling"].values()))[0] == 1
    records = [json.loads(line) for line in (unit / "samples" / "records.jsonl").read_text().splitlines()]
    assert len(records) == len({(r["prompt"], r["seed"]) for r in records}) == 2 + 2
    # same seed, same image up to float rounding: one image alone is not sampled in the batch it was
    assert _flat(_metrics(third)) == pytest.approx(_flat(_metrics(report)), rel=1e-3, abs=1e-4)


def test_another_setting_or_config_in_the_same_folder_is_refused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    with pytest.raises(SampleFolderError, match="top_k"):
        run_bench(BenchConfig(out=str(out), **{**TINY, "top_k": 5}))
    with pytest.raises(ArboothError, match=r"another config \(steps: 2 there, 3 now\)"):  # the key by name
        run_bench(BenchConfig(out=str(out), **{**TINY, "overrides": ("steps=3",)}))


def test_cli_runs_the_same_pipeline(tiny_run, tmp_path):
    from arbooth.cli import main
    out, report, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # everything trained and sampled: the CLI only scores and reports
    assert main(["bench-subject", "--out", str(copy), *TINY_CLI]) == 0
    # (the rerun test regenerated one image: equal up to its rounding)
    cli = json.loads((copy / "report.json").read_text())
    assert _flat(_metrics(cli)) == pytest.approx(_flat(_metrics(report)), rel=1e-3, abs=1e-4)
    assert (copy / "full" / "star_blue_green" / "run" / "bench_train.json").read_text() == \
        (out / "full" / "star_blue_green" / "run" / "bench_train.json").read_text()  # not trained again
    assert main(["bench-subject", "--out", str(copy), "--images-per-prompt", "0"]) == 2


def _image_hashes(out: Path) -> dict:
    """(variant/subject, prompt, seed) -> the sampled PNG's sha256, over every records file."""
    found = {}
    for path in out.glob("*/*/samples/records*.jsonl"):
        unit = path.parent.parent.relative_to(out).as_posix()
        for line in path.read_text().splitlines():
            r = json.loads(line)
            found[(unit, r["prompt"], r["seed"])] = r["sha256"]
    return found


@pytest.mark.slow
def test_two_processes_give_the_same_report_as_one(tiny_run, tmp_path):
    """torchrun, 2 CPU processes (gloo): subjects, then images, then scoring split between the ranks."""
    _, report, hashes = tiny_run
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "arbooth.cli", "bench-subject", "--out", str(tmp_path / "two"), *TINY_CLI]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2
    # the same images (each trained in a child process, sampled in the batch one process uses) ...
    assert _image_hashes(tmp_path / "two") == hashes
    # ... and the same metrics, up to the float rounding of another thread count in the extractors
    assert _flat(_metrics(two)) == pytest.approx(_flat(_metrics(report)), rel=1e-5, abs=1e-7)
    # each rank wrote its own share: two records files in some sample folder, both non-empty
    writers = {p.name for p in (tmp_path / "two").glob("*/*/samples/records-rank*.jsonl")}
    assert writers == {"records-rank0.jsonl", "records-rank1.jsonl"}


@pytest.mark.slow
def test_vico_layout_end_to_end_with_the_tiny_model(vico_dir, tmp_path):
    """A protocol check on the real layout (numbers meaningless: random base and extractors)."""
    report = run_bench(BenchConfig(benchmark=str(vico_dir), out=str(tmp_path / "vico"), config=str(
        ROOT / "configs" / "subject" / "tiny.yaml"), overrides=("steps=1", "validate_every=0"), prompts_per_subject=2,
        images_per_prompt=1, pres_samples=1, random_weights=True, n_boot=100))
    subjects = report["per_subject"]["full"]
    assert len(subjects) == len([d for d in vico_dir.iterdir() if d.is_dir()])
    assert {r["subject"] for r in subjects if r["live"]} == {"black_cat", "brown_cat", "brown_dog", "brown_dog2",
                                                              "fat_dog"}
    assert all(len(r["per_prompt"]) == 2 and r["I_DINO"] is not None and r["PRES"] is not None for r in subjects)
    assert report["overall"]["full"]["live"]["subjects"] == 5


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser (chromium) found")
def test_report_page_renders_in_a_headless_browser(tiny_run, tmp_path):
    from PIL import Image
    out, _, _ = tiny_run
    shot = tmp_path / "report.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
           "--window-size=1400,1800", (out / "report.html").resolve().as_uri()]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    im = Image.open(shot).convert("RGB")
    assert im.size == (1400, 1800)
    assert len({tuple(c) for c in np.asarray(im.resize((140, 180))).reshape(-1, 3)}) > 50  # a page with tables and images, not a blank one
    if os.environ.get("ARBOOTH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ARBOOTH_KEEP_SCREENSHOT"])


def test_another_base_on_the_toy_subjects_gets_no_oracle_columns(tmp_path):
    """The toy oracle reads 32x32 images only: the tiny random base (256 px) on the toy benchmark is scored
    by the protocol alone instead of failing in the oracle after training (found by a new-user trial)."""
    report = run_bench(BenchConfig(out=str(tmp_path / "out"), config=str(ROOT / "configs" / "subject" / "tiny.yaml"),
                                   subjects=("star_blue_green",), prompts_per_subject=1, images_per_prompt=1,
                                   pres_samples=2, random_weights=True, n_boot=50, overrides=("steps=1",),
                                   variants=(Variant("full"),)))
    row = report["per_subject"]["full"][0]
    assert row["I_DINO"] is not None and "subject_acc" not in row and "class_shape_acc" not in row
