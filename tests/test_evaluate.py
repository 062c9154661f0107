"""log_marginal / ELBO against exact answers on tractable models."""

import math

import pytest
import torch

from pyro_seqlatent.infer import log_marginal
from pyro_seqlatent.models.conjugate import (
    AffineNormalGuide,
    LinearGaussian,
    LinearGaussianGuide,
    NormalNormal,
)


def analytic_elbo(model: NormalNormal, guide: AffineNormalGuide, x):
    """Closed-form E_q[log p(x|z) + log p(z) - log q(z)] for Gaussian q = N(m, s²)."""
    m = guide.a.detach() * x + guide.b.detach()
    s2 = guide.log_scale.detach().exp() ** 2
    n2 = model.noise.detach() ** 2
    p2 = model.prior_scale**2
    loglik = -0.5 * math.log(2 * math.pi) - 0.5 * n2.log() - ((x - m) ** 2 + s2) / (2 * n2)
    logprior = -0.5 * math.log(2 * math.pi * p2) - (m**2 + s2) / (2 * p2)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * s2)
    return loglik + logprior + entropy


def test_elbo_estimate_matches_closed_form_and_is_below_exact():
    model = NormalNormal(noise=0.5)
    guide = AffineNormalGuide(a=0.3, b=0.2, log_scale=-0.2)
    x = torch.linspace(-2, 2, 7)
    est = log_marginal(model, guide, x, num_samples=20000, chunk_size=5000)
    exact_elbo = analytic_elbo(model, guide, x)
    exact_ll = model.exact_log_marginal(x)
    # Monte Carlo ELBO within 4 standard errors of the closed form: log w = a + b ε + c ε² with
    # ε ~ N(0, 1), so Var log w = b² + 2c² is known; b, c from the Gaussian algebra.
    m = guide.a.detach() * x + guide.b.detach()
    s = guide.log_scale.detach().exp()
    n2, p2 = model.noise.detach() ** 2, model.prior_scale**2
    b = s * (x - m) / n2 - s * m / p2
    c = -(s**2) / (2 * n2) - s**2 / (2 * p2) + 0.5
    sem = (b**2 + 2 * c**2).sqrt() / math.sqrt(20000)
    assert ((est.elbo - exact_elbo).abs() < 4 * sem).all()
    assert (exact_elbo < exact_ll - 1e-3).all()
    # the IWAE bound with K = 20000 lies between the ELBO and the exact log-likelihood
    assert (est.log_marginal > exact_elbo).all()
    assert (est.log_marginal < exact_ll + 0.05).all()  # an estimate: noisy, but not far above


def test_exact_posterior_gives_exact_log_likelihood():
    model = NormalNormal(noise=0.7)
    guide = AffineNormalGuide.exact_for(model)
    x = torch.randn(5) * 2
    est = log_marginal(model, guide, x, num_samples=16)
    exact = model.exact_log_marginal(x)
    assert torch.allclose(est.elbo, exact, atol=1e-5)
    assert torch.allclose(est.log_marginal, exact, atol=1e-5)
    assert torch.allclose(est.ess, torch.full_like(est.ess, 16.0), atol=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_iwae_converges_to_exact_as_k_grows(chunk_size):
    model = NormalNormal(noise=0.5)
    guide = AffineNormalGuide(a=0.5, b=0.3, log_scale=0.1)  # a poor proposal
    x = torch.linspace(-2.0, 2.0, 200)
    exact = model.exact_log_marginal(x)
    gaps = []
    for k in (1, 10, 100, 2000):
        est = log_marginal(model, guide, x, num_samples=k, chunk_size=chunk_size)
        gaps.append((exact - est.log_marginal).mean().item())
    assert gaps[0] > 0.1  # K = 1 is the ELBO: clearly below
    assert gaps[0] > gaps[1] > gaps[2]
    assert abs(gaps[3]) < 0.02


def _linear_gaussian(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 2, generator=g, dtype=dtype)
    mu = torch.randn(4, generator=g, dtype=dtype)
    model = LinearGaussian(W, mu, noise_var=0.3)
    x = (torch.randn(6, 2, generator=g, dtype=dtype) @ W.T + mu
         + 0.3**0.5 * torch.randn(6, 4, generator=g, dtype=dtype))
    return model, x


def test_linear_gaussian_exact_guide_and_bound():
    model, x = _linear_gaussian()
    exact = model.exact_log_marginal(x)
    guide = LinearGaussianGuide(4, 2).double().set_exact(model)
    est = log_marginal(model, guide, x, num_samples=8)
    assert torch.allclose(est.elbo, exact, atol=1e-8)
    assert torch.allclose(est.log_marginal, exact, atol=1e-8)

    poor = LinearGaussianGuide(4, 2).double()  # q(z|x) = N(0, softplus(0)² I): not the posterior
    est1 = log_marginal(model, poor, x, num_samples=4000, chunk_size=1000)
    assert (est1.elbo < exact - 0.05).all()
    est2 = log_marginal(model, poor, x, num_samples=20000, chunk_size=5000)
    assert (est2.log_marginal > est1.elbo).all()
    assert (exact - est2.log_marginal).abs().max() < 0.05


def test_global_latent_must_be_point_estimate():
    import pyro
    import pyro.distributions as dist
    from torch import nn

    class Model(nn.Module):
        def forward(self, x):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[-1]):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    class NormalGuide(nn.Module):
        def forward(self, x):
            pyro.sample("mu", dist.Normal(0.0, 1.0))

    class DeltaGuide(nn.Module):
        def forward(self, x):
            pyro.sample("mu", dist.Delta(torch.tensor(0.5)))

    x = torch.randn(3)
    # a distribution outside the plate: the evidence of the whole batch (tests/test_evidence.py)
    joint = log_marginal(Model(), NormalGuide(), x, num_samples=4)
    assert joint.kind == "whole_batch" and joint.log_marginal.shape == ()
    est = log_marginal(Model(), DeltaGuide(), x, num_samples=4)
    assert est.kind == "per_point" and est.khat is None
    expected = dist.Normal(0.5, 1.0).log_prob(x)
    assert torch.allclose(est.log_marginal, expected, atol=1e-6)
    with pytest.raises(ValueError, match="no vectorized plate named 'batch'"):
        log_marginal(Model(), DeltaGuide(), x, num_samples=4, batch_plate="batch")


def test_random_subsample_scores_the_same_points_in_every_chunk():
    import pyro
    import pyro.distributions as dist
    from torch import nn

    data = torch.linspace(-1.5, 1.5, 6)
    model = NormalNormal(noise=0.6)
    exact = AffineNormalGuide.exact_for(model)

    class Sub(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with pyro.plate("data", 6, subsample_size=3) as idx:
                if isinstance(self.inner, NormalNormal):
                    z = pyro.sample("z", dist.Normal(0.0, 1.0))
                    pyro.sample("x", dist.Normal(z, self.inner.noise), obs=x[idx])
                else:
                    pyro.sample("z", dist.Normal(self.inner.a * x[idx] + self.inner.b,
                                                 self.inner.log_scale.exp()))

    est = log_marginal(Sub(model), Sub(exact), data, num_samples=12, chunk_size=4)
    # exact posterior: every weight is log p(x_n) for the same three points -> ESS = K
    assert torch.allclose(est.ess, torch.full_like(est.ess, 12.0), atol=1e-3)
    assert torch.isclose(model.exact_log_marginal(data)[None, :], est.log_marginal[:, None],
                         atol=1e-5).any(1).all()


def test_guide_only_site_is_refused():
    import pyro
    import pyro.distributions as dist

    model = NormalNormal()
    exact = AffineNormalGuide.exact_for(model)

    def guide(x):
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(exact.a * x + exact.b, exact.log_scale.exp()))
            pyro.sample("u", dist.Normal(torch.zeros_like(x), 1.0))

    with pytest.raises(ValueError, match="not in the model"):
        log_marginal(model, guide, torch.randn(2), num_samples=3)


def test_masked_sites_leave_padded_entries_out():
    import pyro
    import pyro.distributions as dist

    x = torch.tensor([[0.3, -1.0, 5.0], [1.2, 0.0, -7.0]])  # last column is padding
    mask = torch.tensor([[True, True, False], [True, True, False]])

    def model(x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z[..., None], 0.5).mask(mask).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(x[..., :2].mean(-1) * 0.5, 0.7))

    padded = log_marginal(model, guide, x, num_samples=3000, chunk_size=1000).log_marginal
    x2 = x.clone()
    x2[:, 2] = 123.0
    pyro.set_rng_seed(0)
    a = log_marginal(model, guide, x, num_samples=50).log_marginal
    pyro.set_rng_seed(0)
    b = log_marginal(model, guide, x2, num_samples=50).log_marginal
    assert torch.equal(a, b)  # padded values do not matter
    # the exact marginal of the two observed entries: N(0, 0.25 I + 11ᵀ)
    cov = 0.25 * torch.eye(2) + torch.ones(2, 2)
    exact = dist.MultivariateNormal(torch.zeros(2), cov).log_prob(x[:, :2])
    assert torch.allclose(padded, exact, atol=0.03)


def test_evaluate_does_not_depend_on_the_progress_bar():
    from pyro_seqlatent.infer import evaluate

    torch.manual_seed(0)
    data = list(torch.randn(30))
    model, guide = NormalNormal(), AffineNormalGuide()
    quiet = evaluate(model, guide, data, num_samples=4, batch_size=7, seed=5)
    shown = evaluate(model, guide, data, num_samples=4, batch_size=7, seed=5, progress=True)
    assert quiet["log_marginal"] == shown["log_marginal"] and quiet["elbo"] == shown["elbo"]
