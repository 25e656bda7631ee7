"""Ghost clipping in ONE backward pass: "book-keeping" (Bu, Wang, Zha & Karypis, 2023, "Differentially
Private Optimization on Large Model at Small Cost", ICML, Sec. 3 and Algorithm 1).

Opacus' ghost clipping (GradSampleModuleFastGradientClipping + DPTensorFastGradientClipping) runs two
backward passes: one for the per-example gradient norms, a second one of the clip-weighted loss for the
clipped sum. Every quantity the second pass computes is already known after the first: a trainable
layer's gradient is a product of its input activations `a` and its output gradient `g`, so the clipped
sum of a Linear weight is

    sum_b c_b * sum_t g_bt a_bt^T,   c_b = min(1, C / (||grad_b|| + 1e-6))   (Opacus' clip factor)

a per-example-weighted product of the same `a` and `g`. This module keeps them ("book-keeping") during
one backward and forms the clipped sum when the norms are known. Per layer it keeps the cheaper of
- the Gram form (`LinearGram`): `a` (B, T', I) and `g` (B, T', O); the norm comes from the ghost-norm
  identity ||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t.a_s)(g_t.g_s) (Li et al. 2022, Opacus' ghost norm);
- the folded per-example gradient (`PerExample`), (B, O, I), from which norm and weighted sum are direct.
It keeps whichever stores fewer numbers per example: T'*(I+O) against I*O (T' = K views x T positions).
For LoRA's rank-r matrices that is always the per-example gradient; for full fine-tuning at one view it
is the Gram form for the wide layers and the per-example gradient for the narrow ones; with many views
(T' = K*T large) it is the per-example gradient.

The backward pass itself never computes a parameter gradient. A forward hook (Opacus' extension point:
a GradSampleModule subclass with its own hooks) passes each trainable layer's output through `_Tap`, an
identity whose backward hands the output gradient to the module and whose second input is one scalar
`anchor` leaf shared by every tap. `torch.autograd.grad(loss, anchor)` then runs the backward through
every tapped output and through the inputs upstream of them, but not into any weight (autograd skips
what is not on a path to the anchor): the weight-gradient matmuls of the normal backward are replaced by
the weighted product above. Per-example weights enter `p.grad` as a backward would leave them; Opacus'
`DPOptimizerFastGradientClipping` then adds its noise and scales, and its accountant, Poisson sampler
and noise are used unchanged.

Augmentation multiplicity (arbooth.privacy.views): the K views of an example are folded into its
positions, so every record is of the per-example gradient of the MEAN over views (cross-view terms
included). Layers other than Linear and Embedding use their registered Opacus grad sampler (wrapped for
views as in views.py) and keep the per-example gradient.

Shapes: B examples, K views, N = B*K rows, T positions of one row, T' = K*T positions of one example,
I / O input / output features, V embedding rows, D embedding width.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from opacus.grad_sample import GradSampleModule
from opacus.utils.module_utils import requires_grad, trainable_parameters
from torch import nn

from arbooth.errors import ConfigError
from arbooth.privacy.views import ViewsMixin


# ------------------------------------------------------------------ records of one layer's parameter
class PerExample:
    """The per-example gradient itself, (B, *param.shape)."""

    def __init__(self, g_B: torch.Tensor) -> None:
        self.g_B = g_B

    def norm_sq(self) -> torch.Tensor:
        return self.g_B.flatten(1).float().pow(2).sum(1)

    def clipped_sum(self, coef_B: torch.Tensor) -> torch.Tensor:
        return torch.einsum("b,b...->...", coef_B.to(self.g_B.dtype), self.g_B)

    def per_example(self) -> torch.Tensor:
        return self.g_B


class LinearGram:
    """A Linear weight kept as its factors: activations a (B, T', I) and output gradients g (B, T', O)."""

    def __init__(self, a_BTI: torch.Tensor, g_BTO: torch.Tensor) -> None:
        self.a_BTI, self.g_BTO = a_BTI, g_BTO

    def norm_sq(self) -> torch.Tensor:
        aa_BTT = torch.bmm(self.a_BTI, self.a_BTI.transpose(1, 2)).float()
        gg_BTT = torch.bmm(self.g_BTO, self.g_BTO.transpose(1, 2)).float()
        return (aa_BTT * gg_BTT).sum((1, 2))

    def clipped_sum(self, coef_B: torch.Tensor) -> torch.Tensor:
        g_BTO = self.g_BTO * coef_B.to(self.g_BTO.dtype)[:, None, None]
        return g_BTO.flatten(0, 1).T @ self.a_BTI.flatten(0, 1)                    # O I

    def per_example(self) -> torch.Tensor:
        return torch.bmm(self.g_BTO.transpose(1, 2), self.a_BTI)                   # B O I


class EmbeddingRows:
    """An Embedding weight kept as looked-up indices idx (B, T') and output gradients g (B, T', D): the
    per-example gradient (B, V, D) is never formed (V = 1001 class rows for VAR's class table)."""

    def __init__(self, idx_BT: torch.Tensor, g_BTD: torch.Tensor, rows: int) -> None:
        self.idx_BT, self.g_BTD, self.rows = idx_BT, g_BTD, rows

    def norm_sq(self) -> torch.Tensor:
        same_BTT = (self.idx_BT[:, :, None] == self.idx_BT[:, None, :]).float()
        gg_BTT = torch.bmm(self.g_BTD, self.g_BTD.transpose(1, 2)).float()
        return (same_BTT * gg_BTT).sum((1, 2))

    def clipped_sum(self, coef_B: torch.Tensor) -> torch.Tensor:
        g_BTD = self.g_BTD * coef_B.to(self.g_BTD.dtype)[:, None, None]
        out_VD = g_BTD.new_zeros(self.rows, g_BTD.shape[-1])
        return out_VD.index_add_(0, self.idx_BT.flatten(), g_BTD.flatten(0, 1))

    def per_example(self) -> torch.Tensor:
        b, t, d = self.g_BTD.shape
        out_BVD = self.g_BTD.new_zeros(b, self.rows, d)
        return out_BVD.scatter_add_(1, self.idx_BT[:, :, None].expand(b, t, d), self.g_BTD)


Record = PerExample | LinearGram | EmbeddingRows


# ------------------------------------------------------------------ per-layer book-keeping
def _fold_rows(t: torch.Tensor, views: int) -> torch.Tensor:
    """(N, ..., D) -> (B, K*..., D): an example's K views (adjacent rows) become its positions."""
    return t.reshape(t.shape[0] // views, -1, t.shape[-1])


def keep_linear(layer: nn.Linear, a_N: torch.Tensor, g_N: torch.Tensor, views: int) -> dict:
    """Records of a Linear's weight and bias from its input a (N, ..., I) and output gradient g (N, ..., O).

    Both matmul operands take the output gradient's dtype (bf16 under autocast, as autograd's own
    weight-gradient matmul of the autocast linear)."""
    g_BTO = _fold_rows(g_N, views)
    a_BTI = _fold_rows(a_N, views).to(g_BTO.dtype)
    out: dict[nn.Parameter, Record] = {}
    if layer.weight.requires_grad:
        t, (o, i) = a_BTI.shape[1], layer.weight.shape
        out[layer.weight] = (LinearGram(a_BTI, g_BTO) if t * (i + o) < i * o
                             else PerExample(torch.bmm(g_BTO.transpose(1, 2), a_BTI)))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = PerExample(g_BTO.sum(1))
    return out


def keep_embedding(layer: nn.Embedding, idx_N: torch.Tensor, g_N: torch.Tensor, views: int) -> dict:
    """Records of an Embedding from its indices (N, ...) and output gradient (N, ..., D): the index form
    when an example looks up fewer positions than the table has rows, else the per-example gradient."""
    if not layer.weight.requires_grad:
        return {}
    if layer.padding_idx is not None or layer.max_norm is not None or layer.scale_grad_by_freq:
        raise ConfigError("book-keeping clipping supports plain nn.Embedding only "
                          "(no padding_idx, max_norm or scale_grad_by_freq)")
    g_BTD = _fold_rows(g_N, views)
    idx_BT = idx_N.reshape(g_BTD.shape[0], -1)
    rec = EmbeddingRows(idx_BT, g_BTD, layer.num_embeddings)
    return {layer.weight: rec if idx_BT.shape[1] < layer.num_embeddings else PerExample(rec.per_example())}


class _Tap(torch.autograd.Function):
    """Identity on a trainable layer's output; its backward hands the output gradient to `on_grad`.
    The `anchor` input makes the tap a path from the loss to the anchor (see the module docstring)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, anchor: torch.Tensor, on_grad: Callable) -> torch.Tensor:
        ctx.on_grad = on_grad
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ctx.on_grad(grad_out.detach())
        ctx.on_grad = None  # the graph outlives the backward (the caller holds the loss): drop the activations
        return grad_out, torch.zeros((), device=grad_out.device), None


class BookKeepingGradSampleModule(ViewsMixin, GradSampleModule):
    """Opacus GradSampleModule whose `backward(loss_B)` leaves the CLIPPED SUM of the per-example
    gradients (of the mean over each example's K views) in `p.grad`, in one backward pass.

    `loss_B` holds one loss per example (B,). After `backward`, `per_example_norms` holds the
    unclipped per-example gradient norms (B,) -- raw data, for tests only (never log them).
    Raises ConfigError for a layer with trainable parameters and no registered Opacus grad sampler,
    and for a layer whose output is not a single tensor."""

    def __init__(self, m: nn.Module, *, views: int = 1, max_grad_norm: float = 1.0, strict: bool = True):
        super().__init__(m, batch_first=True, loss_reduction="sum", strict=strict)
        self._anchor: torch.Tensor | None = None                  # the taps' shared leaf, one per forward
        self._records: dict[nn.Parameter, list[Record]] = {}      # filled during backward, then cleared
        self._setup_views(views)
        self.max_grad_norm = max_grad_norm
        self.trainable_parameters = [p for _, p in trainable_parameters(self._module)]
        self.per_example_norms: torch.Tensor | None = None

    # Opacus' GradSampleHooks.add_hooks registers a forward hook (activations) and a full backward hook
    # (per-sample gradients) per trainable layer; here a single forward hook that taps the output.
    def add_hooks(self, *, loss_reduction: str = "sum", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for module in self.iterate_submodules(self._module):
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(self._tap_output))
        self.enable_hooks()

    def _tap_output(self, module: nn.Module, inputs: tuple, output):
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled() and requires_grad(module)):
            return None
        if not torch.is_tensor(output):
            raise ConfigError(f"book-keeping clipping needs one output tensor per trainable layer; "
                              f"{type(module).__name__} returns {type(output).__name__}")
        if self._anchor is None:
            self._anchor = torch.zeros((), device=output.device, requires_grad=True)
        acts = [t.detach() if torch.is_tensor(t) else t for t in inputs]
        if type(module) is nn.Linear and torch.is_autocast_enabled(output.device.type) and acts[0].is_floating_point():
            # keep_linear multiplies in the output gradient's dtype, the autocast dtype: keep the input in it
            # from here. peft casts a LoRA layer's input to its fp32 adapters; holding that fp32 copy until
            # the clip factors are known cost 0.15 GiB per VAR-d16 block at batch 8 (benchmarks/memory.py
            # --dp-blocks lora 1 8); the values used are the same
            acts[0] = acts[0].to(torch.get_autocast_dtype(output.device.type))
        return _Tap.apply(output, self._anchor, partial(self._keep, module, acts))

    def _keep(self, module: nn.Module, acts: list, g_N: torch.Tensor) -> None:
        """Called in the backward with the layer's output gradient: store its records."""
        if g_N.shape[0] % self.views:
            raise ValueError(f"{g_N.shape[0]} rows are not a whole number of examples of {self.views} views")
        if g_N.shape[0] == 0:  # an empty Poisson batch: zero examples per parameter
            recs = {p: PerExample(g_N.new_zeros((0, *p.shape)))
                    for p in module.parameters(recurse=False) if p.requires_grad}
        elif type(module) is nn.Linear:
            recs = keep_linear(module, acts[0], g_N, self.views)
        elif type(module) is nn.Embedding:
            recs = keep_embedding(module, acts[0], g_N, self.views)
        else:  # the registered sampler, wrapped for views (views.py); its result is per example
            recs = {p: PerExample(gs) for p, gs in self.GRAD_SAMPLERS[type(module)](module, acts, g_N).items()}
        for p, rec in recs.items():
            self._records.setdefault(p, []).append(rec)

    def backward(self, loss_B: torch.Tensor) -> None:
        """One backward pass; then p.grad += sum_b c_b grad_b for every trainable parameter."""
        anchor, self._anchor = self._anchor, None
        if anchor is None:
            raise RuntimeError("backward without a training-mode forward through this module")
        try:
            torch.autograd.grad(loss_B.sum(), anchor)
            records = {p: self._merge(recs) for p, recs in self._records.items()}
        finally:
            self._records = {}
        b = loss_B.shape[0]
        norm_sq_B = torch.zeros(b, device=loss_B.device)
        for rec in records.values():
            norm_sq_B += rec.norm_sq().to(norm_sq_B.device)
        self.per_example_norms = norm_sq_B.sqrt()
        coef_B = (self.max_grad_norm / (self.per_example_norms + 1e-6)).clamp(max=1.0)  # DPOptimizer's
        for p in self.trainable_parameters:
            rec = records.pop(p, None)  # free each record as soon as its clipped sum exists
            grad = rec.clipped_sum(coef_B.to(p.device)).to(p.dtype) if rec is not None else torch.zeros_like(p)
            p.grad = grad.view_as(p) if p.grad is None else p.grad + grad.view_as(p)

    @staticmethod
    def _merge(recs: list[Record]) -> Record:
        """A layer used more than once in a forward (tied parameters): the per-example gradient is the
        sum of its uses, so the records are combined exactly into one PerExample."""
        if len(recs) == 1:
            return recs[0]
        return PerExample(torch.stack([r.per_example() for r in recs]).sum(0))
