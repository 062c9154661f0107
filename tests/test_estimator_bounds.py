r"""What the estimator lab reports, checked exactly, not only through gradients.

* ``analytic_kl`` uses the registered Normal–Normal KL: its loss is
  :math:`-\bigl(\log p(x \mid z) - \mathrm{KL}(q \,\|\, p)\bigr)` at the drawn :math:`z` (not the
  one-sample :math:`\log p(z) - \log q(z)` of ``reparam``), and its gradient has the same mean as
  ``reparam``'s with a lower variance.
* ``iwae`` and ``dreg`` report :math:`-\sum_n \log \frac1K \sum_k w_{kn}`: with the exact
  posterior as guide every weight equals :math:`p(x_n)`, so the loss is :math:`-\sum_n \log
  p(x_n)` for every :math:`K`; with any other guide it equals the same expression computed by
  hand from the draws the estimator made.

The model is the conjugate :class:`~pyro_seqlatent.models.conjugate.NormalNormal`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_seqlatent.infer.estimators import DReGELBO, gradient_stats, make_estimator
from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal


def _case(exact: bool = False, noise: float = 0.5):
    model = NormalNormal(1.0, noise, learn_noise=True)
    guide = AffineNormalGuide.exact_for(model) if exact else AffineNormalGuide(0.3, 0.2, -0.5)
    x = torch.randn(20, generator=torch.Generator().manual_seed(1)) * 1.2
    return model, guide, x


class Recording:
    """The guide, remembering the last ``z`` it returned (the estimators' own draws)."""

    def __init__(self, guide):
        self.guide = guide
        self.z = None

    def __call__(self, x):
        z = self.guide(x)
        self.z = z.detach()
        return z


def _terms(model, guide, x, z):
    """``(log p(x | z), log p(z), log q(z | x), KL(q || p))`` per draw and data point."""
    q = dist.Normal(guide.a * x + guide.b, guide.log_scale.exp())
    prior = dist.Normal(torch.zeros_like(x), model.prior_scale)
    with torch.no_grad():
        return (dist.Normal(z, model.noise).log_prob(x), prior.log_prob(z), q.log_prob(z),
                kl_divergence(q, prior))


# ------------------------------------------------------------------------------- analytic KL
def test_analytic_kl_loss_is_the_likelihood_term_minus_the_closed_form_kl():
    model, guide, x = _case()
    recording = Recording(guide)
    losses = {}
    for name in ("analytic_kl", "reparam"):
        pyro.set_rng_seed(7)
        losses[name] = make_estimator(name).loss(model, recording, x)
        log_lik, log_prior, log_q, kl = _terms(model, guide, x, recording.z)
        expected = {"analytic_kl": -(log_lik - kl).sum(),
                    "reparam": -(log_lik + log_prior - log_q).sum()}[name]
        assert losses[name] == pytest.approx(float(expected), rel=1e-5, abs=1e-4), name
    # the same draw (same seed): the two losses differ by KL - (log q - log p) at that z
    assert abs(losses["analytic_kl"] - losses["reparam"]) > 0.1


def test_analytic_kl_has_reparams_mean_gradient_and_a_lower_variance():
    """A noisy likelihood (sigma = 2), so that most of reparam's variance is the Monte-Carlo KL
    (measured with 2,000 draws: variance ratios 0.04-0.07 on the guide's parameters)."""
    model, guide, x = _case(noise=2.0)
    draws = 400
    analytic = gradient_stats(model, guide, x, make_estimator("analytic_kl"), draws, seed=11)
    reparam = gradient_stats(model, guide, x, make_estimator("reparam"), draws, seed=12)
    for group in ("model", "guide"):
        a, r = analytic.groups[group], reparam.groups[group]
        z = (a.mean - r.mean).abs() / (a.sem**2 + r.sem**2).sqrt().clamp_min(1e-12)
        assert z.max() < 4.0, (group, a.mean, r.mean)
    # the KL's gradient is exact: only log p(x | z) is random (guide a, b, log_scale)
    ratio = analytic.groups["guide"].var / reparam.groups["guide"].var
    assert ratio.max() < 0.3, ratio
    # the model's parameter (the noise) sees only log p(x | z) in both: same variance
    torch.testing.assert_close(analytic.groups["model"].var, reparam.groups["model"].var,
                               rtol=0.35, atol=0.0)


# ---------------------------------------------------------------------- IWAE and DReG bounds
def _bound_estimators(k):
    yield "iwae", make_estimator("iwae", k)
    yield "dreg", make_estimator("dreg", k)
    yield "iwae_sequential", pyro.infer.RenyiELBO(alpha=0.0, num_particles=k,
                                                  vectorize_particles=False)
    yield "dreg_sequential", DReGELBO(num_particles=k, vectorize_particles=False)


@pytest.mark.parametrize("k", [1, 2, 7])
def test_multi_sample_bound_at_the_exact_posterior_is_log_px_for_every_k(k):
    model, guide, x = _case(exact=True)
    log_px = float(model.exact_log_marginal(x).sum())
    for name, elbo in _bound_estimators(k):
        pyro.set_rng_seed(k)
        assert elbo.loss(model, guide, x) == pytest.approx(-log_px, rel=1e-5), (name, k)
        pyro.set_rng_seed(k)
        loss = elbo.loss_and_grads(model, guide, x)
        assert loss == pytest.approx(-log_px, rel=1e-5), (name, k)
        model.zero_grad()
        guide.zero_grad()


@pytest.mark.parametrize("name", ["iwae", "dreg"])
@pytest.mark.parametrize("k", [2, 6])
def test_multi_sample_bound_equals_log_mean_weight_of_its_own_draws(name, k):
    model, guide, x = _case()
    recording = Recording(guide)
    pyro.set_rng_seed(3)
    loss = make_estimator(name, k).loss(model, recording, x)
    assert recording.z.shape == (k, x.shape[0])  # K vectorized draws per data point
    log_lik, log_prior, log_q, _ = _terms(model, guide, x, recording.z)
    log_w = log_lik + log_prior - log_q  # (K, N)
    bound = (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    assert loss == pytest.approx(-float(bound), rel=1e-5, abs=1e-4)
    # and it lies between the ELBO of these draws and log p(x)
    assert float(log_w.mean(0).sum()) <= -loss <= float(model.exact_log_marginal(x).sum()) + 1.0
