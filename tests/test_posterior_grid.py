"""The exact-posterior grid of the VAE benchmark's NUTS check (``benchmarks/vae_mnist.py``)
against the closed form of a linear-Gaussian model, p(x) = N(x; b, A Aᵀ + σ² I)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyro.distributions as dist
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    if str(ROOT / "benchmarks") not in sys.path:  # the script imports its sibling _results
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_vae_mnist",
                                                  ROOT / "benchmarks" / "vae_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
