"""Memory and compute of the real training steps at their real sizes, accounted without a GPU.

Each row builds its model at full size on fake tensors (torch._subclasses.fake_tensor.FakeTensorMode:
shapes, dtypes and storages, no data, no weights), runs the recipe's own step function once to
allocate the optimizer state, then once more under torch's MemTracker
(torch.distributed._tools.mem_tracker), which follows every storage the step allocates and frees and
sorts it into parameters, buffers, gradients, activations, temporaries (what the backward allocates),
optimizer state and other (inputs). We report the peak of the whole step with its split by category,
and the peak of each phase (teacher, forwards, backwards, optimizer steps). The warm-up step runs under
torch.utils.flop_counter.FlopCounterMode, which counts matmuls, convolutions and attention; the step
time predicted from it assumes 40% of an H100's (989 TFLOP/s) or an A100's (312 TFLOP/s) dense bf16
rate: a model, not a measurement.

    PYTHONPATH=. python benchmarks/memory.py                        # every row; table + benchmarks/results/memory.json
    PYTHONPATH=. python benchmarks/memory.py --only arbooth_2b      # rows whose name contains a string
    PYTHONPATH=. python benchmarks/memory.py --list                 # the row names
    PYTHONPATH=. python benchmarks/memory.py --dp-blocks fft 1 8    # DP vs non-private from real d16-width blocks

Rows are built by the functions in ROWS (name -> zero-argument function returning a `Step`); a new
model (Infinity-8B, say) is one more entry there.

How the real code runs on fake tensors (see `fake_tensors`): models are built on the meta device and
given fake parameters (their init needs values); small tensors whose inputs are all known (prompt masks,
placeholder positions, index tables, generator draws) also carry their real values (`SmallValues`), so
the code's data-dependent glue (`int(mask.sum())`, `.nonzero()`) runs as it would; values computed from
the weights (losses, gradient norms) are unknown, and the step reads them only to log: such a read
returns 1.0. MemTracker assumes every parameter trains and one root forward per iteration: frozen
parameters get no gradient hook, and the sampler's scale-by-scale calls of the model's sub-modules
restart those modules' (unused) per-module statistics (`Tracker`).

What the accounting does not see, and the margin to add on a GPU: the CUDA context and the kernels'
code (0.5-1 GiB, not in torch.cuda.max_memory_allocated either), the caching allocator's rounding and
fragmentation (typically 5-15% over the tensor peak in reserved memory), cuBLAS/cuDNN and attention
workspaces (tens to hundreds of MiB), and the CPU kernels' choices where they differ from the GPU's
(the CPU's flash attention stores the same O(L) statistics as the GPU's memory-efficient kernel; CPU
autocast casts a few ops differently from CUDA's). Plan a card with the peak + 15% + 1 GiB.
`benchmarks/gpu_check.py` prints torch.cuda.max_memory_allocated next to these figures when a GPU is lent.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

GiB = 2**30
H100_TFLOPS, A100_TFLOPS, MFU = 989.0, 312.0, 0.4  # dense bf16 peak rates (SXM), the assumed fraction
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")
MARGIN = "peak + 15% (allocator) + 1 GiB (CUDA context, workspaces)"


# ------------------------------------------------------------------ running real code on fake tensors
class SmallValues(TorchDispatchMode):
    """Real values next to the small fake tensors whose inputs are all known (factory ops, the inputs the
    row makes, what is computed from them), so the step's data-dependent glue (`int(mask.sum())`,
    `.nonzero()`, `if counts.any()`) runs as on real tensors. Parameters (fake, from meta) are never
    known, so neither is anything computed from them. A read of an unknown float (a loss, a gradient
    norm: logged only) returns 1.0; an unknown int or bool is a symbol, an error if the code branches on it."""

    def __init__(self, fake: FakeTensorMode, limit: int = 1 << 16) -> None:
        super().__init__()
        self.fake, self.limit, self.real = fake, limit, WeakIdKeyDictionary()

    def _known(self, t: torch.Tensor) -> bool:
        return t in self.real or not (isinstance(t, FakeTensor) or t.is_meta)

    def _value(self, t: torch.Tensor) -> torch.Tensor:
        return self.real[t] if isinstance(t, FakeTensor) else t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        known = all(self._known(t) for t in tensors)
        if func is torch.ops.aten._local_scalar_dense.default:
            with _disable_current_modes():
                if known:
                    return self._value(args[0]).item()
                if args[0].dtype.is_floating_point:
                    return 1.0
            return func(*args, **kwargs)  # an int/bool of the weights: an unbacked symbol (an error if branched on)
        out = func(*args, **kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if known and outs and all(t.numel() <= self.limit for t in outs if not _symbolic(t)):
            real_args = pytree.tree_map_only(torch.Tensor, self._value, (args, kwargs))
            with _disable_current_modes():
                real_out = func(*real_args[0], **real_args[1])
                reals = [t for t in pytree.tree_leaves(real_out) if isinstance(t, torch.Tensor)]
                if any(_symbolic(t) for t in outs):  # a data-dependent shape (nonzero): take it from the values
                    outs = [self.fake.from_tensor(r) for r in reals]
                    out = pytree.tree_unflatten(outs, pytree.tree_flatten(real_out)[1])
            for f, r in zip(outs, reals, strict=True):
                self.real[f] = r
        else:  # a known tensor written from unknown values is not known any more
            for i, a in enumerate(func._schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write and i < len(args) \
                        and isinstance(args[i], torch.Tensor):
                    self.real.pop(args[i], None)
        return out


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in t.shape)


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode (with a ShapeEnv for data-dependent shapes) + SmallValues; yields the fake mode."""
    mode = FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True), allow_non_fake_inputs=True)
    with mode, SmallValues(mode):
        yield mode


def materialize(*modules: nn.Module) -> dict[int, torch.Tensor]:
    """Give modules built on the meta device fake parameters and buffers of the same shapes and dtypes
    (call inside `fake_tensors()`); tied tensors stay tied. Module.to_empty cannot: it swaps tensors,
    which fake tensors (weakly referenced by their mode) refuse. Returns id(meta tensor) -> its fake
    replacement, for whatever else holds the meta tensors (a tuner's parameter list)."""
    memo: dict[int, torch.Tensor] = {}
    for root in modules:
        for m in root.modules():
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is None:
                        continue
                    if id(t) not in memo:
                        e = torch.empty_like(t, device="cpu")
                        memo[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
                    store[k] = memo[id(t)]
    return memo


@contextlib.contextmanager
def _on_meta():
    """Build on the meta device, outside the fake mode (init draws values; casts of fake tensors swap)."""
    with _disable_current_modes(), torch.device("meta"):
        yield


class _NoHook:
    def remove(self) -> None:
        pass


class Tracker(MemTracker):
    """MemTracker for partly frozen models whose sampler calls sub-modules directly (see module docstring)."""

    def skip_grad_hooks(self, params) -> None:
        for p in params:  # MemTracker hooks every parameter's gradient; a frozen one cannot take a hook
            if not p.requires_grad:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        # a parameter frozen when its module first runs (peft's disabled adapters in the LoRA teacher
        # too): no gradient hook; its gradient, if any, is then counted as Temp
        self.skip_grad_hooks(module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        fqn = self._mod_tracker.get_known_fqn(module)
        if (module in self.memory_tracking and not self._mod_tracker.is_bw
                and set(self._mod_tracker.parents) - {fqn} == {"Global"}):
            del self.memory_tracking[module]  # a second root-level call: its per-module stats start again
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        pass  # per-module peaks (a loop over every module after every op) are not used: PhasePeaks keeps ours


class PhasePeaks(TorchDispatchMode):
    """After every op, the tracker's current total and split, kept at each phase's peak. Phases come from
    the step (`self(name)`: the recipes' `on_phase` probe) and from the optimizers' step hooks (a phase
    `<name> optimizer` while an optimizer steps)."""

    def __init__(self, tracker: MemTracker) -> None:
        super().__init__()
        self.tracker, self.phase, self.peaks, self.split = tracker, "setup", {}, {}
        self._hooks: list = []
        self._in_opt = False

    def __call__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self):
        def pre(opt, args, kwargs):
            self._outer, self.phase = self.phase, self.phase.replace(" backward", "") + " optimizer"
            self._in_opt = True

        def post(opt, args, kwargs):
            self.phase, self._in_opt = self._outer, False
        self._hooks = [register_optimizer_step_pre_hook(pre),
                       register_optimizer_step_post_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        phase = self.phase
        if self.tracker._mod_tracker.is_bw and not self._in_opt and "backward" not in phase:  # autograd's pass of a forward phase
            phase = phase.replace(" forward", "").replace("forward", "") + " backward"
            phase = phase.strip()
        snap = self.tracker._curr_mem_snap.get(torch.device("cpu"))
        if snap and snap["Total"] > self.peaks.get(phase, -1):
            self.peaks[phase] = snap["Total"]
            self.split[phase] = {str(k.value if hasattr(k, "value") else k): v for k, v in snap.items()}
        return out


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# torch counts the GPU attention kernels; the CPU's with the same formulas
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


# ------------------------------------------------------------------ accounting one step
@dataclass
class Step:
    """What a row builder returns: `run(on_phase)` runs one training step of the recipe; `tracked` are the
    modules, optimizers and tensors that exist before the step (MemTracker's track_external)."""

    run: Callable[[Callable[[str], None]], None]
    tracked: list
    info: dict = field(default_factory=dict)


def account(step: Step) -> dict:
    """Warm-up step under FlopCounterMode (allocates the optimizer state), then the accounted step.
    Returns peak_gib, split_gib (by category at the peak), phase_peak_gib, phase_split_gib, step_tflop,
    phase_tflop."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        flops = _PhaseFlops(counter)
        step.run(flops)
        flops("")
    tracker = Tracker()
    tracker.track_external(*step.tracked)
    tracker.skip_grad_hooks(p for m in step.tracked if isinstance(m, nn.Module) for p in m.parameters())
    peaks = PhasePeaks(tracker)
    with tracker, peaks:
        step.run(peaks)
    tracker.reset_mod_stats()
    peak = max(peaks.peaks.values())
    worst = max(peaks.peaks, key=peaks.peaks.get)
    return {"peak_gib": peak / GiB, "peak_phase": worst,
            "split_gib": {k: v / GiB for k, v in peaks.split[worst].items() if k != "Total"},
            "phase_peak_gib": {k: v / GiB for k, v in peaks.peaks.items() if k != "setup"},
            "phase_split_gib": {p: {k: v / GiB for k, v in s.items() if k != "Total"}
                                for p, s in peaks.split.items() if p != "setup"},
            "step_tflop": counter.get_total_flops() / 1e12, "phase_tflop": flops.tflop}


class _PhaseFlops:
    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter, self.phase, self.start, self.tflop = counter, "", 0, {}

    def __call__(self, phase: str) -> None:
        total = self.counter.get_total_flops()
        if self.phase:
            self.tflop[self.phase] = self.tflop.get(self.phase, 0.0) + (total - self.start) / 1e12
        self.phase, self.start = phase, total


def _accelerator(**kwargs):
    """A new accelerate.Accelerator with these settings. Its state is process-wide and refuses another
    mixed precision once set; the rows differ (ARBooth applies its own autocast: "no"; the class recipe
    uses accelerate's: "bf16"), so the state is reset first (accelerate's own tests do the same)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kwargs)


# ------------------------------------------------------------------ ARBooth on Infinity
def arbooth_step(*, method: str = "full", checkpointing: bool = True, batch: int = 2, rank: int = 16,
                 preset: str = "infinity_2b", pn: str = "1M", scales: int | None = None, infinity: dict | None = None,
                 vae: dict | None = None, fake: bool = True, device: str = "cpu") -> Step:
    """The ARBooth recipe's `train_step` (arbooth/recipes/train_subject.py) on Infinity at the sizes of
    `preset` (arbooth/subject_bases.py SUBJECT_PRESETS; infinity_2b: 32 blocks x 2048, the d32 BSQ-VAE;
    infinity_8b / infinity_8b_512: 40 x 3584, the d56 patchify VAE) or `infinity` / `vae` (constructor
    arguments) and its schedule at `pn` (1M = 1024x1024, 13 scales; infinity_8b_512: 0.25M, 10 scales),
    with the recipe's defaults
    (bf16 blocks and autocast, the KV-cached teacher, two AdamW steps, stochastic rounding for full).
    Random features stand in for T5's (16 prompt tokens) and the photos' VAE features (4 photos).
    `scales` keeps the schedule's first scales only, and `fake=False` builds real random weights instead
    (both for tests/benchmarks/test_memory_accounting.py, at tiny sizes), on `device` (real weights only:
    benchmarks/gpu_check.py times the same step on a GPU)."""

    from arbooth.adapt.subject_token import SubjectToken
    from arbooth.models import BSQVAE, Infinity
    from arbooth.models.infinity import INFINITY_PRESETS
    from arbooth.recipes.subject_config import SubjectTrainConfig, TuningConfig
    from arbooth.recipes.train_subject import Run, build_optimizer, build_tuner, train_step
    from arbooth.subject_bases import ModelConfig, preset_schedule

    model_cfg = ModelConfig(preset=preset, pn=pn, tuned_dtype="bf16")
    dev = torch.device(device)
    cfg = SubjectTrainConfig(subject="-", model=model_cfg, dtype="bf16", device=device,
                             batch_size=batch, validate_every=0, gradient_checkpointing=checkpointing,
                             tuning=TuningConfig(method=method, lora_rank=rank))
    schedule = preset_schedule(model_cfg)[:scales]
    sizes = INFINITY_PRESETS["infinity_8b" if preset.startswith("infinity_8b") else "infinity_2b"]
    with _on_meta() if fake else dev:
        torch.manual_seed(0)
        v = BSQVAE(**(vae or sizes["vae"])).eval().requires_grad_(False)
        model = Infinity(v, **(infinity or sizes["model"]), gradient_checkpointing=checkpointing,
                         drop_path_rate=cfg.model.drop_path_rate)
        model.requires_grad_(False)
        model.blocks.to(torch.bfloat16)  # as setup(): blocks in the tuned dtype
        # peft casts its adapters (a swap, which fake tensors refuse): inject on meta; SelectiveTuner clones
        # the originals, which must be fake: after materialize
        tuner = build_tuner(model, cfg.tuning) if method == "lora" else None
    if fake:
        fakes = materialize(model, v)
        if tuner is not None:  # LoRATuner listed the meta adapters: the optimizer must get the fake ones
            tuner.params = {k: fakes[id(p)] for k, p in tuner.params.items()}
    tuner = tuner or build_tuner(model, cfg.tuning)
    with contextlib.nullcontext() if fake else dev:  # (a fake tensor cannot be moved: .to swaps it)
        token = SubjectToken(cfg.tuning.text_prefix_length, model.text_channels)
    opt = build_optimizer(cfg, token, tuner, dev)
    _, H, W = schedule[-1]
    f = v.token_stride // v.patch_size  # the VAE's latent grid per token side (2 with spatial patchify)
    features = torch.randn(4, v.codebook_dim, H * f, W * f, device=dev)
    T = 16  # "a photo of <S*> dog" + the 4-row prefix: about this many T5 tokens
    text = torch.randn(1, T, model.text_channels, device=dev)
    mask = torch.ones(1, T, dtype=torch.bool, device=dev)
    ph = torch.zeros_like(mask)
    ph[0, 4] = True
    run = Run(cfg, _accelerator(cpu=dev.type == "cpu"), model, tuner, token, opt, schedule,
              cfg.loss.weights_for(len(schedule)), v, features, (text, mask, ph), (text[:, :8], mask[:, :8]), None,
              torch.Generator(dev).manual_seed(1), torch.Generator(dev).manual_seed(2), "random", "-")
    model.train()
    idx = torch.arange(batch, device=dev) % 4
    return Step(lambda probe: train_step(run, idx, on_phase=_arbooth_phases(probe)),
                [model, v, opt, token, features, text, mask, ph, *getattr(tuner, "originals", {}).values()],
                {"trainable": tuner.num_trainable(), "tokens": sum(h * w for _, h, w in schedule),
                 "image_px": H * v.token_stride})


def _arbooth_phases(probe: Callable[[str], None]) -> Callable[[str], None]:
    names = {"teacher": "teacher", "instance": "instance forward", "instance_update": "instance backward",
             "distill": "distill forward", "update": "distill backward"}
    return lambda phase: probe(names.get(phase, phase))


# ------------------------------------------------------------------ class-conditional VAR
def _var_on_fake(depth: int, method: str, checkpointing: bool = False, dims: dict | None = None, fake: bool = True):
    from arbooth.adapt.methods import prepare_for_method
    from arbooth.models import VAR, VQVAE
    from arbooth.models.var import VAE_PRESET, VAR_PRESETS
    from arbooth.models.var_training import build_optimizer
    from arbooth.recipes.class_config import OptimConfig

    with _on_meta() if fake else contextlib.nullcontext():
        torch.manual_seed(0)
        vae_kw, var_kw = (dims or {}).get("vae", VAE_PRESET), (dims or {}).get("var", VAR_PRESETS[depth])
        vae = VQVAE(**vae_kw)
        model = prepare_for_method(VAR(vae, **var_kw), method)
    if fake:
        materialize(model, vae)
    if checkpointing:
        from arbooth.adapt.finetuned import unwrap_peft
        unwrap_peft(model).gradient_checkpointing = True
    return vae, model, build_optimizer(model, OptimConfig(lr=1e-4))


def var_step(*, depth: int = 16, method: str = "fft", batch: int = 32, dims: dict | None = None) -> Step:
    """The class recipe's `train_step` (arbooth/recipes/train_class.py; encode 256x256 images with the
    VQVAE, drop labels, bf16 autocast forward, loss, backward, grad clip 1.0, AdamW) on a released VAR size at
    `batch` images per device (configs/class/*: 32), one micro-step that also updates."""
    from types import SimpleNamespace

    from arbooth.recipes.train_class import train_step

    vae, model, opt = _var_on_fake(depth, method, dims=dims)
    cfg = SimpleNamespace(train=SimpleNamespace(seed=0, batch_size=batch), optim=SimpleNamespace(
        class_dropout=0.1, label_smoothing=0.1, grad_clip=1.0))  # the configs' values (configs/class/*)
    acc = _accelerator(cpu=True, mixed_precision="bf16")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    size = 16 * vae.patch_nums[-1] if dims is None else dims["image_size"]  # 256x256 for the released VQVAE
    run = SimpleNamespace(cfg=cfg, accelerator=acc, vae=vae, model=model, optimizer=opt, scheduler=sched, grad_accum=1,
                          num_classes=model_num_classes(model), last_l=256)
    img = torch.randn(batch, 3, size, size)
    label = torch.randint(0, run.num_classes, (batch,))
    model.train()

    def run_step(probe):
        probe("forward")
        train_step(run, img, label, 0, update=True)
    return Step(run_step, [model, vae, opt, img, label],
                {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})


def model_num_classes(model) -> int:
    from arbooth.adapt.finetuned import unwrap_peft
    return unwrap_peft(model).num_classes


def dp_step(*, depth: int = 16, method: str = "fft", views: int = 1, batch: int = 32, mode: str = "book_keeping",
            dims: dict | None = None, fake: bool = True) -> Step:
    """One DP-SGD step (arbooth/privacy/engine.make_private, as arbooth/recipes/train_class_dp.py) or the
    same step without privacy (`mode="nonprivate"`), at `batch` examples x `views` augmented views of
    teacher-forced token maps (the tokenizer's encode is left out: it is the same in both)."""
    from arbooth.models.var_training import var_loss
    from arbooth.privacy.engine import make_private

    vae, model, opt = _var_on_fake(depth, method, dims=dims, fake=fake)
    from arbooth.adapt.finetuned import unwrap_peft
    var = unwrap_peft(model)
    n = batch * views
    label_N = torch.randint(0, var.num_classes, (batch,)).repeat_interleave(views)
    x_NLC = torch.randn(n, var.L - var.first_l, var.Cvae)
    idx_NL = torch.randint(0, var.V, (n, var.L))
    model.train()
    if mode == "nonprivate":
        def run_step(probe):
            probe("forward")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = var_loss(model(label_N, x_NLC), idx_NL)
            probe("backward")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return Step(run_step, [model, vae, opt, label_N, x_NLC, idx_NL])
    pt = make_private(model, opt, torch.utils.data.TensorDataset(torch.zeros(batch * 4)),
                      target_epsilon=float("inf"), delta=1e-5, sample_rate=0.25, steps=1,
                      max_grad_norm=0.5, views=views, clipping=mode, noise_multiplier=1.0)

    def run_dp(probe):
        probe("forward")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = var_loss(pt.module(label_N, x_NLC), idx_NL, reduction="none")
        probe("backward")
        pt.backward(loss)
        pt.optimizer.step()
        pt.optimizer.zero_grad(set_to_none=True)
    return Step(run_dp, [model, vae, pt.optimizer.original_optimizer if hasattr(pt.optimizer, "original_optimizer")
                         else opt, label_N, x_NLC, idx_NL])


def dp_blocks(*, method: str = "fft", views: int = 1, batch: int = 8, depth: int = 16,
              modes: tuple[str, ...] = ("nonprivate", "book_keeping")) -> list[dict]:
    """The DP step's memory at full depth from REAL tensors at VAR-d{depth} width and sequence length
    (1024 wide, 16 heads, 10 scales, L = 680; the tokenizer at a small width: it does not run): `dp_step`
    on 1 and on 2 blocks under the same tracker (Opacus' optimizer does not run on fake tensors: the
    process aborts in DPOptimizerFastGradientClipping.zero_grad). The second block's increase of each
    category is the per-block cost, exact at this width; the full-depth figure is the 1-block one plus
    (depth - 1) x that increase: a linear extrapolation in depth, stated as such in the row."""
    from arbooth.models.var import PATCH_NUMS, VAR_PRESETS

    rows = []
    for mode in modes:
        res = {}
        for d in (1, 2):
            dims = {"vae": {"vocab_size": 4096, "z_channels": 32, "ch": 32, "share_quant_resi": 4,
                            "patch_nums": PATCH_NUMS, "ch_mult": (1, 1)}, "var": {**VAR_PRESETS[depth], "depth": d}}
            t0 = time.perf_counter()
            res[d] = account(dp_step(method=method, views=views, batch=batch, mode=mode, dims=dims, fake=False))
            res[d]["account_s"] = time.perf_counter() - t0
        one, two = res[1], res[2]
        per_block = {c: two["split_gib"][c] - one["split_gib"][c] for c in one["split_gib"]}
        rows.append({"name": f"dp_d{depth} {method} k={views} {mode} B={batch} (1+2 blocks real, x{depth})",
                     "peak_gib": one["peak_gib"] + (depth - 1) * (two["peak_gib"] - one["peak_gib"]),
                     "peak_phase": two["peak_phase"], "method": "extrapolated: 1-block peak + (depth-1) x the "
                     "2nd block's increase, both accounted on real tensors at d16 width",
                     "split_gib": {c: one["split_gib"][c] + (depth - 1) * v for c, v in per_block.items()},
                     "per_block_gib": two["peak_gib"] - one["peak_gib"], "per_block_split_gib": per_block,
                     "one_block_peak_gib": one["peak_gib"], "two_block_peak_gib": two["peak_gib"],
                     "step_tflop": one["step_tflop"] + (depth - 1) * (two["step_tflop"] - one["step_tflop"]),
                     "account_s": one["account_s"] + two["account_s"]})
    return rows


# ------------------------------------------------------------------ the rows
def _rows() -> dict[str, Callable[[], Step]]:
    rows: dict[str, Callable[[], Step]] = {}
    for preset, tag in (("infinity_2b", "arbooth_2b"), ("infinity_8b", "arbooth_8b"),
                        ("infinity_8b_512", "arbooth_8b_512")):
        for method in ("full", "lora"):
            for ckpt in (True, False):
                for b in (1, 2):
                    name = f"{tag} {method}{' r16' if method == 'lora' else ''} ckpt={'on' if ckpt else 'off'} B={b}"
                    rows[name] = lambda p=preset, m=method, c=ckpt, b=b: arbooth_step(
                        preset=p, method=m, checkpointing=c, batch=b)
    for depth in (16, 20, 24, 30):
        for method in ("fft", "lora", "lntuning"):
            rows[f"var_d{depth} {method} B=32"] = lambda d=depth, m=method: var_step(depth=d, method=m, batch=32)
    for method in ("fft", "lora"):
        for k in (1, 8):
            # the private modes (dp_step(mode="book_keeping" / "ghost")) do not run on fake tensors: the
            # process aborts in Opacus' DPOptimizerFastGradientClipping.zero_grad (heap corruption); only the
            # non-private step at the DP recipe's shapes is a row here; --dp-blocks accounts the private one
            # on real tensors (dp_blocks)
            rows[f"dp_d16 {method} k={k} nonprivate B=32"] = (
                lambda m=method, k=k: dp_step(method=m, views=k, mode="nonprivate", batch=32))
    return rows


ROWS = _rows()


def account_row(name: str, build: Callable[[], Step]) -> dict:
    t0 = time.perf_counter()
    with fake_tensors():
        step = build()
        res = account(step)
    res |= {"name": name, **step.info, "account_s": time.perf_counter() - t0}
    for gpu, rate in (("h100", H100_TFLOPS), ("a100", A100_TFLOPS)):
        res[f"{gpu}_step_s_at_40pct"] = res["step_tflop"] / (rate * MFU)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="rows whose name contains any of these strings")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--dp-blocks", nargs=3, metavar=("METHOD", "VIEWS", "BATCH"),
                    help="the DP step (book-keeping) vs non-private from 1 and 2 real d16-width blocks (dp_blocks)")
    a = ap.parse_args()
    if a.dp_blocks:
        t0 = time.perf_counter()
        rows = dp_blocks(method=a.dp_blocks[0], views=int(a.dp_blocks[1]), batch=int(a.dp_blocks[2]))
        for r in rows:
            print(f"{r['name']:60s} | {r['peak_gib']:6.2f} GiB | per block {r['per_block_gib']:.3f} GiB | "
                  f"1 block {r['one_block_peak_gib']:.3f} | {r['account_s']:.0f} s", flush=True)
        print(f"book_keeping / nonprivate at full depth: {rows[1]['peak_gib'] / rows[0]['peak_gib']:.2f}x, per block "
              f"{rows[1]['per_block_gib'] / rows[0]['per_block_gib']:.2f}x")
        _merge_json(Path(a.out), rows, {"dp_blocks_wall_s": time.perf_counter() - t0})
        return
    names = [n for n in ROWS if not a.only or any(s in n for s in a.only)]
    if a.list:
        print("\n".join(names))
        return
    if not names:
        sys.exit(f"--only {a.only} matches no row; --list shows them")
    t0, rows = time.perf_counter(), []
    print(f"{'row':44s} | {'peak GiB':>8s} | {'at phase':18s} | params | grads | optim | act | temp | TFLOP | "
          "H100 s | A100 s", flush=True)
    for name in names:
        r = account_row(name, ROWS[name])
        rows.append(r)
        s = r["split_gib"]
        print(f"{name:44s} | {r['peak_gib']:8.2f} | {r['peak_phase']:18s} | {s['Parameter'] + s['Buffer']:6.2f} | "
              f"{s['Gradient']:5.2f} | {s['Optstate']:5.2f} | {s['Activation']:5.2f} | {s['Temp']:5.2f} | "
              f"{r['step_tflop']:7.1f} | {r['h100_step_s_at_40pct']:6.2f} | {r['a100_step_s_at_40pct']:6.2f}", flush=True)
    wall = time.perf_counter() - t0
    meta = {"torch": torch.__version__, "wall_s": wall, "mfu": MFU, "h100_tflops": H100_TFLOPS,
            "a100_tflops": A100_TFLOPS, "margin": MARGIN,
            "not_seen": "CUDA context, allocator rounding/fragmentation, cuBLAS/cuDNN/attention workspaces"}
    _merge_json(Path(a.out), rows, meta)
    print(f"wrote {a.out} ({wall:.0f} s); plan a GPU with {MARGIN}")


def _merge_json(out: Path, rows: list[dict], meta: dict) -> None:
    """Rows replace those of the same name in `out` and join the others (separate --only runs accumulate)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else {"meta": {}, "rows": []}
    keep = [r for r in old["rows"] if r["name"] not in {n["name"] for n in rows}]
    out.write_text(json.dumps({"meta": {**old["meta"], **meta}, "rows": keep + rows}, indent=1))


if __name__ == "__main__":
    main()
