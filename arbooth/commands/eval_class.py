"""Class-conditional generation quality: FID, precision and recall (k=3), optional sFID.

Compares a folder of generated images with a folder of real images (searched recursively), prints a
Markdown table and saves <out>/eval_class.json and <out>/eval_class.md. Reference features are cached
under --cache-dir keyed on the SHA-256 of the reference folder's files and the extractor.

  arbooth eval-class --generated gen/ --reference data/test/
  arbooth eval-class --generated gen/ --reference data/test/ --model var --depth 16 \\
      --vae-ckpt vae_ch160v4096z32.pth --var-ckpt var_d16.pth --cfg 1.5

With --model, the images are sampled first: as many per class as the reference folder holds in that
class's subfolder (recursively; the folder's name is the class label, e.g. 0207/), written to --generated with a manifest.jsonl
(file, label, seed) so an interrupted run resumes where it stopped.
--extractor toy swaps the Inception for the shipped toy feature extractor (arbooth/toy/class_var.py), a toy
stand-in for images of the built-in class world (`arbooth toy-data`): its numbers compare only with each
other. --random-weights (= --extractor random) swaps in a small random CNN: a smoke test, meaningless numbers.

  arbooth toy-data --out data/toy && arbooth eval-class --extractor toy --generated gen/ \
      --reference data/toy/new_shapes/test
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arbooth.data.images import list_image_files, tensor_to_pil
from arbooth.errors import ArboothError
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
from arbooth.models.var_presets import VAR_GUIDANCE
from arbooth.outputs import check_output, refuse_inputs, refuse_nested, save_image

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
    g = p.add_argument_group("generation (--model)")
    g.add_argument("--model", choices=["var"], default=None, help="sample the images first with this model")
    g.add_argument("--depth", type=int, default=16)
    g.add_argument("--vae-ckpt", type=Path, default=None)
    g.add_argument("--var-ckpt", type=Path, default=None)
    g.add_argument("--cfg", type=float, default=VAR_GUIDANCE, help="guidance >= 0, 0 = none")
    g.add_argument("--top-k", type=int, default=900)
    g.add_argument("--top-p", type=float, default=0.96)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--per-class", type=int, default=None, help="images per class (default: as in reference)")
    g.add_argument("--gen-batch-size", type=int, default=16)


# ----------------------------------------------------------------------------- features

def extract_features(folder: Path, extractor: torch.nn.Module, device: torch.device, batch_size: int,
                     skipped: dict[str, str], desc: str) -> dict[str, np.ndarray]:
    """Features of every readable image under `folder`; images of one size are batched together
    (the extractor resizes internally, so sizes may differ between batches)."""
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

    n_files = len(list_image_files(folder, recursive=True))
    for _, im in tqdm(iter_images(folder, skipped), total=n_files, desc=desc, unit="img"):
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


def class_labels(counts: dict[str, int]) -> dict[int, int]:
    """{label: count}: a class folder's label is its NAME read as an integer (e.g. `0207/` is ImageNet
    class 207), never its position among the folders (a subset of classes would shift every label)."""
    bad = [name for name in counts if not name.isdigit()]
    if bad:
        raise ArboothError(f"cannot tell which class label the reference folder(s) {bad[:4]} are: to sample with "
                           "--model, name each class folder by its integer label (e.g. 0207/)")
    return {int(name): n for name, n in counts.items()}


def generate_class_samples(generate, counts: dict[int, int], out_dir: Path, *, seed: int,
                           batch_size: int) -> int:
    """Sample counts[label] images per label with `generate(labels_B, seeds_B) -> (B, 3, H, W) in [0, 1]`.

    Image k (labels in sorted order, then index within the label) uses seed + k alone, whatever
    `batch_size`; each is written atomically as <out>/<label>/<label>_<i>.png with a manifest line
    (file, label, seed), so a rerun samples only the images that are missing. Returns the number written."""
    jobs = [(label, i) for label in sorted(counts) for i in range(counts[label])]
    paths = [out_dir / f"{label:04d}" / f"{label:04d}_{i:05d}.png" for label, i in jobs]
    todo = [k for k, p in enumerate(paths) if not p.is_file()]
    written = 0
    for s in tqdm(range(0, len(todo), batch_size), desc="sampling", unit="batch"):
        chunk = todo[s:s + batch_size]
        images_B3HW = generate(torch.tensor([jobs[k][0] for k in chunk]), [seed + k for k in chunk])
        lines = []
        for k, x in zip(chunk, images_B3HW, strict=True):
            save_image(tensor_to_pil(x), paths[k])
            lines.append(json.dumps({"file": str(paths[k].relative_to(out_dir)), "label": jobs[k][0],
                                     "seed": seed + k}) + "\n")
            written += 1
        with open(out_dir / "manifest.jsonl", "a") as mf:  # appended after the images exist
            mf.writelines(lines)
    return written


def _var_generator(args: argparse.Namespace, device: torch.device):
    from arbooth.models import load_var  # the public VAR API (arbooth/models/var_loading.py)
    if args.vae_ckpt is None or args.var_ckpt is None:
        raise ArboothError("--model var needs --vae-ckpt and --var-ckpt")
    var = load_var(depth=args.depth, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt).to(device).eval()

    def generate(labels_B: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return var.generate(labels_B.to(device), cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=seeds)
    return generate


# ----------------------------------------------------------------------------- main

def _check_outputs(args: argparse.Namespace) -> None:
    """Before any model or data loads: the report folder and (with --model) the sample folder can be
    written, and samples never go into the reference folder (they would be read as references)."""
    if args.model is not None:
        from arbooth.models.sampling import check_sampling_args

        check_sampling_args(top_k=args.top_k, top_p=args.top_p, cfg=args.cfg)
        if args.gen_batch_size < 1 or (args.per_class is not None and args.per_class < 1):
            raise ArboothError("--gen-batch-size and --per-class must be at least 1")
        check_output(args.generated, folder=True, what="--generated")
        refuse_nested(args.generated, args.reference, what="--reference")
        refuse_inputs([args.generated], [args.vae_ckpt, args.var_ckpt])
    check_output(args.out or args.generated / "eval_class", folder=True, what="report")



def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    _check_outputs(args)
    if args.model is not None:
        counts = class_labels(class_counts(args.reference))
        if args.per_class is not None:
            counts = {label: args.per_class for label in counts}
        n = generate_class_samples(_var_generator(args, device), counts, args.generated, seed=args.seed,
                                   batch_size=args.gen_batch_size)
        log.info("sampled %d new image(s) into %s", n, args.generated)
    for what, folder in (("--generated", args.generated), ("--reference", args.reference)):
        if not Path(folder).is_dir():  # before loading the extractor: a typo should not cost a model load
            raise ArboothError(f"{what} folder not found: {folder}")
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
    gen = extract_features(args.generated, extractor, device, args.batch_size, skipped, "generated")

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
              "reference": str(args.reference), "reference_cache_key": key, "skipped": skipped}
    columns = [c for c in ("FID", "sFID", "precision", "recall", "n_generated", "n_reference") if c in result]
    body = markdown_table([result], columns) + "".join(f"\n\n**Warning:** {w}." for w in warnings)
    publish_report(args.out or args.generated / "eval_class", "eval_class", report,
                   f"eval-class ({extractor.feature_id}, k={args.k})", body,
                   random_weights=kind == "random", n_skipped=len(skipped))
    return 0
