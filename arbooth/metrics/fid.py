"""Class-conditional generation quality: FID, sFID, precision and recall.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule..."): the Frechet distance
  between Gaussians fitted to Inception pool3 features of real and generated images,
  ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}). Statistics are kept in float64; the matrix
  square root follows pytorch-fid / clean-fid (scipy sqrtm, with an eps-offset retry).
- sFID (Nash et al. 2021): the same distance on spatial features (see extractors.InceptionFID).
- Precision / recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models"): k-NN balls (k=3) around each real (generated) feature approximate the real
  (generated) manifold; precision is the fraction of generated samples inside the real manifold,
  recall the fraction of real samples inside the generated one.

Shapes: N, M sample counts, D feature dimension.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from arbooth.errors import ArboothError
from arbooth.outputs import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats_ND: np.ndarray | torch.Tensor) -> GaussianStats:
        acc = _MomentAccumulator()
        acc.update(feats_ND)
        return acc.stats()


def few_samples_warning(a: GaussianStats, b: GaussianStats, what: str = "FID") -> str | None:
    """A warning when either set has fewer samples than feature dimensions (N < D), else None.

    The covariance of N < D samples has rank at most N - 1, and the estimate is strongly biased
    upwards at small N (two samples of one distribution, 2048-d features: about 1321 at N=50, 1107 at
    N=200, 127 at N=6000, where the true value is 0). Such values are not comparable across N."""
    D = a.mu.shape[0]
    if min(a.n, b.n) >= D:
        return None
    return (f"{what} from {a.n} and {b.n} samples with {D}-dimensional features: fewer samples than "
            f"dimensions, so the value is strongly biased upwards and only comparable at the same N")


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)), as pytorch-fid's calculate_frechet_distance."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ArboothError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma.dot(b.sigma))
    if not np.isfinite(covmean).all():
        # Near-singular product (few samples): offset the diagonals, as pytorch-fid does.
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ArboothError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))


class _MomentAccumulator:
    """Running sum and sum of outer products in float64, so statistics stream over batches."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_D: np.ndarray | None = None
        self.outer_DD: np.ndarray | None = None

    def update(self, feats_ND: np.ndarray | torch.Tensor) -> None:
        f = feats_ND.detach().cpu().double().numpy() if isinstance(feats_ND, torch.Tensor) \
            else np.asarray(feats_ND, dtype=np.float64)
        if f.ndim != 2:
            raise ArboothError(f"features must be (N, D), got {f.shape}")
        if self.sum_D is None:
            self.sum_D = np.zeros(f.shape[1])
            self.outer_DD = np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.sum_D += f.sum(0)
        self.outer_DD += f.T @ f

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise ArboothError(f"need at least 2 samples for a covariance, got {self.n}")
        mu = self.sum_D / self.n
        sigma = (self.outer_DD - self.n * np.outer(mu, mu)) / (self.n - 1)  # unbiased, as np.cov
        return GaussianStats(mu=mu, sigma=sigma, n=self.n)


class FrechetDistance:
    """FID (or sFID) from features: update(feats_ND, real=...) for both sets (N x D float features, e.g.
    D = 2048 Inception pool features), then compute() -> the Frechet distance (>= 0, float64 statistics;
    Heusel et al. 2017, as pytorch-fid / torch-fidelity compute it).

    `reference` may be given as precomputed statistics (the cached real-data statistics); adding real
    features then raises ArboothError, as does compute() with fewer than two samples in a set. After
    compute(), `warning` holds `few_samples_warning`'s text when a set had fewer samples than
    dimensions (also logged), else None."""

    def __init__(self, reference: GaussianStats | None = None) -> None:
        self.reference = reference
        self._real = _MomentAccumulator()
        self._fake = _MomentAccumulator()
        self.warning: str | None = None  # set by compute(): few_samples_warning

    def update(self, feats_ND: np.ndarray | torch.Tensor, *, real: bool) -> None:
        if real and self.reference is not None:
            raise ArboothError("reference statistics were given; do not add real features too")
        (self._real if real else self._fake).update(feats_ND)

    def compute(self) -> float:
        ref = self.reference if self.reference is not None else self._real.stats()
        fake = self._fake.stats()
        self.warning = few_samples_warning(ref, fake)
        if self.warning:
            log.warning(self.warning)
        return frechet_distance(ref, fake)


# ----------------------------------------------------------------------------- precision / recall

def _kth_nn_radii(x_ND: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest neighbour in the same set (itself excluded)."""
    _check_k(k)
    if x_ND.shape[0] <= k:
        raise ArboothError(f"precision/recall with k={k} needs more than {k} samples, got {x_ND.shape[0]}")
    out = []
    for i in range(0, x_ND.shape[0], batch):
        d_bN = torch.cdist(x_ND[i:i + batch], x_ND)
        # The smallest distance is the point to itself (0); the (k+1)-th smallest is the k-th NN,
        # as in the reference code (NVlabs/stylegan2-ada-pytorch metrics/precision_recall.py).
        out.append(d_bN.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _check_k(k: int) -> None:
    """k of the k-NN radii: an integer >= 1 (k = 0 makes every radius 0, a negative k fails in kthvalue)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArboothError(f"precision/recall needs k >= 1 (the k-th nearest neighbour), got {k!r}")


def _coverage(manifold_ND: torch.Tensor, radii_N: torch.Tensor, probes_MD: torch.Tensor, batch: int) -> float:
    """Fraction of probes inside at least one ball (centre manifold_n, radius radii_n)."""
    inside = []
    for i in range(0, probes_MD.shape[0], batch):
        d_bN = torch.cdist(probes_MD[i:i + batch], manifold_ND)
        inside.append((d_bN <= radii_N[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_ND: np.ndarray | torch.Tensor, fake_MD: np.ndarray | torch.Tensor, *,
                     k: int = 3, batch: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii; float64 distances.
    Raises ArboothError (one line) for k < 1 or a set of k samples or fewer."""
    _check_k(k)
    real = torch.as_tensor(np.asarray(real_ND) if not isinstance(real_ND, torch.Tensor) else real_ND).double()
    fake = torch.as_tensor(np.asarray(fake_MD) if not isinstance(fake_MD, torch.Tensor) else fake_MD).double()
    precision = _coverage(real, _kth_nn_radii(real, k, batch), fake, batch)
    recall = _coverage(fake, _kth_nn_radii(fake, k, batch), real, batch)
    return precision, recall


class PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019; NVlabs/stylegan2-ada-pytorch
    metrics/precision_recall.py): update(feats_ND, real=...) for both sets, then compute() ->
    {"precision": p, "recall": r}, each in [0, 1], with k-NN radii (k = 3) in float64. Raises
    ArboothError when a set has k samples or fewer."""

    def __init__(self, k: int = 3) -> None:
        _check_k(k)
        self.k = k
        self._real: list[torch.Tensor] = []
        self._fake: list[torch.Tensor] = []

    def update(self, feats_ND: np.ndarray | torch.Tensor, *, real: bool) -> None:
        (self._real if real else self._fake).append(torch.as_tensor(np.asarray(feats_ND, dtype=np.float64)))

    def compute(self) -> dict[str, float]:
        p, r = precision_recall(torch.cat(self._real), torch.cat(self._fake), k=self.k)
        return {"precision": p, "recall": r}


# ----------------------------------------------------------------------------- reference cache

def folder_content_hash(files: list[Path], root: Path) -> str:
    """SHA-256 over (relative path, bytes) of every file: changes when any image changes."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_cached_features(cache_dir: Path, key: str) -> dict[str, np.ndarray] | None:
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        log.info("using cached reference features %s", path)
        return {k: z[k] for k in z.files}


def save_cached_features(cache_dir: Path, key: str, feats: dict[str, np.ndarray]) -> Path:
    """Atomic write of the reference features (float32) for `key`."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in feats.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    return atomic_write(Path(cache_dir) / f"{key}.npz", write)
