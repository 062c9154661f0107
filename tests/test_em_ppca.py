"""PPCA (pyro_seqlatent.em) against Tipping & Bishop's closed form and dense Gaussians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA

from pyro_seqlatent.em import PPCA


def ppca_data(N=400, D=8, q=2, seed=0, missing=0.0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, q)) * np.linspace(3, 2, q)
    X = rng.normal(size=(N, q)) @ W.T + 0.5 * rng.normal(size=(N, D)) + rng.normal(size=D)
    if missing:
        X[rng.random(X.shape) < missing] = np.nan
    return X


def closed_form_loglik(X, q):
    """Tipping & Bishop maximum log-likelihood per sample from the ddof=0 covariance."""
    N, D = X.shape
    lam = np.sort(np.linalg.eigvalsh(np.cov(X.T, ddof=0)))[::-1]
    s2 = lam[q:].mean()
    return -0.5 * (D * np.log(2 * np.pi) + np.log(lam[:q]).sum() + (D - q) * np.log(s2) + D)


def test_em_reaches_the_tipping_bishop_closed_form():
    X = ppca_data()
    p = PPCA(2, tol=1e-11, max_iter=3000, init="pca", random_state=0).fit(X)
    best = closed_form_loglik(X, 2)
    assert abs(p.score(X) - best) < 1e-6
    assert abs(PPCA(2).fit_closed_form(X).score(X) - best) < 1e-10
    sk = PCA(2).fit(X).score(X)  # ddof = 1: slightly below the optimum (a loose cross-check)
    assert sk <= best + 1e-12 and best - sk < 1e-3
    hist = np.diff(p.log_likelihood_history_)
    assert hist.min() >= -1e-11


def test_score_samples_equals_dense_gaussian_on_observed_entries():
    X = ppca_data(N=30, missing=0.3, seed=1)
    p = PPCA(2, max_iter=5, random_state=0).fit(X)
    C = p.covariance().numpy()
    mu = p.mean_.numpy()
    got = p.score_samples(X).numpy()
    for n in range(len(X)):
        o = ~np.isnan(X[n])
        want = multivariate_normal(mu[o], C[np.ix_(o, o)]).logpdf(X[n, o]) if o.any() else 0.0
        assert abs(got[n] - want) < 1e-10


def test_missing_value_em_is_monotone_and_stationary():
    X = ppca_data(N=120, D=6, missing=0.25, seed=2)
    p = PPCA(2, tol=1e-12, max_iter=4000, random_state=0).fit(X)
    hist = np.array(p.log_likelihood_history_)
    assert np.diff(hist).min() >= -1e-11 and hist[-1] > hist[0] + 0.1
    # at the fixed point the gradient of the observed-data log-likelihood vanishes
    W = p.components_.clone().requires_grad_(True)
    mu = p.mean_.clone().requires_grad_(True)
    log_s2 = p.noise_variance_.log().clone().requires_grad_(True)
    Xt = torch.tensor(X)
    total = 0.0
    for n in range(len(X)):
        o = ~torch.isnan(Xt[n])
        C = W[o] @ W[o].T + log_s2.exp() * torch.eye(int(o.sum()), dtype=torch.float64)
        total = total + torch.distributions.MultivariateNormal(mu[o], C).log_prob(Xt[n, o])
    grads = torch.autograd.grad(total / len(X), (W, mu, log_s2))
    assert max(float(g.abs().max()) for g in grads) < 1e-4


def test_transform_and_impute_condition_the_gaussian():
    X = ppca_data(N=20, missing=0.3, seed=3)
    p = PPCA(2, max_iter=20, random_state=0).fit(X)
    W, mu, C = p.components_.numpy(), p.mean_.numpy(), p.covariance().numpy()
    Z, Xi = p.transform(X).numpy(), p.impute(X).numpy()
    for n in range(len(X)):
        o = ~np.isnan(X[n])
        gain = np.linalg.solve(C[np.ix_(o, o)], X[n, o] - mu[o])
        np.testing.assert_allclose(Z[n], W[o].T @ gain, atol=1e-10)
        np.testing.assert_allclose(Xi[n, ~o], mu[~o] + C[np.ix_(~o, o)] @ gain, atol=1e-10)
        np.testing.assert_array_equal(Xi[n, o], X[n, o])


def test_chunked_fit_equals_one_chunk_fit_and_follows_dtype():
    X = torch.tensor(ppca_data(N=120, missing=0.1, seed=4))
    a = PPCA(2, max_iter=15, tol=0, random_state=0).fit(X)
    b = PPCA(2, max_iter=15, tol=0, random_state=0, chunk_size=17).fit(X)
    np.testing.assert_allclose(a.log_likelihood_history_, b.log_likelihood_history_, rtol=1e-12)
    c = PPCA(2, max_iter=3, dtype=None).fit(X.float())
    assert c.components_.dtype == torch.float32


def test_bad_input_gives_clear_errors():
    X = ppca_data()
    with pytest.raises(ValueError, match="n_components=8 must be <"):
        PPCA(8).fit(X)
    bad = X.copy()
    bad[:, 3] = np.nan
    with pytest.raises(ValueError, match=r"feature\(s\) \[3\] have no observed value"):
        PPCA(2).fit(bad)
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="inf"):
        PPCA(2).fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        PPCA(2).fit(X[0])
    with pytest.raises(RuntimeError, match="not fitted"):
        PPCA(2).score(X)
