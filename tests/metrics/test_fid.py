"""FID against the closed form and torchmetrics; precision/recall against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group
from torchmetrics.image.fid import _compute_fid

from arbooth.errors import ArboothError
from arbooth.metrics.fid import (
    FrechetDistance,
    GaussianStats,
    PrecisionRecall,
    folder_content_hash,
    frechet_distance,
    precision_recall,
)


def _closed_form_commuting(mu1, d1, mu2, d2):
    # S1 = Q diag(d1) Q^T, S2 = Q diag(d2) Q^T commute, so sqrt(S1 S2) = Q diag(sqrt(d1 d2)) Q^T.
    return float(((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum())


def test_fid_equals_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    dim = 8
    q = ortho_group.rvs(dim, random_state=1)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    d1, d2 = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    a = GaussianStats(mu1, q @ np.diag(d1) @ q.T, 1000)
    b = GaussianStats(mu2, q @ np.diag(d2) @ q.T, 1000)
    assert frechet_distance(a, b) == pytest.approx(_closed_form_commuting(mu1, d1, mu2, d2), abs=1e-9)


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(0)
    dim, n = 4, 200_000
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    d1, d2 = np.ones(dim), np.full(dim, 4.0)
    x = rng.normal(size=(n, dim)) * np.sqrt(d1) + mu1
    y = rng.normal(size=(n, dim)) * np.sqrt(d2) + mu2
    fid = FrechetDistance()
    for s in range(0, n, 50_000):  # streamed in batches
        fid.update(x[s:s + 50_000], real=True)
        fid.update(torch.from_numpy(y[s:s + 50_000]).float(), real=False)
    assert fid.compute() == pytest.approx(_closed_form_commuting(mu1, d1, mu2, d2), rel=0.02)  # = 5.0


def test_streaming_stats_match_numpy_cov():
    f = np.random.default_rng(2).normal(size=(300, 16)).astype(np.float32)
    fd = FrechetDistance()
    fd.update(f[:100], real=False)
    fd.update(f[100:], real=False)
    stats = fd._fake.stats()
    np.testing.assert_allclose(stats.mu, f.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(f.astype(np.float64), rowvar=False), atol=1e-10)


def test_fid_matches_torchmetrics_on_same_features():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(500, 64))
    fake = rng.normal(size=(400, 64)) * 1.3 + 0.2
    ours = frechet_distance(GaussianStats.from_features(real), GaussianStats.from_features(fake))
    a, b = torch.from_numpy(real), torch.from_numpy(fake)
    ref = float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))
    assert ours == pytest.approx(ref, abs=1e-3)


def test_identical_feature_sets_give_fid_zero():
    f = np.random.default_rng(4).normal(size=(256, 32))
    assert abs(frechet_distance(GaussianStats.from_features(f), GaussianStats.from_features(f))) < 1e-6


def test_dimension_mismatch_is_an_error():
    with pytest.raises(ArboothError):
        frechet_distance(GaussianStats.from_features(np.eye(3)), GaussianStats.from_features(np.eye(4)))


def test_precision_recall_hand_computed_1d():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[5.0], [7.0], [-2.0], [2.5]])
    # k=3: real radii 3,2,2,3 -> union of balls [-3, 6]: 5, -2, 2.5 inside, 7 outside -> precision 3/4.
    # fake radii 9,4.5,7,9 -> union [-11, 16] covers every real point -> recall 1.
    assert precision_recall(real, fake, k=3) == (0.75, 1.0)
    # k=1: real radii all 1 -> [-1, 4]: only 2.5 inside -> precision 1/4.
    # fake radii -2:4.5, 2.5:2.5, 5:2, 7:2 -> [-6.5,2.5] u [0,5] u [3,9] covers 0..3 -> recall 1.
    assert precision_recall(real, fake, k=1) == (0.25, 1.0)
    # Swapping the sets swaps the roles.
    real2, fake2 = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]]), np.array([[0.5], [1.5], [2.5], [3.0]])
    # k=1 real radii 1,1,1,1,1 -> [-1,3] u [9,12]: all fake inside -> precision 1.
    # fake radii 1,1,0.5,0.5 -> [-0.5,1.5] u [0.5,2.5] u [2,3] u [2.5,3.5]: 0,1,2 in, 10,11 out -> recall 3/5.
    assert precision_recall(real2, fake2, k=1) == (1.0, 0.6)


def test_precision_recall_matches_brute_force_2d():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(40, 2)), rng.normal(size=(30, 2)) * 0.5 + 1.5

    def brute(manifold, probes, k):
        radii = []
        for p in manifold:
            d = sorted(float(np.linalg.norm(p - q)) for q in manifold)
            radii.append(d[k])  # d[0] is the point itself
        return np.mean([any(np.linalg.norm(x - m) <= r for m, r in zip(manifold, radii)) for x in probes])

    metric = PrecisionRecall(k=3)
    metric.update(real[:20], real=True)
    metric.update(real[20:], real=True)
    metric.update(fake, real=False)
    out = metric.compute()
    assert out["precision"] == pytest.approx(brute(real, fake, 3), abs=1e-12)
    assert out["recall"] == pytest.approx(brute(fake, real, 3), abs=1e-12)
    assert 0.0 < out["precision"] < 1.0 and 0.0 < out["recall"] < 1.0


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(ArboothError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)), k=3)


def test_content_hash_changes_with_content(tmp_path):
    (tmp_path / "a.png").write_bytes(b"one")
    (tmp_path / "b.png").write_bytes(b"two")
    files = sorted(tmp_path.iterdir())
    h1 = folder_content_hash(files, tmp_path)
    assert h1 == folder_content_hash(files, tmp_path)
    (tmp_path / "b.png").write_bytes(b"tw0")
    assert folder_content_hash(files, tmp_path) != h1


def test_fewer_samples_than_dims_warns_and_fid_depends_on_n(caplog):
    """Issue 18.5: two samples of one distribution (true FID 0), 32-d features. Below N = 32 the
    estimate is large and falls with N (so FIDs at different N are not comparable): warned, and the
    `warning` attribute carries the text for the JSON report; at N >= D there is no warning."""
    rng = np.random.default_rng(0)
    values, warnings = {}, {}
    for n in (16, 64, 4096):
        fid = FrechetDistance()
        fid.update(rng.normal(size=(n, 32)), real=True)
        fid.update(rng.normal(size=(n, 32)), real=False)
        with caplog.at_level("WARNING"):
            values[n] = fid.compute()
        warnings[n] = fid.warning
    assert values[16] > values[64] > values[4096] > 0 and values[4096] < 0.5 and values[16] > 20 * values[4096]
    assert "16 and 16 samples with 32-dimensional features" in warnings[16]
    assert "only comparable at the same N" in caplog.text
    assert warnings[64] is None and warnings[4096] is None


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_precision_recall_refuses_k_below_one_in_one_line(k):
    """Issue 28 kind 7: k = 0 gave meaningless precision/recall (every radius 0), k = -1 a kthvalue traceback."""
    with pytest.raises(ArboothError, match=r"needs k >= 1") as e:
        precision_recall(np.zeros((8, 2)), np.zeros((8, 2)), k=k)
    assert "\n" not in str(e.value)
    with pytest.raises(ArboothError, match=r"needs k >= 1"):
        PrecisionRecall(k=k)
    with pytest.raises(ArboothError, match="k=8 needs more than 8 samples"):  # k >= the set's size
        precision_recall(np.random.default_rng(0).normal(size=(8, 2)), np.zeros((20, 2)), k=8)


def test_the_few_samples_warning_looks_at_the_smaller_set():
    """Mutant caught: the N < D warning computed from the larger set. Reference N >= D, generated N < D."""
    rng = np.random.default_rng(0)
    fid = FrechetDistance()
    fid.update(rng.normal(size=(64, 32)), real=True)
    fid.update(rng.normal(size=(16, 32)), real=False)
    fid.compute()
    assert fid.warning is not None and "16" in fid.warning
    fid = FrechetDistance()  # and the other way round
    fid.update(rng.normal(size=(16, 32)), real=True)
    fid.update(rng.normal(size=(64, 32)), real=False)
    fid.compute()
    assert fid.warning is not None
