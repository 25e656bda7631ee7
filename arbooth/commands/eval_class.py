"""Class-conditional generation quality: FID, precision and recall (k=3), optional sFID.

Compares a folder of generated images with a folder of real images (searched recursively), prints a
Markdown table and saves <out>/eval_class.json and <out>/eval_class.md. Reference features are cached
under --cache-dir keyed on the SHA-256 of the reference folder's files and the extractor.

  arbooth eval-class --generated gen/ --reference data/test/
  arbooth eval-class --generated gen/ --reference data/flowers102/test/ --result runs/flowers_lora/final
  arbooth eval-class --generated gen/ --reference imagenet/val/ --model var --depth 16 \\
      --vae-ckpt vae_ch160v4096z32.pth --var-ckpt var_d16.pth --cfg 1.5

With --result (a train-class result folder: FFT, LoRA or LNTuning, no export needed) or --model var
(a released checkpoint), the images are sampled first: as many per class as the reference folder holds
in that class's sub-folder (recursively), as the class paper evaluates on each dataset's test split.
Which label a reference class folder is sampled under:
- --result: matched BY NAME to the class table the result recorded at training (train-class numbers
  its classes by their sorted folder names, so folder `10` of a `1`...`102` dataset is label 1). A
  reference class the model never saw, or a trained class without a reference folder, is an error.
- --model var: the folder's name read as an integer is the ImageNet label (`0207/` is class 207).
The samples go to --generated, a sample folder (arbooth/sample_folder.py) that records what made them
(the result's or checkpoints' names and SHA-256, cfg, top_k, top_p, dtype, seed, the class table): a
rerun samples exactly the missing images, and a folder made otherwise is refused naming what differs,
unless --overwrite. Only the images the folder records for this run are scored.
--extractor toy swaps the Inception for the shipped toy feature extractor (arbooth/toy/class_var.py), a toy
stand-in for images of the built-in class world (`arbooth toy-data`): its numbers compare only with each
other. --random-weights (= --extractor random) swaps in a small random CNN: a smoke test, meaningless numbers.

  arbooth toy-data --out data/toy && arbooth eval-class --extractor toy --generated gen/ \
      --reference data/toy/new_shapes/test
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arbooth.data.images import list_image_files, read_image, tensor_to_pil
from arbooth.errors import ArboothError, ImageReadError
from arbooth.metrics.extractors import DEFAULT, InceptionFID, TinyFIDNet
from arbooth.metrics.fid import (
    FrechetDistance,
    GaussianStats,
    folder_content_hash,
    load_cached_features,
    precision_recall,
    save_cached_features,
)
from arbooth.metrics.report import (
    RANDOM_WEIGHTS_NOTE,
    iter_images,
    markdown_table,
    pick_device,
    publish_report,
)
from arbooth.outputs import check_output, refuse_inputs, refuse_nested
from arbooth.sample_folder import IDENTITY_FILE, SampleFolder, file_identity

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generated", type=Path, required=True, help="folder of generated images (recursive)")
    p.add_argument("--reference", type=Path, required=True,
                   help="folder of real images, e.g. the test split (class subfolders for --model)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: <generated>/eval_class)")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall")
    p.add_argument("--sfid", action="store_true", help="also compute sFID (spatial Inception features)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "arbooth" / "fid_ref")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.add_argument("--inception-weights", default=DEFAULT,
                   help="FID Inception weights file (torch-fidelity format); default: torch hub cache")
    p.add_argument("--extractor", choices=["inception", "toy", "random"], default="inception",
                   help="feature network: the FID Inception, the shipped toy stand-in for toy-world images, "
                        "or a random CNN (smoke tests)")
    p.add_argument("--random-weights", action="store_true", help="the same as --extractor random")
    g = p.add_argument_group("generation (--result or --model)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--result", type=Path, default=None,
                     help="a train-class result folder (RUN/final or RUN/checkpoints/step_N) to sample first; "
                          "each reference class folder is matched by name to the class table it recorded")
    src.add_argument("--model", choices=["var"], default=None,
                     help="sample first with a released VAR (--vae-ckpt, --var-ckpt); each reference class "
                          "folder's integer name is its ImageNet label (0207/ -> class 207)")
    g.add_argument("--depth", type=int, default=16, help="--model var: the released depth")
    g.add_argument("--vae-ckpt", type=Path, default=None,
                   help="--model var: the tokenizer; --result: overrides the base path it recorded")
    g.add_argument("--var-ckpt", type=Path, default=None,
                   help="--model var: the transformer; --result: overrides the base path it recorded")
    g.add_argument("--cfg", type=float, default=1.5)
    g.add_argument("--top-k", type=int, default=900)
    g.add_argument("--top-p", type=float, default=0.96)
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast of the blocks")
    g.add_argument("--seed", type=int, default=0,
                   help="image k (classes in label order, then index within the class) uses seed + k")
    g.add_argument("--per-class", type=int, default=None, help="images per class (default: as in reference)")
    g.add_argument("--gen-batch-size", type=int, default=16)
    g.add_argument("--overwrite", action="store_true",
                   help="--generated holds samples made otherwise (another model or setting): discard them "
                        "(default: refuse, naming what differs)")


# ----------------------------------------------------------------------------- features

def _iter_files(files: list[Path], skipped: dict[str, str]):
    for p in files:
        try:
            yield p, read_image(p)
        except ImageReadError as e:
            skipped[str(p)] = str(e)
            log.warning("skipping %s", e)


def extract_features(folder: Path, extractor: torch.nn.Module, device: torch.device, batch_size: int,
                     skipped: dict[str, str], desc: str, *, files: list[Path] | None = None) -> dict[str, np.ndarray]:
    """Features of every readable image under `folder` (or of exactly `files`); images of one size are
    batched together (the extractor resizes internally, so sizes may differ between batches)."""
    feats: dict[str, list[np.ndarray]] = {}
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if not batch:
            return
        with torch.no_grad():
            out = extractor(torch.stack(batch).to(device))
        for k, v in out.items():
            feats.setdefault(k, []).append(v.float().cpu().numpy())
        batch.clear()

    n_files = len(files) if files is not None else len(list_image_files(folder, recursive=True))
    images = _iter_files(files, skipped) if files is not None else iter_images(folder, skipped)
    for _, im in tqdm(images, total=n_files, desc=desc, unit="img"):
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        if batch and (x.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(x)
    flush()
    if not feats:
        raise ArboothError(f"no readable image in {folder}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return {k: np.concatenate(v) for k, v in feats.items()}


def reference_features(folder: Path, extractor: torch.nn.Module, device: torch.device, batch_size: int,
                       skipped: dict[str, str], cache_dir: Path | None) -> tuple[dict[str, np.ndarray], str]:
    files = list_image_files(folder, recursive=True)
    key = hashlib.sha256((folder_content_hash(files, folder) + "|" + extractor.feature_id).encode()).hexdigest()
    if cache_dir is not None:
        cached = load_cached_features(cache_dir, key)
        if cached is not None:
            return cached, key
    feats = extract_features(folder, extractor, device, batch_size, skipped, "reference")
    if cache_dir is not None:
        save_cached_features(cache_dir, key, feats)
    return feats, key


# ----------------------------------------------------------------------------- generation

def class_counts(reference: Path) -> dict[str, int]:
    """Images per class name in a class-folder reference, read with the one rule of
    `arbooth.data.class_dataset.scan_image_folder` (recursive; a class without images is an error)."""
    from arbooth.data.class_dataset import scan_image_folder

    samples, classes = scan_image_folder(reference, split=None)
    counts = dict.fromkeys(classes, 0)
    for s in samples:
        counts[classes[s.label]] += 1
    return counts


IMAGENET_CLASSES = 1000  # the released VAR's class table (FoundationVision/VAR models/__init__.py)


def class_labels(counts: dict[str, int]) -> dict[int, int]:
    """{label: count}: a class folder's label is its NAME read as an integer (e.g. `0207/` is ImageNet
    class 207), never its position among the folders (a subset of classes would shift every label)."""
    return {imagenet_labels(list(counts))[name]: n for name, n in counts.items()}


def imagenet_labels(names: list[str]) -> dict[str, int]:
    """--model var: {folder name: ImageNet label}, the name read as an integer (`0207` -> 207). Raises
    ArboothError naming the folders that are no integer, or no label of the 1000 classes."""
    bad = [name for name in names if not name.isdigit()]
    if bad:
        raise ArboothError(f"cannot tell which class label the reference folder(s) {bad[:4]} are: to sample with "
                           "--model var, name each class folder by its integer ImageNet label (e.g. 0207/); a "
                           "fine-tuned result samples by class name with --result")
    out = {name: int(name) for name in names}
    high = [name for name, label in out.items() if label >= IMAGENET_CLASSES]
    if high:
        raise ArboothError(f"reference folder(s) {high[:4]} name no ImageNet class (labels 0-{IMAGENET_CLASSES - 1})")
    return out


def trained_labels(names: list[str], classes: tuple[str, ...] | list[str], result: Path) -> dict[str, int]:
    """--result: {reference folder name: the label the result was trained with}, by name through the class
    table the result recorded (train-class: sorted folder names, label = position). Raises ArboothError
    naming a reference class the model never saw, or a trained class with no reference folder."""
    index = {name: i for i, name in enumerate(classes)}
    unseen = [n for n in names if n not in index]
    if unseen:
        raise ArboothError(f"reference class folder(s) {unseen[:4]} are not among the {len(classes)} classes "
                           f"{result} was trained on ({', '.join(list(classes)[:4])}{', ...' if len(classes) > 4 else ''})")
    absent = [c for c in classes if c not in set(names)]
    if absent:
        raise ArboothError(f"class(es) {absent[:4]} that {result} was trained on have no folder in the reference "
                           f"({len(absent)} missing): evaluate on the test split of the same dataset")
    return {n: index[n] for n in names}


def class_keys(labels: dict[str, int], counts: dict[str, int], *, seed: int) -> list[tuple[str, int, int]]:
    """(class name, label, seed) of every image: classes in label order, then index within the class;
    image k uses seed + k alone, whatever the batch size."""
    order = sorted(labels, key=lambda name: labels[name])
    jobs = [(name, labels[name]) for name in order for _ in range(counts[name])]
    return [(name, label, seed + k) for k, (name, label) in enumerate(jobs)]


def generate_class_samples(generate, jobs: list[tuple[str, int, int]], folder: SampleFolder, *,
                           batch_size: int) -> int:
    """Sample the images of `jobs` (class_keys) the folder lacks with `generate(labels_B, seeds_B) ->
    (B, 3, H, W) in [0, 1]`; each is written atomically and recorded under (class name, seed) with its
    label. Returns the number written."""
    missing = set(folder.missing([(name, s) for name, _, s in jobs]))
    todo = [j for j in jobs if (j[0], j[2]) in missing]
    written = 0
    for start in tqdm(range(0, len(todo), batch_size), desc="sampling", unit="batch"):
        chunk = todo[start:start + batch_size]
        images_B3HW = generate(torch.tensor([label for _, label, _ in chunk]), [s for _, _, s in chunk])
        for (name, label, s), x in zip(chunk, images_B3HW, strict=True):
            folder.add(name, s, tensor_to_pil(x), label=label)
            written += 1
    return written


def _var_generator(args: argparse.Namespace, device: torch.device):
    """(labels_B, seeds) -> images of --model var or --result."""
    if args.result is not None:
        from arbooth.adapt.finetuned import load_finetuned

        var = load_finetuned(args.result, vae_ckpt=args.vae_ckpt and str(args.vae_ckpt),
                             var_ckpt=args.var_ckpt and str(args.var_ckpt), device=device).var
    else:
        from arbooth.models import load_var  # the public VAR API (arbooth/models/var_loading.py)
        var = load_var(depth=args.depth, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt).to(device).eval()

    def generate(labels_B: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return var.generate(labels_B.to(device), cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=seeds,
                                dtype=args.dtype)
    return generate


def sample_identity(args: argparse.Namespace, labels: dict[str, int]) -> dict:
    """What makes the pixels of an eval-class sample folder: the result folder's files (its config, class
    table and base hashes included; load_finetuned refuses another base) or the released checkpoints,
    the sampling settings, the seed rule and the name -> label table."""
    if args.result is not None:
        model = {"result": file_identity(args.result)}
    else:
        model = {"var": file_identity(args.var_ckpt), "vae": file_identity(args.vae_ckpt), "depth": args.depth}
    return {"command": "eval-class", "model": model, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
            "dtype": args.dtype, "seed": args.seed, "seed_rule": "image k (classes by label, then index): seed + k",
            "labels": labels}


def sample_first(args: argparse.Namespace, device: torch.device) -> tuple[list[Path], dict]:
    """--result / --model var: the labels by name, the images the folder lacks sampled (the model loads
    only then); -> the files of this run's images and the folder's identity."""
    counts = class_counts(args.reference)
    if args.result is not None:
        from arbooth.adapt.finetuned import read_result_config

        classes = read_result_config(args.result)[3]
        labels = trained_labels(list(counts), classes, args.result)
        log.info("--result: each reference class folder is sampled under the label %s was trained with, by "
                 "name (%s)", args.result, ", ".join(f"{n} -> {labels[n]}" for n in list(labels)[:6]))
    else:
        labels = imagenet_labels(list(counts))
        log.info("--model var: each reference class folder's integer name is its ImageNet label (%s)",
                 ", ".join(f"{n}/ -> {labels[n]}" for n in list(labels)[:6]))
    if args.per_class is not None:
        counts = dict.fromkeys(counts, args.per_class)
    folder = SampleFolder(args.generated, sample_identity(args, labels), overwrite=args.overwrite)
    jobs = class_keys(labels, counts, seed=args.seed)
    if folder.missing([(name, s) for name, _, s in jobs]):
        n = generate_class_samples(_var_generator(args, device), jobs, folder, batch_size=args.gen_batch_size)
        log.info("sampled %d new image(s) into %s", n, args.generated)
    return [r["path"] for r in folder.records([(name, s) for name, _, s in jobs])], folder.identity


# ----------------------------------------------------------------------------- main

def check_ranges(args: argparse.Namespace) -> None:
    """Every count and size in range, before any file is read or model loaded: one line each."""
    checks = [("--k", args.k, 1), ("--batch-size", args.batch_size, 1)]
    if args.model is not None or args.result is not None:
        from arbooth.models.sampling import check_sampling_args

        check_sampling_args(top_k=args.top_k, top_p=args.top_p, cfg=args.cfg, where="eval-class")
        checks += [("--gen-batch-size", args.gen_batch_size, 1), ("--depth", args.depth, 1)]
        if args.per_class is not None:
            checks.append(("--per-class", args.per_class, 1))
    for name, value, low in checks:
        if value < low:
            raise ArboothError(f"{name} must be at least {low}, got {value}")


def check_set_sizes(k: int, n_reference: int, n_generated: int) -> None:
    """Precision/recall take each image's k-th nearest neighbour in its own set: both sets need more than
    k images. Counted from the file names before any image is read."""
    for what, n in (("--reference", n_reference), ("--generated", n_generated)):
        if n <= k:
            raise ArboothError(f"--k {k} needs more than {k} images in each set, but {what} has {n}: "
                               f"lower --k or add images")


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any model or data loads: the report folder and (with --model/--result) the sample folder can
    be written, and samples never go into the reference folder (they would be read as references) nor
    into the result folder."""
    if args.model is not None and (args.vae_ckpt is None or args.var_ckpt is None):
        raise ArboothError("--model var needs --vae-ckpt and --var-ckpt")
    if args.result is not None and not (Path(args.result) / "arbooth.yaml").is_file():
        raise ArboothError(f"--result {args.result} is not a train-class result folder (no arbooth.yaml)")
    if args.model is not None or args.result is not None:
        check_output(args.generated, folder=True, what="--generated")
        refuse_nested(args.generated, args.reference, what="--reference")
        refuse_nested(args.generated, args.result, what="--result")
        refuse_inputs([args.generated], [args.vae_ckpt, args.var_ckpt])
    check_output(args.out or args.generated / "eval_class", folder=True, what="report")



def main(args: argparse.Namespace) -> int:
    check_ranges(args)
    device = pick_device(args.device)
    _check_outputs(args)
    sampling = args.model is not None or args.result is not None
    for what, folder in (("--generated", args.generated), ("--reference", args.reference)):
        if not Path(folder).is_dir() and not (sampling and what == "--generated"):
            raise ArboothError(f"{what} folder not found: {folder}")  # before any model: a typo costs nothing
    n_ref = len(list_image_files(args.reference, recursive=True))
    generated_files, identity = None, None
    if sampling:
        counts = class_counts(args.reference)
        check_set_sizes(args.k, n_ref, len(counts) * args.per_class if args.per_class else n_ref)
        generated_files, identity = sample_first(args, device)
    elif (Path(args.generated) / IDENTITY_FILE).is_file():
        folder = SampleFolder.open(args.generated)
        generated_files, identity = [r["path"] for r in folder.records()], folder.identity
        log.info("%s is a sample folder: scoring the %d image(s) it records", args.generated, len(generated_files))
    n_gen = len(generated_files) if generated_files is not None else len(list_image_files(args.generated,
                                                                                          recursive=True))
    check_set_sizes(args.k, n_ref, n_gen)
    kind = "random" if args.random_weights else args.extractor
    if kind == "random":
        log.warning(RANDOM_WEIGHTS_NOTE)
        extractor = TinyFIDNet()
    elif kind == "toy":
        from arbooth.toy.class_var import load_toy_extractor
        extractor = load_toy_extractor()
    else:
        extractor = InceptionFID(args.inception_weights, spatial=args.sfid)
    extractor = extractor.to(device).eval()

    skipped: dict[str, str] = {}
    cache = None if args.no_cache else args.cache_dir
    ref, key = reference_features(args.reference, extractor, device, args.batch_size, skipped, cache)
    gen = extract_features(args.generated, extractor, device, args.batch_size, skipped, "generated",
                           files=generated_files)

    fid = FrechetDistance(reference=GaussianStats.from_features(ref["pool"]))
    fid.update(gen["pool"], real=False)
    precision, recall = precision_recall(ref["pool"], gen["pool"], k=args.k)
    result = {"FID": fid.compute(), "precision": precision, "recall": recall,
              "n_generated": len(gen["pool"]), "n_reference": len(ref["pool"]), "feature_dim": ref["pool"].shape[1]}
    warnings = [fid.warning] if fid.warning else []
    if args.sfid and "spatial" in gen and "spatial" in ref:
        sfid = FrechetDistance(reference=GaussianStats.from_features(ref["spatial"]))
        sfid.update(gen["spatial"], real=False)
        result["sFID"] = sfid.compute()
        warnings += ["s" + sfid.warning] if sfid.warning else []
    elif args.sfid:
        log.warning("sFID requested but the extractor gives no spatial features")
    # N < D: recorded next to the numbers, so a table built from the JSON cannot lose it (docs/metrics.md)
    result["fid_fewer_samples_than_dims"] = bool(fid.warning)

    report = {"metrics": result, "warnings": warnings, "extractor": extractor.feature_id, "k": args.k,
              "random_weights": kind == "random", "toy_extractor": kind == "toy", "generated": str(args.generated),
              "reference": str(args.reference), "samples": identity, "reference_cache_key": key, "skipped": skipped}
    columns = [c for c in ("FID", "sFID", "precision", "recall", "n_generated", "n_reference") if c in result]
    body = markdown_table([result], columns) + "".join(f"\n\n**Warning:** {w}." for w in warnings)
    publish_report(args.out or args.generated / "eval_class", "eval_class", report,
                   f"eval-class ({extractor.feature_id}, k={args.k})", body,
                   random_weights=kind == "random", n_skipped=len(skipped))
    return 0
