"""Subject fidelity of personalized generations: I_DINO, I_CLIP, T_CLIP, DIV and PRES, per prompt and averaged.

  arbooth eval-subject --generated runs/dog/samples --subject subjects/dog --class-noun dog \\
      --prompts prompts.txt [--class-images runs/dog/class_samples] [--protocol dreammatcher]

--prompts is a file of templates, one per line, with `{}` for the subject phrase (the ViCo lists).
For the ViCo live/non-live split pass both files as --live-prompts/--object-prompts and say --live
for live subjects (cats, dogs). With --model the images are sampled first into --generated, a sample
folder (arbooth/sample_folder.py) that records what made it: the personalization file's name and
SHA-256, the prompt list, the subject phrase and the seed. A rerun samples exactly the missing images
(a deleted or damaged one is sampled once more and counted once); a folder made by another
personalization, prompt list or seed is refused, naming what differs, unless --overwrite. Without
--model, the images are read from such a sample folder, from a legacy <generated>/manifest.jsonl
(file, prompt, seed), or, as in the ARBooth evaluator, from <generated>/prompt_00, prompt_01, ...
(one folder per template line, optionally with samples/ inside).
--class-images holds images the personalized model generated from its class prompt (PRES); with --model
and no --class-images they are sampled into the same sample folder, from the run's
prompts.class_template ("a photo of {class}" by default).

Protocols: `dreambooth` (DINO with ImageNet normalisation at 224, CLIP's own preprocessing, T_CLIP on
the prompt with the class noun) and `dreammatcher` (what the DreamMatcher/ARBooth evaluator computes,
the ViCo-protocol tables: see docs/metrics.md). Results go to <out>/eval_subject.json and .md.
--random-weights builds the extractors with random weights: a smoke test, the numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import mean

from PIL import Image
from tqdm import tqdm

from arbooth.adapt.subject_token import CLASS_TEMPLATE, PLACEHOLDER
from arbooth.data.images import read_image, read_image_folder
from arbooth.data.subject import read_prompt_templates
from arbooth.errors import ArboothError
from arbooth.metrics.extractors import DEFAULT, DinoViT, OpenClip, build_lpips
from arbooth.metrics.report import RANDOM_WEIGHTS_NOTE, markdown_table, pick_device, publish_report
from arbooth.metrics.subject import PROTOCOLS, SubjectEvaluator
from arbooth.outputs import check_output, refuse_inputs, refuse_nested
from arbooth.sample_folder import IDENTITY_FILE, SampleFolder, file_identity

log = logging.getLogger(__name__)

METRICS = ("I_DINO", "I_CLIP", "T_CLIP", "T_CLIP_class_noun", "T_CLIP_raw_template", "DIV")
# (prompt text, seed) -> image. A generator that also has `images(prompt, seeds) -> list of images`
# (arbooth.adapt.personalized_sampler.PersonalizedSampler) is asked for a batch at a time instead.
SubjectGenerator = Callable[[str, int], Image.Image]


def _sample(generator: SubjectGenerator, text: str, seeds: list[int],
            batch_size: int) -> Iterator[tuple[int, Image.Image]]:
    """(seed, image of `text` from that seed) for every seed, up to `batch_size` per generator call."""
    if batch_size < 1:
        raise ArboothError(f"the generation batch size must be >= 1, got {batch_size}")
    batched = getattr(generator, "images", None)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        images = batched(text, chunk) if callable(batched) else [generator(text, s) for s in chunk]
        yield from zip(chunk, images, strict=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generated", type=Path, required=True, help="generated images (see layouts above)")
    p.add_argument("--subject", type=Path, required=True, help="folder of the real subject photos")
    p.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog (used by T_CLIP)")
    p.add_argument("--prompts", type=Path, default=None, help="prompt templates, one per line, `{}` = subject")
    p.add_argument("--live-prompts", type=Path, default=None, help="ViCo live-subject prompt file")
    p.add_argument("--object-prompts", type=Path, default=None, help="ViCo object prompt file")
    p.add_argument("--live", action="store_true", help="the subject is live: use --live-prompts")
    p.add_argument("--class-images", type=Path, default=None,
                   help="images generated from the plain class prompt by the personalized model (PRES)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="dreammatcher")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: <generated>/eval_subject)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dino-weights", default=DEFAULT, help="DINO ViT-S/16 weights file (default: HF cache)")
    p.add_argument("--clip-weights", default=DEFAULT, help="open_clip ViT-B-32 OpenAI weights (default: HF cache)")
    p.add_argument("--lpips-backbone", default=DEFAULT, help="torchvision AlexNet weights (default: torch hub cache)")
    p.add_argument("--random-weights", action="store_true",
                   help="smoke test: random-weight extractors (meaningless numbers)")
    g = p.add_argument_group("generation (--model)")
    g.add_argument("--model", type=Path, default=None, help="personalized ARBooth checkpoint to sample first")
    g.add_argument("--subject-phrase", default=None,
                   help="text put in `{}` when sampling (default: '<placeholder> <class noun>', e.g. '<S*> dog')")
    g.add_argument("--pres-samples", type=int, default=100,
                   help="with --model and no --class-images: images of the run's class prompt (prompts.class_template) "
                        "sampled for PRES")
    g.add_argument("--images-per-prompt", type=int, default=8)
    g.add_argument("--gen-batch-size", type=int, default=8,
                   help="images sampled together (each still uses its own seed; lower it if memory runs out)")
    g.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i (as ARBooth)")
    g.add_argument("--overwrite", action="store_true",
                   help="--generated holds samples of another personalization, prompt list or seed: discard them "
                        "(default: refuse, naming what differs)")


def read_templates(args: argparse.Namespace) -> list[str]:
    path = args.prompts
    if path is None:
        path = args.live_prompts if args.live else args.object_prompts
    if path is None:
        raise ArboothError("give --prompts FILE, or --live-prompts/--object-prompts (with --live for live subjects)")
    return list(read_prompt_templates(path))


def generated_groups(generated: Path, templates: list[str]) -> list[tuple[str, list[Path] | Path]]:
    """(template, folder or file list) per prompt: from a sample folder's records (one per image, the
    images still on disk as recorded), else a legacy manifest.jsonl (one per (prompt, file), the last
    line winning), else prompt_XX folders."""
    if (generated / IDENTITY_FILE).is_file():
        by_prompt: dict[str, list[Path]] = {}
        for rec in SampleFolder.open(generated).records():
            by_prompt.setdefault(rec["prompt"], []).append(rec["path"])
        return [(t, by_prompt.get(t, [])) for t in templates]
    manifest = generated / "manifest.jsonl"
    if manifest.is_file():
        by_prompt = {}
        for line in manifest.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                files = by_prompt.setdefault(rec["prompt"], [])
                if generated / rec["file"] not in files:  # a regenerated file was appended a second time
                    files.append(generated / rec["file"])
        return [(t, by_prompt.get(t, [])) for t in templates]
    groups = []
    for i, t in enumerate(templates):
        d = generated / f"prompt_{i:02d}"
        groups.append((t, d / "samples" if (d / "samples").is_dir() else d))
    if not any(isinstance(d, Path) and d.is_dir() for _, d in groups):
        raise ArboothError(f"{generated}: neither manifest.jsonl nor prompt_00/ ... folders found")
    return groups


def class_prompt(class_noun: str, template: str = CLASS_TEMPLATE) -> str:
    """The PRES prompt (DreamBooth's prior-preservation prompt): the run's `prompts.class_template` (recorded
    in its personalization file; "a photo of {cls}" by default) with the class noun."""
    return template.format(cls=class_noun)


def run_class_template(checkpoint: Path) -> str:
    """The class template a personalization file's run trained with (its metadata only: no tensor read)."""
    import torch

    from arbooth.adapt.personalization import Personalization, personalization_metadata

    return Personalization({}, torch.empty(0), personalization_metadata(checkpoint)).class_template


def subject_keys(templates: list[str], *, n_per_prompt: int, seed: int) -> list[tuple[str, int]]:
    """(template, seed + i) for image i of every template, as ARBooth's tools/run_arbooth_for_eval.py."""
    return [(t, seed + i) for t in templates for i in range(n_per_prompt)]


def generate_subject_samples(generator: SubjectGenerator, templates: list[str], subject_phrase: str,
                             folder: SampleFolder, *, n_per_prompt: int, seed: int, batch_size: int = 1) -> int:
    """Sample the missing images of `subject_keys` into the sample folder (record: prompt template, seed,
    text); image i of every prompt uses seed + i, also when `batch_size` images are sampled together.
    Returns the number written."""
    todo = folder.missing(subject_keys(templates, n_per_prompt=n_per_prompt, seed=seed))
    written = 0
    for template in tqdm(templates, desc="sampling", unit="prompt"):
        text = template.replace("{}", subject_phrase)
        for s, image in _sample(generator, text, [s for t, s in todo if t == template], batch_size):
            folder.add(template, s, image, text=text)
            written += 1
    return written


def load_subject_generator(checkpoint: Path, device: str) -> SubjectGenerator:
    """The ARBooth generator of a personalization file: (prompt, seed) -> PIL image, with the
    personalization's base model rebuilt from the config recorded in the file."""
    from arbooth.subject_bases import load_sampler

    return load_sampler(checkpoint, device=device)


def generate_class_samples(generator: SubjectGenerator, class_noun: str, folder: SampleFolder, *, n: int,
                           seed: int, batch_size: int = 1) -> list[Path]:
    """PRES images: the missing ones of `n` samples of the run's class prompt (`class_prompt` with the class
    template the generator's personalization records, else the default) (image i from seed + i) into the
    sample folder; returns the paths of all `n`."""
    pers = getattr(generator, "personalization", None)
    text = class_prompt(class_noun, pers.class_template if pers is not None else CLASS_TEMPLATE)
    keys = [(text, seed + i) for i in range(n)]
    todo = [s for _, s in folder.missing(keys)]
    with tqdm(total=n, initial=n - len(todo), desc="class prompt", unit="image") as bar:
        for s, image in _sample(generator, text, todo, batch_size):
            folder.add(text, s, image, text=text)
            bar.update()
    return [r["path"] for r in folder.records(keys)]


def sample_identity(args: argparse.Namespace, templates: list[str]) -> dict:
    """What makes the pixels of an eval-subject --model sample folder (arbooth/sample_folder.py): the
    personalization file (its name and SHA-256 also cover the guidance, temperature and base it records),
    the prompt list, the phrase put in `{}` (None: the placeholder the file records + the class noun) and
    the seed rule."""
    return {"command": "eval-subject", "model": file_identity(args.model), "prompts": list(templates),
            "subject_phrase": args.subject_phrase, "class_noun": args.class_noun, "seed": args.seed,
            "seed_rule": "image i of a prompt: seed + i"}


def _read(source: list[Path] | Path, skipped: dict[str, str]) -> list[Image.Image]:
    if isinstance(source, Path):
        if not source.is_dir():
            return []
        res = read_image_folder(source, require_any=False)
        skipped.update({str(k): v for k, v in res.skipped.items()})
        return res.images
    images = []
    for p in source:
        try:
            images.append(read_image(p))
        except ArboothError as e:
            log.warning("skipping %s", e)
            skipped[str(p)] = str(e)
    return images


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any model loads: the report folder and (with --model) the sample folder can be written,
    and samples never go into the subject's photos or overwrite the personalization file."""
    if args.model is not None:
        check_output(args.generated, folder=True, what="--generated")
        refuse_nested(args.generated, args.subject, what="--subject")
        refuse_inputs([args.generated], [args.model])
    check_output(args.out or args.generated / "eval_subject", folder=True, what="report")


def check_ranges(args: argparse.Namespace) -> None:
    """Every count and size in range, before any file is read or model loaded: one line each."""
    checks = [("--batch-size", args.batch_size, 1)]
    if args.model is not None:
        checks += [("--images-per-prompt", args.images_per_prompt, 1), ("--gen-batch-size", args.gen_batch_size, 1),
                   ("--pres-samples", args.pres_samples, 0)]
    for name, value, low in checks:
        if value < low:
            raise ArboothError(f"{name} must be at least {low}, got {value}")


def _sample_first(args: argparse.Namespace, templates: list[str],
                  device) -> tuple[list[tuple[str, list[Path]]], list[Path] | None, dict]:
    """--model: sample what the folder lacks (loading the model only then); -> the per-prompt groups, the
    PRES images (None when --class-images is given or --pres-samples is 0) and the folder's identity."""
    folder = SampleFolder(args.generated, sample_identity(args, templates), overwrite=args.overwrite)
    keys = subject_keys(templates, n_per_prompt=args.images_per_prompt, seed=args.seed)
    pres = args.class_images is None and args.pres_samples > 0
    text = class_prompt(args.class_noun, run_class_template(args.model)) if pres else ""
    pres_keys = [(text, args.seed + i) for i in range(args.pres_samples if pres else 0)]
    missing = folder.missing(keys + pres_keys)
    log.info("%s: %d of %d image(s) to sample", args.generated, len(missing), len(keys) + len(pres_keys))
    if missing:
        generator = load_subject_generator(args.model, str(device))
        # the placeholder the personalization was trained with (recorded in its file), else the default <S*>
        placeholder = getattr(getattr(generator, "personalization", None), "placeholder", PLACEHOLDER)
        generate_subject_samples(generator, templates, args.subject_phrase or f"{placeholder} {args.class_noun}",
                                 folder, n_per_prompt=args.images_per_prompt, seed=args.seed,
                                 batch_size=args.gen_batch_size)
        if pres:
            generate_class_samples(generator, args.class_noun, folder, n=args.pres_samples, seed=args.seed,
                                   batch_size=args.gen_batch_size)
    groups = [(t, [r["path"] for r in folder.records([k for k in keys if k[0] == t])]) for t in templates]
    return groups, ([r["path"] for r in folder.records(pres_keys)] if pres else None), folder.identity


def main(args: argparse.Namespace) -> int:
    check_ranges(args)
    templates = read_templates(args)
    device = pick_device(args.device)
    _check_outputs(args)
    groups, pres_images, identity = None, None, None
    if args.model is not None:
        groups, pres_images, identity = _sample_first(args, templates, device)
    if args.random_weights:
        log.warning(RANDOM_WEIGHTS_NOTE)

    def w(value: str) -> str | None:
        return None if args.random_weights else value

    ev = SubjectEvaluator(DinoViT(w(args.dino_weights)), OpenClip(w(args.clip_weights)),
                          build_lpips(w(args.lpips_backbone)), args.protocol, device, args.batch_size)

    skipped: dict[str, str] = {}
    subject = read_image_folder(args.subject)
    skipped.update({str(k): v for k, v in subject.skipped.items()})
    subj_dino, subj_clip = ev.dino_features(subject.images), ev.clip_features(subject.images)

    rows = []
    if groups is None:
        groups = generated_groups(args.generated, templates)
    for template, source in tqdm(groups, desc="prompts", unit="prompt"):
        images = _read(source, skipped)
        if not images:
            log.warning("no generated image for prompt %r", template)
            rows.append({"prompt": template, "n_images": 0})
            continue
        rows.append({"prompt": template, **ev.prompt_metrics(images, template, args.class_noun, subj_dino, subj_clip)})
    scored = [r for r in rows if r["n_images"]]
    if not scored:
        raise ArboothError(f"no readable generated image under {args.generated}")
    avg = {"prompt": "mean over prompts", "n_images": sum(r["n_images"] for r in scored)}
    for m in METRICS:
        vals = [r[m] for r in scored if r.get(m) is not None]
        avg[m] = mean(vals) if vals else None
    if pres_images is not None:
        avg["PRES"] = ev.pres(subj_dino, _read(pres_images, skipped))
    elif args.class_images is not None:
        cls = read_image_folder(args.class_images, recursive=True)
        skipped.update({str(k): v for k, v in cls.skipped.items()})
        avg["PRES"] = ev.pres(subj_dino, cls.images)

    report = {"protocol": args.protocol, "class_noun": args.class_noun, "random_weights": bool(args.random_weights),
              "t_clip_text": "raw template line" if args.protocol == "dreammatcher" else "prompt with class noun",
              "extractors": {"dino": DinoViT.name, "clip": ev.clip.name, "lpips": "lpips v0.1 alex",
                             "weights": {"dino": str(w(args.dino_weights)), "clip": str(w(args.clip_weights)),
                                         "lpips_backbone": str(w(args.lpips_backbone))}},
              "subject": str(args.subject), "n_subject_images": len(subject.images),
              "generated": str(args.generated), "samples": identity, "average": avg, "per_prompt": rows, "skipped": skipped}
    body = ("## Averaged\n\n" + markdown_table([avg], [c for c in ("PRES", *METRICS, "n_images") if c in avg]) +
            "\n\n## Per prompt\n\n" + markdown_table(rows, ["prompt", *METRICS, "n_images"]))
    publish_report(args.out or args.generated / "eval_subject", "eval_subject", report,
                   f"eval-subject (protocol: {args.protocol})", body,
                   random_weights=args.random_weights, n_skipped=len(skipped))
    return 0
