"""Augmentation multiplicity (De et al. 2022, "Unlocking high-accuracy differentially private image
classification through scale", Sec. 3.3) at the depth where Opacus computes per-sample gradients.

Each example enters the model as K augmented views that lie next to each other along the batch
dimension: rows i*K ... i*K+K-1 are example i (B examples, N = B*K rows). The gradient of an example
is the MEAN of its K view gradients, taken before clipping: an example still moves the clipped sum by
at most C, so K views cost the privacy of one example (the accountant sees B examples, never N rows).

How it plugs into Opacus (v1.6, pinned): the per-sample gradient of each trainable layer is computed in
a backward hook from the layer's captured activations and backprops, through the samplers registered
with `register_grad_sampler` / `register_norm_sampler`. The two GradSampleModule subclasses below
- count the layer's batch as B, not N (`rearrange_grad_samples`), so the backprops of the usual "mean
  over all N rows" loss are rescaled to (1/K) * per-view gradient: summing a group gives the mean;
- wrap the registered samplers. Layers whose per-sample gradient is a sum over positions of
  per-position terms (Linear, Embedding, LayerNorm, RMSNorm) get the K views folded into the position
  dimension, (N, T, D) -> (B, K*T, D): Opacus' own sampler then returns the per-example sum directly,
  never materialising N per-view gradients, and the ghost-clipping norm sampler returns the norm of
  the sum with its cross-view terms (exact, not a bound). Any other registered sampler runs on the N
  rows and its output is summed over each group of K.
A layer with trainable parameters and no registered sampler (Opacus' functorch fallback) is refused:
its functorch path cannot be told about views without patching Opacus.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.grad_sample_module import _get_batch_size
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from torch import nn

from arbooth.errors import ConfigError

Sampler = Callable[[nn.Module, list, torch.Tensor], dict]

# Samplers that sum per-position contributions over every dim between batch and features, so folding
# views into positions is exact (opacus/grad_sample/{linear,embedding,layer_norm,rms_norm}.py).
FOLDABLE = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def _fold(t: torch.Tensor, views: int, positions: bool) -> torch.Tensor:
    """(N, T, ...) -> (B, K*T, ...) when the layer has a position dim, else (N, ...) -> (B, K, ...).
    Contiguous, because Opacus' Embedding norm sampler `.view`s its indices (VAR's level indices are
    an `expand`ed tensor)."""
    b = t.shape[0] // views
    if positions:
        return t.reshape(b, views * t.shape[1], *t.shape[2:]).contiguous()
    return t.reshape(b, views, *t.shape[1:]).contiguous()


def _empty(layer: nn.Module, backprops: torch.Tensor, norms: bool) -> dict:
    """An empty Poisson batch: zero rows per parameter (some Opacus samplers cannot reshape 0 rows)."""
    return {p: backprops.new_zeros((0,) if norms else (0, *p.shape))
            for p in layer.parameters(recurse=False) if p.requires_grad}


def folding_sampler(fn: Sampler, views: int, norms: bool = False) -> Sampler:
    def sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        if backprops.shape[0] == 0:
            return _empty(layer, backprops, norms)
        positions = backprops.dim() >= 3
        acts = [_fold(a, views, positions) if torch.is_tensor(a) else a for a in activations]
        return fn(layer, acts, _fold(backprops, views, positions))
    return sampler


def summing_sampler(fn: Sampler, views: int) -> Sampler:
    def sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        if backprops.shape[0] == 0:
            return _empty(layer, backprops, norms=False)
        out = fn(layer, activations, backprops)
        return {p: gs.reshape(gs.shape[0] // views, views, *gs.shape[1:]).sum(1) for p, gs in out.items()}
    return sampler


def linear_norm_sampler(norm_fn: Sampler, grad_fn: Sampler, views: int) -> Sampler:
    """Per-example gradient norm of a Linear layer by the cheaper exact route. Ghost clipping's
    Gram-matrix trick costs B*(K*T)^2 per layer, and folding the views makes T grow K-fold; the
    folded per-example gradient costs B*d_in*d_out (tiny for LoRA's rank-r matrices). Choose per layer
    and input shape; both give the norm of the mean over views, and neither is stored."""
    ghost = folding_sampler(norm_fn, views, norms=True)
    explicit = folding_sampler(grad_fn, views)

    def sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        t = views * (backprops.shape[1] if backprops.dim() >= 3 else 1)
        if t * t <= layer.weight.numel() or backprops.shape[0] == 0:
            return ghost(layer, activations, backprops)
        return {p: g.reshape(g.shape[0], -1).norm(2, dim=1)
                for p, g in explicit(layer, activations, backprops).items()}
    return sampler


def _views_samplers(registry: dict, views: int, fold_only: bool) -> dict:
    """Wrap every sampler of `registry`; with fold_only (norm samplers) drop the non-foldable ones."""
    out = {}
    for layer_type, fn in registry.items():
        if issubclass(layer_type, FOLDABLE):
            out[layer_type] = folding_sampler(fn, views, norms=fold_only)
        elif not fold_only:
            out[layer_type] = summing_sampler(fn, views)
    return out


class ViewsMixin:
    """Shared by the modules below and arbooth.privacy.bookkeeping; `self` is a GradSampleHooks subclass."""

    views: int

    def _setup_views(self, views: int) -> None:
        if views < 1:
            raise ConfigError(f"augmentation multiplicity must be >= 1, got {views}")
        self.views = views
        missing = sorted({type(m).__name__ for m in self.iterate_submodules(self._module)
                          if type(m) not in self.GRAD_SAMPLERS and type(m) not in (DPRNN, DPLSTM, DPGRU)})
        if missing:
            raise ConfigError(f"DP training needs a registered Opacus grad sampler for every layer that "
                              f"owns trainable parameters; none for: {', '.join(missing)}")
        # Instance attributes shadow Opacus' class-level registries for this module only; the keys stay
        # the same, so the hooks' dispatch (and which modules got hooks) is unchanged.
        self.GRAD_SAMPLERS = _views_samplers(type(self).GRAD_SAMPLERS, views, fold_only=False)

    def rearrange_grad_samples(self, *, module: nn.Module, backprops: torch.Tensor, loss_reduction: str,
                               batch_first: bool) -> tuple[list, torch.Tensor]:
        if not hasattr(module, "max_batch_len"):
            rows = _get_batch_size(module=module, batch_dim=0)
            if rows % self.views:
                raise ValueError(f"{rows} rows are not a whole number of examples of {self.views} views")
            module.max_batch_len = rows // self.views
        return super().rearrange_grad_samples(module=module, backprops=backprops,
                                              loss_reduction=loss_reduction, batch_first=batch_first)


class ViewsGradSampleModule(ViewsMixin, GradSampleModule):
    """Opacus' hooks GradSampleModule; `p.grad_sample` holds one row per example (mean over views)."""

    def __init__(self, m: nn.Module, *, views: int = 1, loss_reduction: str = "mean", strict: bool = True):
        super().__init__(m, batch_first=True, loss_reduction=loss_reduction, strict=strict)
        self._setup_views(views)


class ViewsGradSampleModuleGhost(ViewsMixin, GradSampleModuleFastGradientClipping):
    """Opacus' ghost-clipping module: per-example norms of the mean over views, then a second backward
    of the clip-weighted loss (see `arbooth.privacy.engine.PrivateTraining.backward`)."""

    def __init__(self, m: nn.Module, *, views: int = 1, max_grad_norm: float = 1.0,
                 loss_reduction: str = "mean", strict: bool = True):
        super().__init__(m, batch_first=True, loss_reduction=loss_reduction, strict=strict,
                         max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        self._setup_views(views)
        # Only foldable norm samplers are exact for a sum over views; other layers fall back to the
        # (summing) grad sampler and the norm of its output, which Opacus' ghost hook does by itself.
        self.NORM_SAMPLERS = _views_samplers(type(self).NORM_SAMPLERS, views, fold_only=True)
        self.NORM_SAMPLERS[nn.Linear] = linear_norm_sampler(type(self).NORM_SAMPLERS[nn.Linear],
                                                            type(self).GRAD_SAMPLERS[nn.Linear], views)
