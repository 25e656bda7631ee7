"""`arbooth bench-subject`: train, sample and score a set of subjects, aggregated as the ViCo table.

For every variant (a name and config overrides) and every subject of a benchmark folder in the
ViCo/DreamBench layout (arbooth/bench/plan.py), the subject recipe trains a personalization, the
personalized model samples `images_per_prompt` images per prompt (image i from seed + i, as the
authors' tools/run_arbooth_for_eval.py) and `pres_samples` images of the class prompt (PRES,
tools/run_arbooth_for_pres.py), and the images are scored under a named protocol (SubjectEvaluator,
arbooth/metrics/subject.py; plus the toy oracle on toy subjects). Aggregation is the authors'
(tools/evaluate.py): metrics per prompt, mean over prompts per subject, mean over subjects overall, and
the same over the live and the object subjects (the ViCo table's split). Variants after the first are
compared with it per subject: paired difference, bootstrap interval, paired t-test (metrics/paired.py).

Resumable at every level: a subject whose personalization was trained with the same config, photos
and base is not trained again (`bench_train.json` in its run folder); a half-trained one resumes; the
samples live in `SampleFolder`s (arbooth/sample_folder.py) that know what made them, so a rerun samples
exactly the missing images and another personalization or setting is refused unless `overwrite`.

Distributed: under `torchrun` / `accelerate launch` with N processes (WORLD_SIZE > 1) the (variant,
subject) trainings are split round-robin between ranks (each trains in a child process without the
launcher's process group, so one subject's training never all-reduces with another's), then the images
in contiguous chunks (each rank writes its own records file), then the scoring per subject; rank 0
merges the parts and writes the reports. The report's metrics do not depend on N.

Layout of `out`:
    <variant>/<subject>/run/          the train-subject run folder (its personalization, ...)
    <variant>/<subject>/samples/      the SampleFolder: the prompts' and the class prompt's images
    <variant>/<subject>/scores.json   that subject's per-prompt and mean metrics
    _parts/rank<r>.json               what rank r sampled and how long it took (merged by rank 0)
    report.json, report.md, report.html
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from statistics import mean

import torch
from PIL import Image

from arbooth.adapt.personalization import SUBJECT_FILE
from arbooth.bench.plan import TRAIN_RECORD, BenchConfig, BenchPlan, Unit, Variant, make_plan, unit_dir
from arbooth.bench.report import aggregate, write_reports
from arbooth.config import load_config, save_config
from arbooth.data.images import (
    center_crop_resize,
    pil_to_tensor_m11,
    read_image,
    read_image_folder,
    tensor_to_pil,
)
from arbooth.errors import ArboothError, CheckpointError
from arbooth.metrics.extractors import DEFAULT, DinoViT, OpenClip, build_lpips
from arbooth.metrics.subject import SubjectEvaluator
from arbooth.outputs import check_output, refuse_nested, write_text
from arbooth.recipes.subject_config import SubjectTrainConfig
from arbooth.recipes.train_subject import FULL_FILE, LORA_DIR, train
from arbooth.runs import flat_config, values_sha256
from arbooth.sample_folder import SampleFolder, file_identity
from arbooth.subject_bases import SUBJECT_PRESETS, load_sampler
from arbooth.toy.benchmark import ToyOracle
from arbooth.toy.models import TOY_DIR

log = logging.getLogger(__name__)

# Config keys that are not part of what made a personalization: switches, and paths (what they point to is
# fingerprinted instead).
_NOT_IDENTITY = ("resume", "overwrite", "out_dir", "subject", "model.model_ckpt", "model.vae_ckpt", "model.t5")
# Launcher variables a training child must not see: it trains one subject alone, not in the launcher's group.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                 "TORCHELASTIC_ERROR_FILE", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION")


# ----------------------------------------------------------------------------- ranks


class Ranks:
    """This process's place under a launcher (RANK / WORLD_SIZE / LOCAL_RANK, as torchrun and accelerate
    set them); one process: rank 0 of 1, no process group. `barrier()` waits for every rank (gloo on
    the CPU, nccl on GPUs; a day's timeout, since a rank may train for hours before the next barrier)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend, timeout=timedelta(days=1))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def chunk(self, items: list) -> list:
        """This rank's contiguous share of `items` (shares differ in length by at most one)."""
        n, w = len(items), self.world
        return items[self.rank * n // w:(self.rank + 1) * n // w]

    def device(self, name: str) -> torch.device:
        if name != "auto":
            return torch.device(name)
        return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- training


def train_config(plan: BenchPlan, unit: Unit, extra: tuple[str, ...] = ()) -> SubjectTrainConfig:
    """The subject recipe's config of one (variant, subject): the benchmark's config and overrides, the
    variant's overrides, then what the benchmark owns (subject folder, class noun, run folder) and `extra`."""
    own = [f"subject={json.dumps(str(unit.subject.folder))}", f"class_noun={json.dumps(unit.subject.class_noun)}",
           f"out_dir={json.dumps(str(unit_dir(plan, unit) / 'run'))}"]
    return load_config(SubjectTrainConfig, plan.config, [*plan.overrides, *unit.variant.overrides, *own, *extra])


def _stamp(path: Path) -> list:
    """A cheap fingerprint of a checkpoint file or folder: (relative name, size, mtime) of each file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[p.name if p == path else p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def training_identity(cfg: SubjectTrainConfig) -> dict:
    """What makes a personalization: the resolved config (without the resume/overwrite switches and the
    paths, so a moved or copied benchmark folder is still recognised), the subject photos' bytes and the base checkpoints' fingerprints (size + mtime: hashing a 2B checkpoint
    on every rerun would cost minutes; a personalization applied to another base is refused anyway, by
    the base hash it records, when it is loaded)."""
    values = {k: v for k, v in flat_config(cfg).items() if k not in _NOT_IDENTITY}
    photos = {p.name: file_identity(p)["sha256"] for p in read_image_folder(cfg.subject).paths}
    m = cfg.model
    ckpts = {"model_ckpt": m.model_ckpt or (str(TOY_DIR) if m.preset == "toy" else None), "vae_ckpt": m.vae_ckpt,
             "t5": m.t5}
    base = {k: _stamp(Path(v)) for k, v in ckpts.items() if v and Path(v).exists()}
    return {"config": values_sha256(values), "photos": photos, "base": base, "config_values": values}


def train_unit(plan: BenchPlan, unit: Unit, *, child: bool) -> dict:
    """Train one (variant, subject) unless its personalization exists with the same identity; returns its
    `bench_train.json` record (identity, train_s, personalization). `child`: train in a child process
    (under a launcher). Raises ArboothError when the run folder holds a personalization of another
    identity and `overwrite` is off."""
    cfg = train_config(plan, unit)
    run_dir = Path(cfg.out_dir)
    record_path = run_dir / TRAIN_RECORD
    identity = training_identity(cfg)
    pers = personalization_path(plan, unit)
    if record_path.is_file() and pers.exists():
        record = json.loads(record_path.read_text())
        if record.get("identity") == identity:
            log.info("%s/%s: trained already (%s)", unit.variant.name, unit.subject.name, pers)
            return record
        if not plan.overwrite:
            then = record.get("identity", {})
            what = [k for k in identity if k != "config_values" and then.get(k) != identity[k]]
            old_values, new_values = then.get("config_values", {}), identity["config_values"]
            keys = [f"{k}: {old_values.get(k)!r} there, {new_values.get(k)!r} now"
                    for k in sorted(set(old_values) | set(new_values)) if old_values.get(k) != new_values.get(k)]
            detail = f" ({'; '.join(keys)})" if "config" in what and keys else ""
            raise ArboothError(f"{run_dir} holds a personalization made with another {' and '.join(what)}{detail}: "
                               "use another --out, or pass --overwrite to train it again")
    # an interrupted training continues (the recipe refuses another config); --overwrite starts anew
    resume = (run_dir / "train_state.pt").is_file() and not plan.overwrite
    cfg = train_config(plan, unit, ("resume=true",) if resume else ("overwrite=true",) if plan.overwrite else ())
    t0 = time.perf_counter()
    if child:
        _train_in_child(cfg, unit_dir(plan, unit) / "train_config.yaml")
    else:
        _train_here(cfg)
    record = {"identity": identity, "train_s": time.perf_counter() - t0, "resumed": resume,
              "personalization": str(personalization_path(plan, unit))}
    write_text(record_path, json.dumps(record, indent=1) + "\n")
    return record


def _train_here(cfg: SubjectTrainConfig) -> None:
    """The recipe in this process, with the preset's thread count (as `train-subject`)."""
    threads = SUBJECT_PRESETS[cfg.model.preset].num_threads
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)


def _train_in_child(cfg: SubjectTrainConfig, config_path: Path) -> None:
    """The recipe in a child process that sees none of the launcher's variables (one process, this rank's
    GPU only): under a launcher, the recipe's Accelerator would otherwise join the launcher's group and
    average this subject's gradients with another rank's subject."""
    save_config(cfg, config_path)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = gpus[int(os.environ.get("LOCAL_RANK", "0")) % len(gpus)]
    res = subprocess.run([sys.executable, "-m", "arbooth.bench.train_one", str(config_path)], env=env, check=False)
    if res.returncode != 0:
        raise ArboothError(f"training {cfg.out_dir} failed (exit code {res.returncode}; its log is above)")


# ----------------------------------------------------------------------------- sampling


def personalization_path(plan: BenchPlan, unit: Unit) -> Path:
    """The unit's personalization as the recipe writes it: one file (full) or a peft adapter folder (lora)."""
    run = unit_dir(plan, unit) / "run"
    return run / LORA_DIR if (run / LORA_DIR).is_dir() else run / FULL_FILE


def _placeholder(path: Path) -> str:
    """The placeholder a personalization was trained with (its metadata; no tensors read)."""
    from safetensors import safe_open

    from arbooth.adapt.subject_token import PLACEHOLDER
    with safe_open(str(path / SUBJECT_FILE if path.is_dir() else path), framework="pt") as f:
        return (f.metadata() or {}).get("placeholder", PLACEHOLDER)


def _dtype(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"  # the CPU has no fast bf16


def sample_keys(plan: BenchPlan, unit: Unit) -> list[tuple[str, int, str]]:
    """(key prompt, seed, text) of every image of a unit: each template's images_per_prompt, then the
    class prompt's pres_samples (its key prompt is its text: it has no `{}`)."""
    s, seed = unit.subject, plan.options.seed
    phrase = f"{_placeholder(personalization_path(plan, unit))} {s.class_noun}"
    keys = [(t, seed + i, t.replace("{}", phrase)) for t in s.templates for i in range(plan.images_per_prompt)]
    cls_text = plan.class_prompt.replace("{}", s.class_noun)
    return keys + [(cls_text, seed + i, cls_text) for i in range(plan.pres_samples)]


def sample_identity(plan: BenchPlan, unit: Unit, device: torch.device) -> dict:
    """What makes a unit's images: the personalization's bytes, the subject phrase's placeholder, every
    sampling setting (None: the run's validation guidance / temperature) and the seed rule."""
    pers = personalization_path(plan, unit)
    return {"personalization": file_identity(pers), "placeholder": _placeholder(pers), "class_noun":
            unit.subject.class_noun, **plan.sampling, "dtype": _dtype(device), "seeds": "image i of a prompt: seed + i"}


def sample_units(plan: BenchPlan, ranks: Ranks, device: torch.device) -> dict:
    """Sample this rank's contiguous share of every unit's missing images; returns
    {"variant/subject": [images sampled, seconds]}. The shares are made of whole generation batches
    (gen_batch_size seeds of one prompt), the batches one process would sample, so every image comes
    out of the same batch (the same float rounding) whatever the number of ranks."""
    units, bs = plan.units, plan.options.gen_batch_size
    batches = []
    for u, unit in enumerate(units):
        by_prompt: dict[str, list[tuple[str, int, str]]] = {}
        for key in sample_keys(plan, unit):
            by_prompt.setdefault(key[0], []).append(key)
        batches += [(u, keys[i:i + bs]) for keys in by_prompt.values() for i in range(0, len(keys), bs)]
    mine: dict[int, list] = {}
    for u, keys in ranks.chunk(batches):
        mine.setdefault(u, []).append(keys)
    timing = {}
    writer = f"rank{ranks.rank}" if ranks.world > 1 else None
    for u, unit_batches in mine.items():
        unit = units[u]
        folder = SampleFolder(unit_dir(plan, unit) / "samples", sample_identity(plan, unit, device), writer=writer)
        sampler, n, seconds = None, 0, 0.0
        for keys in unit_batches:
            todo = set(folder.missing([(p, s) for p, s, _ in keys]))
            keys = [k for k in keys if (k[0], k[1]) in todo]
            if not keys:
                continue
            if sampler is None:
                sampler = load_sampler(personalization_path(plan, unit), device=device)
            t0 = time.perf_counter()
            images = sampler.generate([t for _, _, t in keys], seed=[s for _, s, _ in keys], cfg=plan.sampling["cfg"],
                                      tau=plan.sampling["tau"], top_k=plan.sampling["top_k"],
                                      top_p=plan.sampling["top_p"], dtype=_dtype(device))
            seconds += time.perf_counter() - t0
            for (p, s, t), x in zip(keys, images, strict=True):
                folder.add(p, s, tensor_to_pil(x), text=t)
            n += len(keys)
        if n:
            timing[f"{unit.variant.name}/{unit.subject.name}"] = [n, seconds]
            log.info("%s/%s: sampled %d image(s) in %.1f s", unit.variant.name, unit.subject.name, n, seconds)
    return timing


# ----------------------------------------------------------------------------- scoring


def build_evaluator(plan: BenchPlan, device: torch.device) -> tuple[SubjectEvaluator, str | None]:
    """The protocol's extractors (DINO ViT-S/16, CLIP ViT-B/32, LPIPS) and a note when they have random
    weights: asked for (random_weights), or, for the toy benchmark only, because the released weights
    are not on this machine (the toy oracle then carries the meaning). Random weights are drawn from a
    fixed seed, so every rank and every rerun scores with the same networks."""
    o = plan.options
    note = "asked for (--random-weights)" if o.random_weights else None
    weights = {"dino": None if o.random_weights else o.dino_weights, "clip": None if o.random_weights else o.clip_weights,
               "lpips": None if o.random_weights else o.lpips_backbone}
    built = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, make in (("dino", DinoViT), ("clip", OpenClip), ("lpips", build_lpips)):
            try:
                built[name] = make(weights[name])
            except CheckpointError:
                if not plan.toy or weights[name] != DEFAULT:
                    raise
                log.warning("toy benchmark: %s weights not found here, random weights instead", name)
                note = "the released weights are not on this machine (toy benchmark)"
                built[name] = make(None)
    return SubjectEvaluator(built["dino"], built["clip"], built["lpips"], o.protocol, device, o.eval_batch_size), note


def _unit_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [0, 1] (the toy oracle's input)."""
    return torch.stack([pil_to_tensor_m11(center_crop_resize(im, size)) for im in images]).add(1).div(2)


def score_unit(plan: BenchPlan, unit: Unit, ev: SubjectEvaluator, oracle, photo_features: dict | None = None) -> dict:
    """Per-prompt metrics (the protocol's, and the toy oracle's for a toy subject), the subject's means
    over prompts and the class prompt's PRES; written to <unit>/scores.json. Raises ArboothError when an
    image of the unit is missing."""
    s, seed, n = unit.subject, plan.options.seed, plan.images_per_prompt
    folder = SampleFolder.open(unit_dir(plan, unit) / "samples")
    photos = read_image_folder(s.folder).images
    cache = {} if photo_features is None else photo_features  # the photos' features, shared by the variants
    if s.name not in cache:
        cache[s.name] = (ev.dino_features(photos), ev.clip_features(photos))
    subj_dino, subj_clip = cache[s.name]
    rows = []
    for t in s.templates:
        recs = folder.records([(t, seed + i) for i in range(n)])
        if len(recs) < n:
            raise ArboothError(f"{folder.folder}: {n - len(recs)} image(s) of {t!r} missing; run again to sample them")
        images = [read_image(r["path"]) for r in recs]
        row = {"prompt": t, **ev.prompt_metrics(images, t, s.class_noun, subj_dino, subj_clip)}
        if oracle is not None and s.attributes and oracle.applies_to(images[0].size):
            size = images[0].size[0]
            row.update(oracle.prompt_metrics(_unit_tensor(images, size), t.replace("{}", s.class_noun),
                                             s.attributes, _unit_tensor(photos, size)))
        rows.append(row)
    means = {}
    for k in dict.fromkeys(k for r in rows for k in r if k not in ("prompt", "n_images")):
        vals = [r[k] for r in rows if r.get(k) is not None]
        means[k] = mean(vals) if vals else None
    cls_text = plan.class_prompt.replace("{}", s.class_noun)
    if plan.pres_samples:
        recs = folder.records([(cls_text, seed + i) for i in range(plan.pres_samples)])
        if len(recs) < plan.pres_samples:
            raise ArboothError(f"{folder.folder}: class-prompt image(s) missing; run again to sample them")
        cls_images = [read_image(r["path"]) for r in recs]
        means["PRES"] = ev.pres(subj_dino, cls_images)
        if oracle is not None and s.attributes and oracle.applies_to(cls_images[0].size):
            size = cls_images[0].size[0]
            means.update(oracle.class_metrics(_unit_tensor(cls_images, size), s.attributes, _unit_tensor(photos, size)))
    scores = {"variant": unit.variant.name, "subject": s.name, "live": s.live, "class_noun": s.class_noun,
              "class_prompt": cls_text, "n_images": n * len(rows), "per_prompt": rows, "mean": means}
    write_text(unit_dir(plan, unit) / "scores.json", json.dumps(scores, indent=1) + "\n")
    return scores


# ----------------------------------------------------------------------------- the whole benchmark


def run_bench(opts: BenchConfig) -> dict | None:
    """Train, sample, score and report (module docstring); returns the report on rank 0, None on others.
    Raises ArboothError / ConfigError (one line) for a bad benchmark, option or output folder."""
    ranks = Ranks()
    out = Path(opts.out)
    check_output(out, folder=True, what="--out")
    if opts.benchmark is not None:
        refuse_nested(out, opts.benchmark, what="the benchmark folder")
    plan = make_plan(opts, write_toy=ranks.main) if ranks.main else None
    ranks.barrier()
    if plan is None:
        plan = make_plan(opts, write_toy=False)
    for unit in plan.units:  # every config is checked before anything trains
        train_config(plan, unit)
    device = ranks.device(opts.device)
    t_start = time.perf_counter()
    for k, unit in enumerate(plan.units):
        if k % ranks.world == ranks.rank:
            train_unit(plan, unit, child=ranks.world > 1)
    ranks.barrier()
    if ranks.main:  # one process checks (and with overwrite clears) every sample folder before any rank writes
        for unit in plan.units:
            SampleFolder(unit_dir(plan, unit) / "samples", sample_identity(plan, unit, device), overwrite=opts.overwrite)
    ranks.barrier()
    timing = sample_units(plan, ranks, device)
    write_text(out / "_parts" / f"rank{ranks.rank}.json", json.dumps({"sampling": timing}) + "\n")
    ranks.barrier()
    mine = [u for k, u in enumerate(plan.units) if k % ranks.world == ranks.rank]
    note = None
    if mine:
        ev, note = build_evaluator(plan, device)
        oracle = ToyOracle() if any(u.subject.attributes for u in mine) else None
        photo_features: dict = {}
        for unit in mine:
            score_unit(plan, unit, ev, oracle, photo_features)
    write_text(out / "_parts" / f"rank{ranks.rank}.json", json.dumps({"sampling": timing, "extractors_note": note}) + "\n")
    ranks.barrier()
    report = None
    if ranks.main:
        parts = [json.loads((out / "_parts" / f"rank{r}.json").read_text()) for r in range(ranks.world)]
        report = aggregate(plan, parts, wall_s=time.perf_counter() - t_start, world=ranks.world)
        write_reports(plan, report)
    ranks.barrier()
    return report


def bench_subject(benchmark: str | None = None, **options) -> dict | None:
    """Python form of `arbooth bench-subject`: the same options as BenchConfig's fields (variants as
    Variant or "name:key=value ..." strings). Returns the report (rank 0)."""
    variants = tuple(v if isinstance(v, Variant) else Variant.parse(v) for v in options.pop("variants", ()))
    tuples = {k: tuple(v) for k, v in options.items() if k in ("overrides", "subjects", "live", "class_nouns")
              and v is not None}
    return run_bench(BenchConfig(benchmark=benchmark, variants=variants, **{**options, **tuples}))
