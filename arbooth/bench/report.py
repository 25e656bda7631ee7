"""The reports of `arbooth bench-subject`: aggregation (as the ViCo table) and report.json / .md / .html.

`aggregate` reads every unit's scores.json, training record and sampling time and builds the report:
per subject the mean over its prompts, per variant the mean over subjects, overall and over the live and
the object subjects, and for each variant after the first its paired difference to the first per metric.
`write_reports` writes report.json, report.md and report.html (one self-contained page: no network, every
image inlined as a base64 PNG: the overall table, a row per subject, and per subject its photos beside a
grid of samples per prompt and variant), and a model card (arbooth/model_card.py) next to them.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from statistics import mean

from PIL import Image

from arbooth.bench.plan import TRAIN_RECORD, BenchPlan, Unit, unit_dir
from arbooth.data.images import list_image_files, read_image
from arbooth.metrics.paired import paired_difference
from arbooth.metrics.report import fmt, markdown_table
from arbooth.model_card import write_model_card
from arbooth.outputs import write_text
from arbooth.sample_folder import SampleFolder

PROTOCOL_METRICS = ("I_DINO", "I_CLIP", "T_CLIP", "PRES", "DIV")
ORACLE_METRICS = ("subject_acc", "background_acc", "size_acc", "I_ID", "toy_T_CLIP", "class_subject_leak",
                  "class_shape_acc", "toy_PRES")
TIMES = ("train_s", "sample_s_per_image")



def _group_means(rows: list[dict], metrics: list[str]) -> dict:
    out = {}
    for m in metrics:
        vals = [r[m] for r in rows if r.get(m) is not None]
        out[m] = mean(vals) if vals else None
    return out


def aggregate(plan: BenchPlan, parts: list[dict], *, wall_s: float, world: int) -> dict:
    """The report: per subject (mean over prompts), per variant overall / live / object (mean over
    subjects, as ARBooth tools/evaluate.py and the ViCo table), timings, and each later variant's paired
    difference to the first across subjects."""
    sampling: dict[str, list] = {}
    for p in parts:
        sampling.update(p["sampling"])
    notes = [p.get("extractors_note") for p in parts if p.get("extractors_note")]
    per_subject, overall = {}, {}
    metrics = [m for m in (*PROTOCOL_METRICS, *ORACLE_METRICS)]
    for v in plan.variants:
        rows = []
        for s in plan.subjects:
            unit = Unit(v, s)
            scores = json.loads((unit_dir(plan, unit) / "scores.json").read_text())
            train_rec = json.loads((unit_dir(plan, unit) / "run" / TRAIN_RECORD).read_text())
            timing_path = unit_dir(plan, unit) / "sampling_time.json"
            key = f"{v.name}/{s.name}"
            if key in sampling:  # measured now: keep it for reruns that sample nothing
                write_text(timing_path, json.dumps({"images": sampling[key][0], "seconds": sampling[key][1]}) + "\n")
            t = json.loads(timing_path.read_text()) if timing_path.is_file() else None
            rows.append({"subject": s.name, "live": s.live, "class_noun": s.class_noun, **scores["mean"],
                         "train_s": train_rec["train_s"], "sample_s_per_image": t["seconds"] / t["images"] if t else None,
                         "per_prompt": scores["per_prompt"], "n_images": scores["n_images"]})
        per_subject[v.name] = rows
        present = [m for m in metrics if any(r.get(m) is not None for r in rows)]
        overall[v.name] = {g: {**_group_means(sel, [*present, "train_s", "sample_s_per_image"]), "subjects": len(sel)}
                           for g, sel in (("all", rows), ("live", [r for r in rows if r["live"]]),
                                          ("object", [r for r in rows if not r["live"]])) if sel}
    ref = plan.variants[0].name
    differences = {}
    for v in plan.variants[1:]:
        differences[v.name] = {}
        for m in [m for m in metrics if m in overall[v.name]["all"] and overall[v.name]["all"][m] is not None]:
            pairs = [(a.get(m), b.get(m)) for a, b in zip(per_subject[ref], per_subject[v.name], strict=True)
                     if a.get(m) is not None and b.get(m) is not None]
            if pairs:
                differences[v.name][m] = paired_difference([a for a, _ in pairs], [b for _, b in pairs],
                                                           n_boot=plan.options.n_boot)
    o = plan.options
    return {"benchmark": str(plan.benchmark), "toy": plan.toy, "protocol": o.protocol, "config": str(plan.config),
            "overrides": list(plan.overrides), "variants": {v.name: list(v.overrides) for v in plan.variants},
            "reference_variant": ref, "images_per_prompt": plan.images_per_prompt, "pres_samples": plan.pres_samples,
            "class_prompt": plan.class_prompt, "seed": o.seed, "sampling": plan.sampling,
            "random_weights": bool(notes), "extractors_note": notes[0] if notes else None,
            "subjects": [{"name": s.name, "live": s.live, "class_noun": s.class_noun, "prompts": list(s.templates),
                          "folder": str(s.folder)} for s in plan.subjects],
            "overall": overall, "per_subject": per_subject, "differences": differences,
            "processes": world, "wall_s": wall_s}


# ----------------------------------------------------------------------------- Markdown


def _columns(report: dict) -> list[str]:
    """The metric columns present in the report, protocol metrics first."""
    present = {m for v in report["overall"].values() for m, x in v["all"].items() if x is not None}
    return [m for m in (*PROTOCOL_METRICS, *ORACLE_METRICS) if m in present]


def _overall_rows(report: dict) -> list[dict]:
    return [{"variant": v, "group": g, **x} for v, groups in report["overall"].items()
            for g, x in groups.items()]


def _difference_rows(report: dict) -> list[dict]:
    rows = []
    for v, diffs in report["differences"].items():
        rows.append({"variant": f"{v} - {report['reference_variant']}",
                     **{m: f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] p={fmt(d['p'])}"
                        for m, d in diffs.items()}})
    return rows


def _subject_rows(report: dict) -> list[dict]:
    return [{"subject": r["subject"], "variant": v, "kind": "live" if r["live"] else "object", **r}
            for s_i in range(len(report["subjects"])) for v, rows in report["per_subject"].items()
            for r in [rows[s_i]]]


def _banner(report: dict) -> str:
    """The warning every report carries when the protocol's extractors had random weights."""
    text = (f"RANDOM-WEIGHT EXTRACTORS ({report['extractors_note']}): the protocol columns "
            f"{', '.join(PROTOCOL_METRICS)} are meaningless here and only show that the pipeline runs")
    return text + ("; the toy oracle columns are meaningful." if report["toy"] else ".")


def markdown(report: dict) -> str:
    cols = _columns(report)
    md = ["# bench-subject" + (" (built-in toy benchmark)" if report["toy"] else f": {report['benchmark']}"), ""]
    if report["random_weights"]:
        md += [f"**{_banner(report)}**", ""]
    md += [(f"Protocol `{report['protocol']}`; {len(report['subjects'])} subjects; {report['images_per_prompt']} "
           f"images per prompt (image i from seed {report['seed']} + i), {report['pres_samples']} class-prompt images "
           f"(`{report['class_prompt']}`) for PRES; {report['processes']} process(es), {report['wall_s']:.0f} s wall."),
           "", "Variants: " + "; ".join(f"`{v}`: " + (" ".join(o) or "the config as it is")
                                        for v, o in report["variants"].items()), "",
           "## Overall (mean over subjects; live / object as the ViCo table)", "",
           markdown_table(_overall_rows(report), ["variant", "group", "subjects", *cols, *TIMES]), ""]
    if report["differences"]:
        md += [(f"## Paired differences to `{report['reference_variant']}` across subjects (mean [95% bootstrap "
               "interval] paired t-test p)"), "",
               markdown_table(_difference_rows(report), ["variant", *cols]), ""]
    md += ["## Per subject (mean over prompts)", "",
           markdown_table(_subject_rows(report), ["subject", "variant", "kind", "class_noun", *cols, *TIMES]), ""]
    return "\n".join(md)


# ----------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}th{background:#f0f0f0}
td:first-child,td:nth-child(2){text-align:left}.banner{background:#fee;border:1px solid #c66;padding:.6em;margin:1em 0}
.subject{display:flex;gap:1.5em;align-items:flex-start;margin:1em 0 2.5em;flex-wrap:wrap}
.photos img,.grid img{image-rendering:pixelated;margin:1px;vertical-align:middle}
.photos{max-width:%dpx}.label{font-size:12px;display:inline-block;width:14em;text-align:right;padding-right:.5em}
h3{margin:.2em 0}.grid{border-left:3px solid #ddd;padding-left:1em}"""


def _png(im: Image.Image, thumb: int) -> str:
    """An <img> of `im` inlined as base64 PNG, at most `thumb` px on its long side (small images are
    shown enlarged, pixelated, at `thumb` px)."""
    if max(im.size) > thumb:
        im = im.copy()
        im.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    w = thumb if im.size[0] >= im.size[1] else thumb * im.size[0] // im.size[1]
    return f'<img width="{w}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _grid(plan: BenchPlan, unit: Unit, thumb: int) -> str:
    """Rows: the subject's prompts then the class prompt; columns: images i = 0, 1, ..."""
    folder = SampleFolder.open(unit_dir(plan, unit) / "samples")
    seed, s = plan.options.seed, unit.subject
    lines = []
    cls = plan.class_prompt.replace("{}", s.class_noun)
    for prompt, n in [*[(t, plan.images_per_prompt) for t in s.templates], (cls, min(plan.pres_samples, 8))]:
        recs = folder.records([(prompt, seed + i) for i in range(n)])
        cells = "".join(_png(read_image(r["path"]), thumb) for r in recs)
        text = recs[0].get("text", prompt) if recs else prompt  # the prompt as sampled, <S*> included
        label = html.escape(text if "{}" in prompt else f"class: {text}")
        lines.append(f'<div><span class="label">{label}</span>{cells}</div>')
    return "".join(lines)


def html_page(plan: BenchPlan, report: dict) -> str:
    cols, thumb = _columns(report), plan.options.thumb
    title = "bench-subject" + (" — built-in toy benchmark" if report["toy"] else f" — {report['benchmark']}")
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS % (3 * thumb + 12)}</style></head><body><h1>{html.escape(title)}</h1>")]
    if report["random_weights"]:
        parts.append(f"<div class='banner'><b>{html.escape(_banner(report))}</b></div>")
    meta = markdown(report).split("## Overall")[0].split("\n", 2)[2]
    parts.append("".join(f"<p>{html.escape(p)}</p>" for p in meta.split("\n\n") if p.strip() and not p.startswith("**")))
    parts.append("<h2>Overall (mean over subjects; live / object as the ViCo table)</h2>"
                 + _table(_overall_rows(report), ["variant", "group", "subjects", *cols, *TIMES]))
    if report["differences"]:
        parts.append(f"<h2>Paired differences to {html.escape(report['reference_variant'])} across subjects</h2>"
                     "<p>mean [95% bootstrap interval] paired t-test p</p>"
                     + _table(_difference_rows(report), ["variant", *cols]))
    parts.append("<h2>Per subject (mean over prompts)</h2>"
                 + _table(_subject_rows(report), ["subject", "variant", "kind", "class_noun", *cols, *TIMES]))
    parts.append("<h2>Samples</h2>")
    for s in plan.subjects:
        photos = "".join(_png(read_image(p), thumb) for p in list_image_files(s.folder))
        grids = "".join(f"<div class='grid'><h3>{html.escape(v.name)}</h3>{_grid(plan, Unit(v, s), thumb)}</div>"
                        for v in plan.variants)
        parts.append(f"<h3>{html.escape(s.name)} ({'live' if s.live else 'object'}, {html.escape(s.class_noun)})</h3>"
                     f"<div class='subject'><div class='photos'><b>photos</b><br>{photos}</div>{grids}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(plan: BenchPlan, report: dict) -> list[Path]:
    """report.json, report.md, report.html and the model card (README.md) in plan.out."""
    out = plan.out
    paths = [write_text(out / "report.json", json.dumps(report, indent=1, default=str) + "\n"),
             write_text(out / "report.md", markdown(report) + "\n"),
             write_text(out / "report.html", html_page(plan, report) + "\n")]
    flat = {f"{v}/{m}": x for v, groups in report["overall"].items() for m, x in groups["all"].items()
            if isinstance(x, float)}
    paths.append(write_model_card(
        out, title="ARBooth benchmark: " + ", ".join(report["variants"]),
        summary=(f"Personalizations of {len(plan.subjects)} subjects trained by `arbooth bench-subject` with "
                 f"{len(plan.variants)} variant(s) of the subject recipe (`{plan.config.name}`), scored under the "
                 f"`{report['protocol']}` protocol: report.md and report.html in this folder."),
        base_model=_base_name(plan), base_sha256=None,
        method="; ".join(f"{v}: " + (" ".join(o) or "the config as it is") for v, o in report["variants"].items()),
        adapter=any("tuning.method=lora" in o for o in report["variants"].values()),
        tags=["personalization", "benchmark"], prompts=sorted({t for s in plan.subjects for t in s.templates}),
        metrics=flat))
    return paths


def _base_name(plan: BenchPlan) -> str:
    import yaml
    model = (yaml.safe_load(plan.config.read_text()) or {}).get("model", {})
    for o in plan.overrides:
        if o.startswith("model."):
            k, _, v = o.partition("=")
            model[k.split(".", 1)[1]] = v
    return str(model.get("model_ckpt") or model.get("preset") or "infinity_2b")
