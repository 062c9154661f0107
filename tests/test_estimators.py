"""Gradient estimators against closed-form gradients of conjugate models.

The yardstick: for z ~ N(0, s0²), x | z ~ N(z, σ²) and q(z | x) = N(a x + b, s²) the ELBO is a
closed-form function of (σ, a, b, s) (``exact_elbo``), so autograd gives ∇ELBO exactly; the same
holds for a 2-D linear-Gaussian model and a flow guide made of an *affine* coupling (q stays
Gaussian with known mean and covariance). Every single-sample estimator's mean over independent
draws must lie within 4 standard errors of it, coordinate by coordinate.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_seqlatent.guides import FlowGuide
from pyro_seqlatent.infer.estimators import (
    ESTIMATORS,
    as_score_function,
    cache_free_log_prob,
    gradient_stats,
    make_estimator,
    score_function,
)
from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal
from pyro_seqlatent.transforms import ConditionedCoupling, soft_clamp

# estimators of the ELBO from one draw; the "discrete" ones equal Trace_ELBO on these models
SINGLE = [n for n, s in ESTIMATORS.items() if not s.multi_sample and s.sites != "discrete"]
# the multi-sample bounds at K = 1 are the ELBO itself
SINGLE_AND_K1 = SINGLE + ["iwae", "dreg"]


def exact_elbo_normal(model: NormalNormal, guide: AffineNormalGuide, x):
    s0, sig = model.prior_scale, model.noise
    m, s = guide.a * x + guide.b, guide.log_scale.exp()
    e = (-0.5 * math.log(2 * math.pi * s0**2) - (m**2 + s**2) / (2 * s0**2)
         - 0.5 * torch.log(2 * math.pi * sig**2) - ((x - m) ** 2 + s**2) / (2 * sig**2)
         + 0.5 * torch.log(2 * math.pi * math.e * s**2))
    return e.sum()


class LinearGaussian2(nn.Module):
    """z ~ N(0, I_2), x | z ~ N(W z + mu, e^{2 log_std} I_3) with learnable W, mu, log_std."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0]]))
        self.mu = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        self.log_std = nn.Parameter(torch.tensor(-0.3))

    def forward(self, x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, self.log_std.exp()).to_event(1),
                        obs=x)


class _CachedScoreFunction(dist.TransformedDistribution):
    """The naive score-function flow site: sampled without gradients, scored through the
    transform's cache at the detached base point."""

    has_rsample = False


class AffineCouplingGuide(nn.Module):
    """q: N(A x + c, diag e^{2 log_s}) pushed through the coupling of ``transforms``
    y_1 = x_1, y_2 = x_2 e^{s} + w x_1 + t0 (affine, so q is Gaussian). ``naive=True`` forces the
    score function while log q is read from the cache at the detached base point."""

    def __init__(self, naive: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.3, -0.2, 0.1], [0.1, 0.4, -0.3]]))
        self.c = nn.Parameter(torch.tensor([0.2, -0.1]))
        self.log_s = nn.Parameter(torch.tensor([-0.4, -0.2]))
        self.w = nn.Parameter(torch.tensor([0.3]))
        self.t0 = nn.Parameter(torch.tensor([0.1]))
        self.s0 = nn.Parameter(torch.tensor([0.2]))
        self.naive = naive

    def flow(self):
        return ConditionedCoupling(torch.tensor([True, False]),
                                   lambda xa: (xa * self.w + self.t0, self.s0.expand_as(xa)))

    def forward(self, x):
        with pyro.plate("data", x.shape[-2]):
            base = dist.Normal(x @ self.A.T + self.c, self.log_s.exp()).to_event(1)
            cls = _CachedScoreFunction if self.naive else dist.TransformedDistribution
            return pyro.sample("z", cls(base, [self.flow()]))

    def gaussian(self, x):
        s = soft_clamp(self.s0)[0]
        zero = torch.zeros(())
        M = torch.stack([torch.stack([zero + 1.0, zero]), torch.stack([self.w[0], s.exp()])])
        mean = (x @ self.A.T + self.c) @ M.T + torch.stack([zero, self.t0[0]])
        cov = M @ torch.diag(torch.exp(2 * self.log_s)) @ M.T
        return mean, cov


def exact_elbo_linear(model: LinearGaussian2, guide: AffineCouplingGuide, x):
    m, C = guide.gaussian(x)
    psi = torch.exp(2 * model.log_std)
    resid = x - m @ model.W.T - model.mu
    e = (-math.log(2 * math.pi) - 0.5 * ((m**2).sum(-1) + torch.trace(C))
         - 1.5 * torch.log(2 * math.pi * psi)
         - ((resid**2).sum(-1) + torch.trace(model.W @ C @ model.W.T)) / (2 * psi)
         + 0.5 * torch.logdet(2 * math.pi * math.e * C))
    return e.sum()


def _params(model, guide):
    return list(model.parameters()) + list(guide.parameters())


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _within(stats, analytic, tol=4.0):
    """Coordinates of model then guide parameters: mean gradient vs analytic gradient."""
    mean = torch.cat([stats.groups["model"].mean, stats.groups["guide"].mean])
    sem = torch.cat([stats.groups["model"].sem, stats.groups["guide"].sem])
    z = (mean - analytic).abs() / sem.clamp_min(1e-12)
    return z, mean, sem


def _normal_normal():
    model = NormalNormal(1.0, 0.5, learn_noise=True)
    guide = AffineNormalGuide(0.3, 0.2, -0.5)
    x = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 1.2
    return model, guide, x


def _linear_flow(naive=False):
    model, guide = LinearGaussian2(), AffineCouplingGuide(naive)
    z = torch.randn(30, 2, generator=torch.Generator().manual_seed(2))
    x = z @ model.W.detach().T + model.mu.detach() + 0.7 * torch.randn(
        30, 3, generator=torch.Generator().manual_seed(3))
    return model, guide, x


@pytest.mark.parametrize("case,exact", [("normal", exact_elbo_normal),
                                        ("flow", exact_elbo_linear)])
def test_single_sample_estimators_are_unbiased(case, exact):
    model, guide, x = _normal_normal() if case == "normal" else _linear_flow()
    analytic = _flat(torch.autograd.grad(-exact(model, guide, x), _params(model, guide)))
    for name in SINGLE_AND_K1:
        est = make_estimator(name, 1)
        stats = gradient_stats(model, guide, x, est, 100, seed=10)
        z, mean, sem = _within(stats, analytic)
        assert z.max() < 4.0, (name, case, mean, analytic, sem)
        loss_sem = stats.loss_std / math.sqrt(100)
        assert abs(stats.loss_mean + exact(model, guide, x).item()) < 4 * loss_sem, name


def test_flow_score_function_without_cache_free_log_q_is_biased():
    """Negative control: scoring the cached, detached base point (has_rsample_(False) on the
    base of a flow) gives a biased gradient that the 4-SE test detects."""
    model, guide, x = _linear_flow(naive=True)
    analytic = _flat(torch.autograd.grad(-exact_elbo_linear(model, guide, x),
                                         _params(model, guide)))
    stats = gradient_stats(model, guide, x, Trace_ELBO(), 150, seed=10)
    z, _, _ = _within(stats, analytic)
    assert z.max() > 8.0
    # the same guide under the handler (cache-free log q) is unbiased
    guide.naive = False
    stats = gradient_stats(model, guide, x, make_estimator("score"), 150, seed=10)
    assert _within(stats, analytic)[0].max() < 4.0


def test_nonlinear_flow_guide_score_stl_dreg_agree_with_reparam():
    """A planar FlowGuide (no closed form): every estimator's mean matches the pathwise one."""
    model = LinearGaussian2()
    site = FlowGuide(3, 2, flow="planar", num_flows=2)

    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.site = site

        def forward(self, x):
            with pyro.plate("data", x.shape[-2]):
                return self.site.sample("z", x)

    guide = Guide()
    _, _, x = _linear_flow()
    ref = gradient_stats(model, guide, x, make_estimator("reparam"), 100, seed=1)
    ref_mean = torch.cat([ref.groups["model"].mean, ref.groups["guide"].mean])
    ref_sem = torch.cat([ref.groups["model"].sem, ref.groups["guide"].sem])
    for name in ("score", "stl", "dreg"):
        stats = gradient_stats(model, guide, x, make_estimator(name, 1), 100, seed=2)
        mean = torch.cat([stats.groups["model"].mean, stats.groups["guide"].mean])
        sem = torch.cat([stats.groups["model"].sem, stats.groups["guide"].sem])
        z = (mean - ref_mean).abs() / (sem**2 + ref_sem**2).sqrt().clamp_min(1e-12)
        assert z.max() < 4.0, name


def test_score_handler_keeps_the_loss_and_changes_the_estimator():
    for model, guide, x in (_normal_normal(), _linear_flow()):
        pyro.set_rng_seed(5)
        plain = Trace_ELBO().loss(model, guide, x)
        pyro.set_rng_seed(5)
        scored = Trace_ELBO().loss(model, score_function(guide), x)
        assert scored == pytest.approx(plain, rel=1e-6)
        reparam = gradient_stats(model, guide, x, make_estimator("reparam"), 50, seed=0)
        score = gradient_stats(model, guide, x, make_estimator("score"), 50, seed=0)
        ratio = score.groups["guide"].var.mean() / reparam.groups["guide"].var.mean()
        assert ratio > 2.0


def test_multi_sample_bounds_at_one_particle_equal_their_single_sample_estimators():
    """Same random numbers: IWAE (K = 1) draws equal Trace_ELBO's, DReG's (K = 1) equal STL's."""
    model, guide, x = _normal_normal()

    def draws(name):
        stats = gradient_stats(model, guide, x, make_estimator(name, 1), 3, seed=3)
        return torch.cat([stats.groups["model"].mean, stats.groups["guide"].mean,
                          stats.groups["guide"].var])

    assert torch.allclose(draws("iwae"), draws("reparam"), rtol=1e-5, atol=1e-4)
    assert torch.allclose(draws("dreg"), draws("stl"), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(draws("stl"), draws("reparam"), rtol=1e-3)


def test_stl_has_zero_guide_variance_at_the_exact_posterior():
    model = NormalNormal(1.0, 0.5, learn_noise=True)
    guide = AffineNormalGuide.exact_for(model)
    x = torch.randn(40, generator=torch.Generator().manual_seed(1))
    stl = gradient_stats(model, guide, x, make_estimator("stl"), 30, seed=0)
    reparam = gradient_stats(model, guide, x, make_estimator("reparam"), 30, seed=0)
    assert stl.groups["guide"].var.max() < 1e-8
    assert reparam.groups["guide"].var.min() > 1e-2
    assert stl.groups["model"].var.max() > 1e-3  # the model's gradient is still random


def _iwae_reference(model, guide, x, k, draws=10**6, chunks=20):
    """Pathwise Monte Carlo of ∇ Σ_n E[log (1/K) Σ_k w_kn] written out by hand."""
    params = _params(model, guide)
    per = draws // chunks
    gen = torch.Generator().manual_seed(123)
    grads = []
    for _ in range(chunks):
        eps = torch.randn(per, k, x.shape[0], generator=gen)
        s = guide.log_scale.exp()
        m = guide.a * x + guide.b
        z = m + s * eps
        log_w = (dist.Normal(0.0, model.prior_scale).log_prob(z)
                 + dist.Normal(z, model.noise).log_prob(x) - dist.Normal(m, s).log_prob(z))
        bound = (torch.logsumexp(log_w, 1) - math.log(k)).sum(-1).mean()
        grads.append(_flat(torch.autograd.grad(-bound, params)))
    g = torch.stack(grads).double()
    return g.mean(0), g.std(0) / math.sqrt(chunks)


def test_iwae_and_dreg_match_a_monte_carlo_reference_of_the_bound():
    model, guide, _ = _normal_normal()
    x = torch.tensor([-1.5, 0.2, 0.9, 2.5])
    k = 5
    ref, ref_sem = _iwae_reference(model, guide, x, k)
    elbo_grad = _flat(torch.autograd.grad(-exact_elbo_normal(model, guide, x),
                                          _params(model, guide)))
    assert ((ref - elbo_grad).abs() / ref_sem).max() > 10  # the K = 5 bound's gradient differs
    for name in ("iwae", "dreg"):
        stats = gradient_stats(model, guide, x, make_estimator(name, k), 300, seed=4)
        mean = torch.cat([stats.groups["model"].mean, stats.groups["guide"].mean]).double()
        sem = torch.cat([stats.groups["model"].sem, stats.groups["guide"].sem]).double()
        z = (mean - ref).abs() / (sem**2 + ref_sem**2).sqrt()
        assert z.max() < 4.0, (name, mean, ref)


def test_dreg_reduces_guide_variance_relative_to_iwae():
    model, guide, _ = _normal_normal()
    x = torch.tensor([-1.5, 0.2, 0.9, 2.5])
    iwae = gradient_stats(model, guide, x, make_estimator("iwae", 10), 100, seed=0)
    dreg = gradient_stats(model, guide, x, make_estimator("dreg", 10), 100, seed=0)
    assert dreg.groups["guide"].var.mean() < 0.5 * iwae.groups["guide"].var.mean()
    assert torch.allclose(dreg.groups["model"].var, iwae.groups["model"].var, rtol=1e-3)


def test_as_score_function_unwraps_independent_mask_and_flows():
    loc = torch.randn(4, 3, requires_grad=True)
    fn = dist.Normal(loc, 1.0).to_event(1).mask(torch.tensor([True, False, True, True]))
    sf = as_score_function(fn)
    assert fn.has_rsample and not sf.has_rsample
    value = fn.sample()
    assert torch.allclose(sf.log_prob(value), fn.log_prob(value))
    assert sf.expand((2, 4)).batch_shape == (2, 4)
    delta = dist.Delta(torch.zeros(3), event_dim=1)
    assert as_score_function(delta) is delta  # point estimates keep their pathwise gradient

    site = FlowGuide(3, 2, flow="iaf", num_flows=2)
    q = site(torch.randn(5, 3))
    z = q.rsample()
    assert torch.allclose(cache_free_log_prob(q, z.detach()), q.log_prob(z), atol=1e-4)
    assert not as_score_function(q).has_rsample


def test_bad_arguments_raise_clear_errors():
    model, guide, x = _normal_normal()
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("nope")
    with pytest.raises(ValueError, match="num_particles"):
        make_estimator("iwae", 0)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_stats(model, guide, x, Trace_ELBO(), 1)
    with pytest.raises(TypeError, match="pyro.infer.ELBO"):
        gradient_stats(model, guide, x, "Trace_ELBO", 10)
