"""What `arbooth bench-subject` runs: its options (BenchConfig), the benchmark's subjects and the variants.

A benchmark folder has the ViCo/DreamBench layout (../shared/vico, the ARBooth repository's inputs/):
one sub-folder of photos per subject and two prompt lists, `prompts_live_objects.txt` for live subjects
(animals) and `prompts_nonlive_objects.txt` for objects, one template per line with `{}` for the subject
phrase. Each subject's class noun and live-ness come from, in order: the options (`class_nouns`,
`live`), its `subject.yaml` (`class_noun`, `kind: live | object`), the ViCo concepts table of the
authors' tools/evaluate.py (for folders named as ViCo's); a subject with neither is an error naming it.
Without a folder the built-in toy benchmark (arbooth/toy/benchmark.py) is written into `<out>/toy_benchmark`
and used, with its own defaults (config, steps, variants, images per prompt, class prompt).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from arbooth.data.images import list_image_files
from arbooth.data.subject import read_prompt_templates, read_subject_info
from arbooth.errors import ArboothError, ConfigError
from arbooth.metrics.extractors import DEFAULT
from arbooth.metrics.subject import PROTOCOLS
from arbooth.models.sampling import check_sampling_args
from arbooth.toy import benchmark as toy_bench

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "subject"
TRAIN_RECORD = "bench_train.json"   # in a unit's run folder: what trained it (bench/subject.py)
LIVE_PROMPTS, OBJECT_PROMPTS = "prompts_live_objects.txt", "prompts_nonlive_objects.txt"
# ARBooth tools/evaluate.py `vico_concepts` (class noun) and `live_objects` (run_arbooth_for_eval.py is_live)
VICO_CONCEPTS: dict[str, tuple[str, bool]] = {
    "fat_dog": ("dog", True), "brown_dog": ("dog", True), "brown_dog2": ("dog", True), "black_cat": ("cat", True),
    "brown_cat": ("cat", True), "cat_statue": ("statue", False), "elephant_statue": ("statue", False),
    "duck_toy": ("toy", False), "monster_toy": ("toy", False), "brown_teddybear": ("teddybear", False),
    "tortoise_plushy": ("plushy", False), "alarm_clock": ("clock", False), "pink_sunglasses": ("sunglasses", False),
    "red_teapot": ("teapot", False), "red_vase": ("vase", False), "wooden_barn": ("barn", False),
}


@dataclass(frozen=True)
class Variant:
    """A named recipe: config overrides applied after the benchmark's own (e.g. lora: tuning.method=lora)."""

    name: str
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_.-" for c in self.name) or self.name[0] in "_.":
            raise ConfigError(f"variant name {self.name!r}: use letters, digits, '_', '.', '-' (not first: '_', '.')")
        if self.name == "toy_benchmark":  # <out>/toy_benchmark holds the toy benchmark's subjects
            raise ConfigError("variant name 'toy_benchmark' is taken by the toy benchmark's folder")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"variant {self.name}: {bad[0]!r} is not a key=value override")

    @classmethod
    def parse(cls, text: str) -> Variant:
        """"name" or "name:key=value key=value ..." (overrides separated by spaces)."""
        name, _, rest = text.partition(":")
        return cls(name.strip(), tuple(rest.split()))


@dataclass(frozen=True)
class BenchConfig:
    """The options of `arbooth bench-subject` (and of `arbooth.bench.subject.bench_subject`). None means
    the benchmark's default: the toy benchmark's own (arbooth/toy/benchmark.py), else the ViCo protocol's."""

    benchmark: str | None = None           # benchmark folder; None: the built-in toy benchmark
    out: str = "runs/bench_subject"
    config: str | None = None              # subject recipe config (default: toy.yaml / infinity_2b.yaml)
    overrides: tuple[str, ...] = ()        # key=value for every variant (before the variant's own)
    variants: tuple[Variant, ...] = ()     # default: toy: full and lora; a folder: full
    subjects: tuple[str, ...] = ()         # only these sub-folders (default: every one with images)
    live: tuple[str, ...] | None = None    # the live subjects (overrides subject.yaml and the ViCo table)
    class_nouns: tuple[str, ...] = ()      # "subject=noun" entries
    images_per_prompt: int | None = None   # default: toy 4, a folder 8 (ARBooth's ViCo table)
    prompts_per_subject: int | None = None  # only the first K templates of each list (quick runs)
    pres_samples: int | None = None        # class-prompt images for PRES (default: toy 16, a folder 100)
    class_prompt: str | None = None        # default: toy "a {}", a folder "a photo of {}" (the authors')
    seed: int = 0                          # image i of a prompt uses seed + i
    protocol: str = "dreammatcher"
    cfg: float | None = None               # sampling guidance (default: the run's val_cfg / the preset's)
    tau: float | None = None
    top_k: int | None = None               # default: toy 0 (off), a folder 900 (Infinity's release)
    top_p: float | None = None             # default: toy 0 (off), a folder 0.97
    gen_batch_size: int = 8
    eval_batch_size: int = 32
    device: str = "auto"
    dino_weights: str | None = DEFAULT
    clip_weights: str | None = DEFAULT
    lpips_backbone: str | None = DEFAULT
    random_weights: bool = False           # random-weight extractors: a smoke test, meaningless numbers
    overwrite: bool = False                # retrain / resample what was made differently instead of refusing
    n_boot: int = 10000
    thumb: int = 96                        # largest side of the report page's images, in pixels

    def __post_init__(self) -> None:
        for name in ("images_per_prompt", "prompts_per_subject", "gen_batch_size", "eval_batch_size", "n_boot",
                     "thumb"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {v}")
        if self.pres_samples is not None and self.pres_samples < 0:
            raise ConfigError(f"pres-samples must be >= 0, got {self.pres_samples}")
        # before any training: a bad sampling value found only at sampling time wastes every subject's fine-tune
        check_sampling_args(top_k=self.top_k, top_p=self.top_p, cfg=self.cfg, tau=self.tau, where="bench-subject")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {self.protocol!r}: one of {', '.join(PROTOCOLS)}")
        if self.class_prompt is not None and "{}" not in self.class_prompt:
            raise ConfigError(f"class-prompt {self.class_prompt!r} has no '{{}}' for the class noun")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"variant names must differ: {names}")
        for entry in self.class_nouns:
            if "=" not in entry:
                raise ConfigError(f"class noun {entry!r}: write subject=noun")


@dataclass(frozen=True)
class BenchSubject:
    name: str
    folder: Path
    class_noun: str
    live: bool
    templates: tuple[str, ...]
    attributes: dict | None = None    # the toy oracle's ground truth (attributes.json), else None


@dataclass(frozen=True)
class Unit:
    variant: Variant
    subject: BenchSubject


@dataclass(frozen=True)
class BenchPlan:
    """BenchConfig with every default resolved."""

    options: BenchConfig
    out: Path
    toy: bool
    benchmark: Path
    config: Path
    overrides: tuple[str, ...]
    variants: tuple[Variant, ...]
    subjects: tuple[BenchSubject, ...]
    images_per_prompt: int
    pres_samples: int
    class_prompt: str
    sampling: dict = field(default_factory=dict)   # cfg, tau (None: the run's), top_k, top_p

    @property
    def units(self) -> list[Unit]:
        return [Unit(v, s) for v in self.variants for s in self.subjects]

    @property
    def overwrite(self) -> bool:
        return self.options.overwrite


def unit_dir(plan: BenchPlan, unit: Unit) -> Path:
    """<out>/<variant>/<subject>: the unit's run folder (run/), samples (samples/) and scores."""
    return plan.out / unit.variant.name / unit.subject.name


def read_prompts(path: Path) -> tuple[str, ...]:
    return read_prompt_templates(path, where=f" (a benchmark folder holds {LIVE_PROMPTS} and {OBJECT_PROMPTS})")


def discover_subjects(folder: Path, opts: BenchConfig) -> tuple[BenchSubject, ...]:
    """The benchmark's subjects (sub-folders with images, sorted; `opts.subjects` picks some) with their
    class noun, live-ness and prompt list. Raises ArboothError naming a subject whose class noun or
    live-ness is unknown, or a subject asked for that is not there."""
    if not folder.is_dir():
        raise ArboothError(f"benchmark folder {folder} not found")
    found = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and list_image_files(d))
    names = [d.name for d in found]
    unknown = [s for s in opts.subjects if s not in names]
    if unknown:
        raise ArboothError(f"subject(s) {unknown} not in {folder} (it holds {names})")
    if opts.live is not None:
        bad = [s for s in opts.live if s not in names]
        if bad:
            raise ArboothError(f"--live names subject(s) {bad} that are not in {folder}")
    nouns = dict(e.split("=", 1) for e in opts.class_nouns)
    bad = [s for s in nouns if s not in names]
    if bad:
        raise ArboothError(f"--class-noun names subject(s) {bad} that are not in {folder}")
    prompts: dict[bool, tuple[str, ...]] = {}
    subjects = []
    for d in found:
        if opts.subjects and d.name not in opts.subjects:
            continue
        info = read_subject_info(d)
        vico = VICO_CONCEPTS.get(d.name)
        noun = nouns.get(d.name) or info.class_noun or (vico[0] if vico else None)
        if opts.live is not None:
            live = d.name in opts.live
        elif info.kind is not None:
            live = info.kind == "live"
        elif vico is not None:
            live = vico[1]
        else:
            raise ArboothError(f"subject {d.name}: live or object? set `kind: live` or `kind: object` in "
                               f"{d / 'subject.yaml'}, or list the live subjects with --live")
        if not noun:
            raise ArboothError(f"subject {d.name}: no class noun: set class_noun in {d / 'subject.yaml'} or pass "
                               f"--class-noun {d.name}=NOUN")
        if live not in prompts:
            prompts[live] = read_prompts(folder / (LIVE_PROMPTS if live else OBJECT_PROMPTS))
        templates = prompts[live][:opts.prompts_per_subject] if opts.prompts_per_subject else prompts[live]
        attrs = json.loads((d / "attributes.json").read_text()) if (d / "attributes.json").is_file() else None
        subjects.append(BenchSubject(d.name, d.resolve(), noun, live, templates, attrs))
    if not subjects:
        raise ArboothError(f"no subject folder with images in {folder}")
    return tuple(subjects)


def make_plan(opts: BenchConfig, *, write_toy: bool = True) -> BenchPlan:
    """Resolve the defaults; with no benchmark folder, write the toy benchmark into <out>/toy_benchmark
    (`write_toy`: this process may write it; other ranks wait for rank 0 and read it)."""
    out = Path(opts.out)
    toy = opts.benchmark is None
    if toy:
        folder = out / "toy_benchmark"
        if write_toy:
            toy_bench.write_toy_benchmark(folder)
    else:
        folder = Path(opts.benchmark)
    subjects = discover_subjects(folder, opts)
    if toy:
        variants = opts.variants or tuple(Variant(n, o) for n, o in toy_bench.VARIANTS)
        overrides = (*toy_bench.OVERRIDES, *opts.overrides)
    else:
        variants = opts.variants or (Variant("full"),)
        overrides = opts.overrides
    config = Path(opts.config) if opts.config else CONFIGS / ("toy.yaml" if toy else "infinity_2b.yaml")
    if not config.is_file():
        raise ArboothError(f"config file {config} not found")

    def pick(value, toy_default, default):
        return value if value is not None else toy_default if toy else default

    sampling = {"cfg": opts.cfg, "tau": opts.tau, "top_k": pick(opts.top_k, 0, 900),
                "top_p": pick(opts.top_p, 0.0, 0.97)}
    return BenchPlan(opts, out, toy, folder.resolve(), config, tuple(overrides), tuple(variants), subjects,
                     pick(opts.images_per_prompt, toy_bench.IMAGES_PER_PROMPT, 8),
                     pick(opts.pres_samples, toy_bench.PRES_SAMPLES, 100),
                     pick(opts.class_prompt, toy_bench.CLASS_PROMPT, "a photo of {}"), sampling)
