"""GaussianMixture (pyro_seqlatent.em) against scikit-learn, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from pyro_seqlatent.em import GaussianMixture
from pyro_seqlatent.em.kmeans import kmeans, kmeans_plusplus

TYPES = ("full", "diag", "spherical")
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def blobs(n=400, overlap=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0, 0], [3, 3, 0], [0, 3, 3], [3, 0, 3]])
    scales = np.array([1.0, 0.6, 1.4, 0.8]) * overlap
    parts = []
    for c, s in zip(centers, scales):
        A = rng.normal(size=(3, 3)) * 0.3 + np.eye(3)
        parts.append(c + s * rng.normal(size=(n // 4, 3)) @ A)
    return np.concatenate(parts)


def set_from_sklearn(g: GaussianMixture, sk: SkGaussianMixture, X) -> None:
    g.fit(X[:50])  # any fit, then overwrite the parameters
    g.weights_ = torch.tensor(sk.weights_)
    g.means_ = torch.tensor(sk.means_)
    g._set_covariances(torch.tensor(sk.covariances_))


@pytest.mark.parametrize("cov", TYPES)
def test_score_matches_sklearn_for_same_parameters(cov):
    X = blobs()
    sk = SkGaussianMixture(4, covariance_type=cov, random_state=1, max_iter=5).fit(X)
    g = GaussianMixture(4, covariance_type=cov, max_iter=1)
    set_from_sklearn(g, sk, X)
    assert abs(g.score(X) - sk.score(X)) < 1e-8
    np.testing.assert_allclose(g.score_samples(X).numpy(), sk.score_samples(X), atol=1e-8)
    np.testing.assert_allclose(g.predict_proba(X).numpy(), sk.predict_proba(X), atol=1e-8)
    assert (g.predict(X).numpy() == sk.predict(X)).all()
    np.testing.assert_allclose(g.precisions_cholesky_.numpy(), sk.precisions_cholesky_,
                               rtol=1e-10, atol=1e-12)
    assert abs(g.bic(X) - sk.bic(X)) < 1e-6 and abs(g.aic(X) - sk.aic(X)) < 1e-6


@pytest.mark.parametrize("cov", TYPES)
def test_em_reaches_sklearn_optimum_from_same_start(cov):
    X = blobs(overlap=1.3, seed=2)
    rng = np.random.default_rng(3)
    init = dict(
        means_init=X[rng.choice(len(X), 4, replace=False)],
        weights_init=np.full(4, 0.25),
        precisions_init={"full": np.stack([np.eye(3)] * 4), "diag": np.ones((4, 3)),
                         "spherical": np.ones(4)}[cov],
    )
    kw = dict(covariance_type=cov, tol=1e-10, max_iter=1000, reg_covar=1e-6)
    sk = SkGaussianMixture(4, random_state=0, **init, **kw).fit(X)
    g = GaussianMixture(4, random_state=0, **init, **kw).fit(X)
    assert sk.converged_ and g.converged_
    assert abs(g.score(X) - sk.score(X)) < 1e-4
    # the same start gives the same EM trajectory: scikit-learn's lower bound after 3 iterations
    sk3 = SkGaussianMixture(4, random_state=0, **init, **{**kw, "max_iter": 3, "tol": 0})
    g3 = GaussianMixture(4, random_state=0, **init, **{**kw, "max_iter": 3, "tol": 0})
    assert abs(g3.fit(X).log_likelihood_history_[-1] - sk3.fit(X).lower_bound_) < 1e-8


@pytest.mark.parametrize("cov", TYPES)
def test_log_likelihood_never_decreases_without_regularisation(cov):
    X = blobs(overlap=1.5, seed=4)
    g = GaussianMixture(6, covariance_type=cov, reg_covar=0.0, tol=0.0, max_iter=60,
                        random_state=0).fit(X)
    hist = np.array(g.log_likelihood_history_)
    assert len(hist) == 60
    assert np.diff(hist).min() >= -1e-10 * np.abs(hist).max()
    assert hist[-1] > hist[0] + 1e-3  # it did move


def test_streaming_chunks_and_callable_source_give_the_same_fit():
    X = torch.tensor(blobs(seed=5))
    kw = dict(covariance_type="full", tol=0.0, max_iter=10, random_state=0, init_max_samples=400)
    one = GaussianMixture(4, **kw).fit(X)
    chunked = GaussianMixture(4, chunk_size=37, **kw).fit(X)
    streamed = GaussianMixture(4, **kw).fit(lambda: iter(X.split(53)))
    for other in (chunked, streamed):
        torch.testing.assert_close(other.means_, one.means_, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other.covariances_, one.covariances_, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(other.log_likelihood_history_, one.log_likelihood_history_,
                                   rtol=1e-12)


def test_statistics_sum_over_chunks_equals_statistics_of_all_rows():
    X = torch.tensor(blobs(seed=6))
    g = GaussianMixture(4, covariance_type="diag", max_iter=2).fit(X)
    whole = g.sufficient_statistics(X)
    parts = g.sufficient_statistics(X[:150]) + g.sufficient_statistics(X[150:])
    for a, b in zip(whole.tensors(), parts.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


def test_dtype_and_device_follow_the_input():
    X32 = torch.tensor(blobs(), dtype=torch.float32)
    assert GaussianMixture(2, max_iter=2).fit(X32).means_.dtype == torch.float64
    g = GaussianMixture(2, max_iter=2, dtype=None).fit(X32)
    assert g.means_.dtype == torch.float32 and g.predict_proba(X32).dtype == torch.float32


def test_sample_has_the_mixture_moments():
    X = blobs()
    g = GaussianMixture(4, covariance_type="full", random_state=0).fit(X)
    S, labels = g.sample(40_000, generator=torch.Generator().manual_seed(0))
    mean = (g.weights_[:, None] * g.means_).sum(0)
    assert S.shape == (40_000, 3) and labels.shape == (40_000,)
    torch.testing.assert_close(S.mean(0), mean, atol=0.05, rtol=0)
    second = sum(w * (c + m[:, None] * m[None]) for w, c, m in
                 zip(g.weights_, g.covariances_, g.means_)) - mean[:, None] * mean[None]
    torch.testing.assert_close(torch.cov(S.T), second, atol=0.1, rtol=0)


def test_kmeans_init_recovers_separated_clusters():
    X = torch.tensor(blobs(overlap=0.2, seed=7))
    gen = torch.Generator().manual_seed(0)
    seeds = kmeans_plusplus(X, 4, gen)
    assert all((X == s).all(1).any() for s in seeds)  # k-means++ picks data rows
    centers, labels = kmeans(X, 4, gen)
    assert sorted(torch.bincount(labels).tolist()) == [100, 100, 100, 100]


def test_bad_input_gives_clear_errors():
    X = blobs()
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(2).fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        GaussianMixture(2).fit(X[:, 0])
    with pytest.raises(ValueError, match="n_components=5"):
        GaussianMixture(5).fit(X[:4])
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(2, covariance_type="tied")
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixture(2, reg_covar=-1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianMixture(2).predict(X)
    g = GaussianMixture(2, max_iter=2).fit(X)
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        g.predict(X[:, :2])
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        GaussianMixture(2).fit("data.csv")


def test_ill_defined_covariance_is_reported():
    X = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 2.0]]), 10, axis=0)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(3, covariance_type="full", reg_covar=0.0).fit(X)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(3, covariance_type="diag", reg_covar=0.0).fit(X)
    GaussianMixture(3, covariance_type="full", reg_covar=1e-3).fit(X)  # regularised: fine


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_matches_cpu_fit():
    X = torch.tensor(blobs(seed=8))
    kw = dict(covariance_type="diag", tol=0.0, max_iter=10, means_init=X[:4].numpy())
    cpu = GaussianMixture(4, **kw).fit(X)
    gpu = GaussianMixture(4, **kw).fit(X.cuda())
    assert gpu.means_.device.type == "cuda"
    torch.testing.assert_close(gpu.means_.cpu(), cpu.means_, rtol=1e-9, atol=1e-9)
    assert abs(gpu.score(X.cuda()) - cpu.score(X)) < 1e-9
