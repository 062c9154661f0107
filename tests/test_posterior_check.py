"""posterior_check: the guide's draws against NUTS on conjugate models (issue 27 item 5)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_seqlatent.infer import posterior_check
from pyro_seqlatent.infer.posterior_check import energy_distance

D, N, SIGMA, PRIOR = 2, 10, 0.6, 1.0


def data():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, D, generator=g)
    X = base + 0.7 * base[:, :1]  # a correlated posterior
    y = X @ torch.tensor([0.8, -0.5]) + SIGMA * torch.randn(N, generator=g)
    return X, y


def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(D), PRIOR).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), SIGMA), obs=y)


def posterior(X, y):
    precision = torch.eye(D) / PRIOR**2 + X.T @ X / SIGMA**2
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / SIGMA**2, cov


def exact_guide(X, y):
    m, cov = posterior(X, y)
    pyro.sample("w", dist.MultivariateNormal(m, cov))


def wrong_guide(X, y):
    """Mean-field, shifted by one posterior standard deviation in w[0]."""
    m, cov = posterior(X, y)
    sd = cov.diagonal().sqrt()
    pyro.sample("w", dist.Normal(m + torch.tensor([1.0, 0.0]) * sd, sd).to_event(1))


NUTS_SMALL = {"num_draws": 300, "warmup_steps": 200, "num_particles": 2000}


def test_exact_guide_is_within_the_noise_floor_and_a_wrong_one_is_not(tmp_path):
    X, y = data()
    m, cov = posterior(X, y)
    pyro.set_rng_seed(0)
    good = posterior_check(regression, exact_guide, (X, y), figure=tmp_path / "good.png",
                           **NUTS_SMALL)
    assert good.names == ["w[0]", "w[1]"]
    assert good.nuts_draws.shape == (300, 2) and good.guide_draws.shape == (300, 2)
    assert good.floor_method == "permutation" and good.noise_floor > 0
    assert good.within_floor, good.summary()
    assert abs(good.evidence_gap) < 1e-4  # the exact posterior: every weight is log p(y)
    sd = cov.diagonal().sqrt()
    assert ((good.nuts_mean.float() - m).abs() < 0.3 * sd).all()  # NUTS found the posterior
    assert ((good.nuts_std.float() / sd - 1).abs() < 0.25).all()
    assert (tmp_path / "good.png").stat().st_size > 10_000

    pyro.set_rng_seed(0)
    bad = posterior_check(regression, wrong_guide, (X, y), **NUTS_SMALL)
    assert not bad.within_floor, bad.summary()
    assert bad.energy_distance > 3 * bad.noise_floor
    assert bad.evidence_gap > 0.3  # KL(q || p): 0.5 from the shift, more from mean-field
    assert (bad.guide_mean[0] - bad.nuts_mean[0]) > 0.6 * sd[0]


def test_halves_floor_and_standardized_distance():
    X, y = data()
    pyro.set_rng_seed(1)
    res = posterior_check(regression, exact_guide, (X, y), num_draws=100, warmup_steps=100,
                          num_chains=2, guide_draws=400, floor="halves", standardize=True,
                          num_particles=10)
    assert res.floor_method == "halves" and res.standardized
    assert res.guide_draws.shape == (400, 2) and res.nuts_draws.shape == (200, 2)
    # the halves floor is the distance between the two chains: one noisy value near 0
    assert abs(res.noise_floor) < 0.1
    assert abs(res.energy_distance) < 0.1


def test_mixed_model_global_and_local_latents():
    """μ ~ N(0, 1), z_n ~ N(μ, 1), x_n ~ N(z_n, s²) with its exact joint posterior guide."""
    s = 0.7
    x = torch.tensor([-0.5, 0.3, 1.2, 2.0])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu * torch.ones_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, s), obs=x)

    def guide(x):
        prec = 1.0 + len(x) / (1.0 + s**2)
        mu = pyro.sample("mu", dist.Normal(x.sum() / (1.0 + s**2) / prec, prec**-0.5))
        with pyro.plate("data", len(x)):
            p = 1.0 + 1.0 / s**2
            pyro.sample("z", dist.Normal((mu + x / s**2) / p, p**-0.5))

    pyro.set_rng_seed(0)
    res = posterior_check(model, guide, x, num_draws=300, warmup_steps=200, num_particles=100)
    assert res.names == ["mu", "z[0]", "z[1]", "z[2]", "z[3]"]
    assert res.khat == float("-inf")  # whole-batch evidence, equal weights
    assert abs(res.evidence_gap) < 1e-4
    assert res.within_floor, res.summary()


def test_refuses_discrete_and_too_large_latents_naming_the_argument():
    def discrete(x):
        k = pyro.sample("k", dist.Bernoulli(0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    with pytest.raises(ValueError, match="'k' is discrete.*argument `model`"):
        posterior_check(discrete, discrete, torch.zeros(3))
    X, y = data()
    with pytest.raises(ValueError, match="2 coordinates .* max_latent_dim=1"):
        posterior_check(regression, exact_guide, (X, y), max_latent_dim=1)
    with pytest.raises(ValueError, match="floor must be one of"):
        posterior_check(regression, exact_guide, (X, y), floor="bootstrap")
    with pytest.raises(TypeError, match="guide must be callable"):
        posterior_check(regression, None, (X, y))


def test_energy_distance_is_unbiased_and_detects_a_shift():
    g = torch.Generator().manual_seed(0)
    same = torch.tensor([energy_distance(torch.randn(10, 2, generator=g),
                                         torch.randn(10, 2, generator=g)) for _ in range(400)])
    assert abs(float(same.mean())) < 4 * float(same.std()) / 400**0.5
    shifted = energy_distance(torch.randn(500, 2, generator=g),
                              torch.randn(500, 2, generator=g) + 1.0)
    assert shifted > 0.3
