"""After a toy personalization: the base model's images beside the personalized model's, and toy metrics.

Rows of the grid: the plain class prompt ("a star", prior preservation), then the subject's prompts;
columns: one per seed, the base model's (prompts with the class noun) on the left, the personalized
model's (prompts with "<S*> star") on the right. Metrics, for both models (see docs/toy.md):
- I_ID: mean cosine similarity of the toy identity embedding (attribute-probe features; our DINO
  stand-in) between generated and subject images; I_CLIP: the same with the toy CLIP image tower.
- T_CLIP: cosine similarity of the toy CLIP image and text embeddings, the prompt written with the class noun.
- PRES: I_ID between the subject images and the class prompt's images (lower = prior kept).
- DIV: mean pairwise (1 - cosine) of identity embeddings of one prompt's images (no LPIPS weights here).
- oracle: the probe's predicted shape / colour / texture against the subject's known attributes, and
  background / size against what the prompt asks for; `subject_acc` = share of images in which the probe
  sees the subject (its shape AND its identity attributes: colour, texture and, for a split subject, the
  top half's colour). On the class prompt (scored on `class_samples` images, more than the grid shows,
  so its rates are not quarters): `class_shape_acc` = share showing the class, `subject_leak` = share
  showing the subject's identity attributes, and `drift_id` = 1 - I_ID(personalized, base) per seed.
"""
from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from arbooth.adapt.personalization import load_personalization
from arbooth.data.images import save_grid
from arbooth.data.subject import load_subject
from arbooth.outputs import write_text
from arbooth.toy.models import TOY_DIR, ToyEvaluator, load_toy_base
from arbooth.toy.world import COLOURS, SIZES

log = logging.getLogger(__name__)


def _mean_cos(a_ND: torch.Tensor, b_MD: torch.Tensor) -> float:
    return (a_ND @ b_MD.T).mean().item()


def _div(f_ND: torch.Tensor) -> float | None:
    pairs = list(itertools.combinations(range(f_ND.shape[0]), 2))
    return sum(1 - (f_ND[i] @ f_ND[j]).item() for i, j in pairs) / len(pairs) if pairs else None


def asked_attributes(prompt: str) -> dict[str, str]:
    """Attributes a toy prompt names ("on a red background", "small")."""
    words, asked = prompt.split(), {}
    if "background" in words and words.index("background") >= 1 and words[words.index("background") - 1] in COLOURS:
        asked["background"] = words[words.index("background") - 1]
    sizes = [w for w in words if w in SIZES]
    if sizes:
        asked["size"] = sizes[0]
    return asked


def subject_attributes(subject_dir: Path, evaluator: ToyEvaluator, images_N3HW: torch.Tensor) -> dict[str, str]:
    """attributes.json of the subject folder, else the probe's majority vote on the subject images."""
    path = subject_dir / "attributes.json"
    if path.is_file():
        return json.loads(path.read_text())
    preds = evaluator.attributes(images_N3HW)
    return {k: Counter(p[k] for p in preds).most_common(1)[0][0] for k in ("shape", "colour", "texture")}


@torch.no_grad()
def generate_rows(model, text_BTC, mask_BT, schedule, seeds, **sample) -> torch.Tensor:
    """(rows, seeds, 3, H, W) in [0, 1]: one generate call per seed over all prompts."""
    return torch.stack([model.generate(text_BTC, mask_BT, schedule, seed=s, **sample).images for s in seeds], 1)


IDENTITY = ("colour", "texture", "texture_colour")  # the attributes that make the subject itself


def is_subject(pred: dict[str, str], attrs: dict[str, str], *, shape: bool = True) -> bool:
    """The probe's prediction `pred` shows the subject `attrs`: (its shape and) its colour, texture and,
    if textured, its texture colour."""
    keys = [k for k in IDENTITY if k != "texture_colour" or attrs.get("texture", "plain") != "plain"]
    return (not shape or pred["shape"] == attrs["shape"]) and all(pred[k] == attrs[k] for k in keys if k in attrs)


def score(ev: ToyEvaluator, imgs_RS3HW: torch.Tensor, prompts_cls: list[str], subject_N3HW: torch.Tensor,
          attrs: dict[str, str], base_RS3HW: torch.Tensor | None = None,
          class_N3HW: torch.Tensor | None = None) -> dict:
    """Metrics for one model; row 0 is the class prompt, rows 1.. the subject prompts. `class_N3HW`: more
    class-prompt images for the class-prompt rates (default: row 0)."""
    sub_id, sub_clip = ev.identity(subject_N3HW), ev.clip_image(subject_N3HW)
    # per seed (column), mean over the subject prompts: the spread across seeds for significance checks
    per_seed = (ev.identity(imgs_RS3HW[1:].flatten(0, 1)) @ sub_id.T).mean(-1).view(imgs_RS3HW.shape[0] - 1, -1)
    per_prompt = []
    for r, prompt in enumerate(prompts_cls):
        x = imgs_RS3HW[r]
        fid, fclip, preds = ev.identity(x), ev.clip_image(x), ev.attributes(x)
        row = {"prompt": prompt, "I_ID": _mean_cos(fid, sub_id), "I_CLIP": _mean_cos(fclip, sub_clip),
               "T_CLIP": _mean_cos(fclip, ev.clip_text([prompt])), "DIV": _div(fid),
               "shape_acc": sum(p["shape"] == attrs["shape"] for p in preds) / len(preds),
               "colour_acc": sum(p["colour"] == attrs["colour"] for p in preds) / len(preds),
               "texture_acc": sum(p["texture"] == attrs["texture"] for p in preds) / len(preds),
               "subject_acc": sum(is_subject(p, attrs) for p in preds) / len(preds)}
        for key, want in asked_attributes(prompt).items():
            row[f"{key}_acc"] = sum(p[key] == want for p in preds) / len(preds)
        if r == 0:
            many = ev.attributes(class_N3HW) if class_N3HW is not None else preds
            row["samples"] = len(many)
            row["class_shape_acc"] = sum(p["shape"] == attrs["shape"] for p in many) / len(many)
            row["subject_leak"] = sum(is_subject(p, attrs, shape=False) for p in many) / len(many)
            if class_N3HW is not None:
                row["I_ID"] = _mean_cos(ev.identity(class_N3HW), sub_id)
            if base_RS3HW is not None:
                row["drift_id"] = 1 - (fid * ev.identity(base_RS3HW[0])).sum(-1).mean().item()
        per_prompt.append(row)
    subj = per_prompt[1:]
    mean = {k: sum(r[k] for r in subj) / len(subj) for k in ("I_ID", "I_CLIP", "T_CLIP", "DIV", "shape_acc",
                                                           "colour_acc", "texture_acc", "subject_acc")}
    for key in ("background_acc", "size_acc"):
        vals = [r[key] for r in subj if key in r]
        if vals:
            mean[key] = sum(vals) / len(vals)
    cls = per_prompt[0]
    mean.update(PRES=cls["I_ID"], class_shape_acc=cls["class_shape_acc"], class_subject_leak=cls["subject_leak"])
    if "drift_id" in cls:
        mean["class_drift_id"] = cls["drift_id"]
    return {"mean": mean, "I_ID_per_seed": per_seed.mean(0).tolist(), "per_prompt": per_prompt}


def toy_report(subject: str | Path, personalization: str | Path, out_dir: str | Path, *, toy_dir: str | Path = TOY_DIR,
               seeds: tuple[int, ...] = (0, 1, 2, 3), guidance: float, tau: float, top_p: float = 0.0,
               grid: bool = True, class_samples: int = 64) -> dict:
    """Write `grid.png` and `metrics.json` into `out_dir`; returns the metrics. `guidance` / `tau`: the
    sampler's guidance scale (Infinity's: 1 = none) and temperature, the run's (`validation_guidance`,
    `validation_tau`). The class prompt's rates (class_shape_acc, class_subject_leak, PRES) are scored on
    `class_samples` images (seeds 1000, 1001, ...)."""
    out_dir, subject = Path(out_dir), Path(subject)
    pers = load_personalization(personalization)
    base, tuned = load_toy_base(toy_dir), load_toy_base(toy_dir)
    pers.apply(tuned.model)
    ev = ToyEvaluator(toy_dir)
    data = load_subject(subject, base.image_size)
    noun = pers.metadata.get("class_noun") or data.info.class_noun
    sub_imgs = data.images_N3HW.add(1).div(2)
    attrs = subject_attributes(subject, ev, sub_imgs)
    templates = list(data.info.prompts) or ["a {}"]
    prompts_cls = [f"a {noun}", *[t.format(noun) for t in templates]]
    prompts_sub = [f"a {noun}", *[t.format(f"{pers.placeholder} {noun}") for t in templates]]
    sample = {"cfg": guidance, "tau": tau, "top_p": top_p, "top_k": 0}
    L = base.model.text_maxlen
    t_b, m_b = pers.encode(base.tokenizer, base.encoder, prompts_cls, max_length=L)
    t_p, m_p = pers.encode(tuned.tokenizer, tuned.encoder, prompts_sub, max_length=L)
    img_b = generate_rows(base.model, t_b, m_b, base.schedule, seeds, **sample)
    img_p = generate_rows(tuned.model, t_p, m_p, tuned.schedule, seeds, **sample)
    many = {}
    for name, tb, (t, m) in (("base", base, (t_b, m_b)), ("tuned", tuned, (t_p, m_p))):
        n = class_samples
        many[name] = tb.model.generate(t[:1].expand(n, -1, -1), m[:1].expand(n, -1), tb.schedule,
                                       seed=[1000 + k for k in range(n)], **sample).images
    metrics = {"subject": str(subject), "personalization": str(personalization), "class_noun": noun,
               "subject_attributes": attrs, "seeds": list(seeds), "sampling": sample,
               "class_samples": class_samples,
               "base": score(ev, img_b, prompts_cls, sub_imgs, attrs, class_N3HW=many["base"]),
               "personalized": score(ev, img_p, prompts_cls, sub_imgs, attrs, base_RS3HW=img_b,
                                     class_N3HW=many["tuned"]),
               "prompts": prompts_sub}
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    if grid:
        R, S = img_b.shape[:2]
        gap = torch.ones(R, 1, *img_b.shape[2:])
        cells = torch.cat([img_b, gap, img_p], 1).flatten(0, 1)  # rows: base seeds | gap | personalized seeds
        cells = torch.nn.functional.interpolate(cells, scale_factor=3, mode="nearest")
        save_grid(cells, out_dir / "grid.png", nrow=2 * S + 1, row_labels=prompts_sub,
                  title=f"left: base model ('{noun}' in the prompt)  |  right: personalized ('{pers.placeholder} {noun}')"
                        f"  |  columns: seeds {list(seeds)}")
    log.info("toy report: %s", {k: round(v, 3) for k, v in metrics["personalized"]["mean"].items()})
    return metrics


def toy_run_report(cfg, personalization: str | Path) -> list[str]:
    """After `train-subject` on the toy base: write the base-vs-personalized grid and metrics into
    `cfg.out_dir` (`toy_report`) and return the lines the command prints (paths, then a table of the
    mean metrics of the base and the personalized model)."""
    out = Path(cfg.out_dir)
    m = toy_report(cfg.subject, personalization, out, toy_dir=cfg.model.model_ckpt or TOY_DIR,
                   guidance=cfg.validation_guidance, tau=cfg.validation_tau)
    keys = ("subject_acc", "background_acc", "class_shape_acc", "class_subject_leak", "I_ID", "T_CLIP", "PRES")
    lines = [f"grid: {out / 'grid.png'}  metrics: {out / 'metrics.json'}",
             "             " + " ".join(f"{k:>18s}" for k in keys)]
    for name, v in (("base", m["base"]["mean"]), ("personalized", m["personalized"]["mean"])):
        lines.append(f"{name:12s} " + " ".join(f"{v[k]:18.3f}" for k in keys))
    return lines

