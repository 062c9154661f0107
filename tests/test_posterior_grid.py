"""The exact-posterior grid of the VAE benchmark's NUTS check (``benchmarks/vae_mnist.py``)
against the closed form of a linear-Gaussian model, p(x) = N(x; b, A Aᵀ + σ² I)."""

from __future__ import annotations

from pathlib import Path

import pyro.distributions as dist
import torch

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_benchmark("vae_mnist")


class LinearGaussian:
    def __init__(self, A, b, sigma):
        self.A, self.b, self.sigma = A, b, sigma

    def observation(self, z):
        return dist.Normal(z @ self.A.T + self.b, self.sigma).to_event(1)


def test_grid_log_px_and_draws_match_the_closed_form():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 2, generator=g) * 2.0
    b = torch.randn(6, generator=g)
    sigma = 0.3  # a posterior much narrower than the coarse cells: the refinement matters
    model = LinearGaussian(A, b, sigma)
    x = (torch.randn(2, generator=g) @ A.T + b + sigma * torch.randn(6, generator=g))[None]
    cov = A @ A.T + sigma**2 * torch.eye(6)
    exact = float(dist.MultivariateNormal(b, cov).log_prob(x[0]))
    grid = _bench().grid_posterior(model, x, n=101, refine=8, draws=4000, seed=1)
    assert abs(grid["log_px"] - exact) < 1e-3
    # posterior N(m, S): S = (I + AᵀA/σ²)⁻¹, m = S Aᵀ (x − b)/σ²
    S = torch.linalg.inv(torch.eye(2) + A.T @ A / sigma**2)
    m = S @ A.T @ (x[0] - b) / sigma**2
    draws = grid["samples"]
    se = S.diagonal().sqrt() / 4000**0.5
    assert ((draws.mean(0) - m).abs() < 4 * se + 1e-3).all()
    assert torch.allclose(torch.cov(draws.T), S, rtol=0.15, atol=1e-4)


def test_grid_widens_its_box_when_the_posterior_sits_outside_it():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 2, generator=g)
    b = torch.zeros(6)
    sigma = 0.1
    model = LinearGaussian(A, b, sigma)
    x = (torch.tensor([7.0, -1.0]) @ A.T)[None]  # posterior mean near (7, -1): outside [-5, 5]²
    exact = float(dist.MultivariateNormal(b, A @ A.T + sigma**2 * torch.eye(6)).log_prob(x[0]))
    grid = _bench().grid_posterior(model, x, n=101, refine=8, draws=2000, seed=0)
    assert grid["lim"] > 7.0
    assert abs(grid["log_px"] - exact) < 1e-2
    assert abs(float(grid["samples"][:, 0].mean()) - 7.0) < 0.1


class Squared:
    """x ~ N(z₁², σ): a posterior with two mirror modes z₁ = ±√x of equal mass."""

    def observation(self, z):
        return dist.Normal(z[..., :1] ** 2, 0.1).to_event(1)


def test_grid_draws_weigh_both_modes_of_a_bimodal_posterior():
    draws = _bench().grid_posterior(Squared(), torch.tensor([[2.0]]), n=101, draws=4000,
                                    seed=0)["samples"][:, 0]
    assert (draws.abs() > 0.5).all()  # no mass between the modes
    share = float((draws > 0).double().mean())
    assert abs(share - 0.5) < 4 * (0.25 / 4000) ** 0.5


# the energy distance the check reports: tests/test_posterior_check.py
