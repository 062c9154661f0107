r"""Estimators at discrete latents against exact gradients by enumeration.

Yardsticks (all small enough to sum over every latent configuration with
:func:`~pyro_seqlatent.infer.estimators_discrete.exact_bound`, an independent brute-force sum
over ``condition``-ed traces; autograd then gives the exact gradient):

* :class:`BernoulliChain`: two layers of two binary units (one scalar site per unit, 16
  configurations), a Gaussian likelihood of two 3-D observations, a guide whose second layer
  depends on the first;
* :class:`Mixture`: a user-built Gaussian mixture with a ``Categorical`` assignment per data
  point (``locs[z]`` indexing) and an amortized guide; ``one_hot=True`` writes the assignment as
  a ``OneHotCategorical`` (``z @ locs``), which the Concrete relaxation needs.

Every unbiased estimator's mean gradient over independent draws lies within 4 standard errors
of the exact gradient of its bound (the ELBO; the K-sample bound for ``vimco``) on every model
and guide coordinate; ``enum`` equals it to float precision; the Concrete estimator's bias is
measured (printed) and must be detectable.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_seqlatent.infer.estimators import ESTIMATORS, gradient_stats, make_estimator
from pyro_seqlatent.infer.estimators_discrete import (
    VIMCOELBO,
    enumerate_configurations,
    exact_bound,
)


def _stack(*units):
    return torch.stack(torch.broadcast_tensors(*units), -1)


class BernoulliChain(nn.Module):
    """h1_i ~ Bern(σ(a_i)), h2_j ~ Bern(σ(W_j·h1 + b_j)), x_n ~ N(V h2 + c, σ_x² I_3)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3, -0.4]))
        self.W = nn.Parameter(torch.tensor([[1.0, -0.8], [0.5, 0.7]]))
        self.b = nn.Parameter(torch.tensor([-0.2, 0.1]))
        self.V = nn.Parameter(torch.tensor([[1.2, -0.6], [0.3, 0.9], [-0.7, 0.4]]))
        self.c = nn.Parameter(torch.tensor([0.1, -0.1, 0.2]))
        self.log_sx = nn.Parameter(torch.tensor(-0.2))

    def forward(self, x):
        h1 = _stack(*[pyro.sample(f"h1_{i}", dist.Bernoulli(logits=self.a[i])) for i in range(2)])
        logits2 = h1 @ self.W.T + self.b
        h2 = _stack(*[pyro.sample(f"h2_{j}", dist.Bernoulli(logits=logits2[..., j]))
                      for j in range(2)])
        loc = h2 @ self.V.T + self.c  # a leading enumeration / particle dim stays left
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, self.log_sx.exp()).to_event(1), obs=x)


class ChainGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.4, -0.3, 0.2], [-0.1, 0.5, 0.3]]))
        self.d = nn.Parameter(torch.tensor([0.2, -0.3]))
        self.B = nn.Parameter(torch.tensor([[0.3, 0.2, -0.4], [0.1, -0.2, 0.5]]))
        self.E = nn.Parameter(torch.tensor([[0.6, -0.5], [-0.4, 0.3]]))
        self.f = nn.Parameter(torch.tensor([0.1, 0.2]))

    def forward(self, x):
        s = x.sum(0)
        logits1 = self.A @ s + self.d
        h1 = _stack(*[pyro.sample(f"h1_{i}", dist.Bernoulli(logits=logits1[i]))
                      for i in range(2)])
        logits2 = h1 @ self.E.T + self.B @ s + self.f
        for j in range(2):
            pyro.sample(f"h2_{j}", dist.Bernoulli(logits=logits2[..., j]))


class Mixture(nn.Module):
    """z_n ~ Cat(softmax(π)), x_n ~ N(μ_{z_n}, σ²): a user's model, one assignment per point."""

    def __init__(self, one_hot: bool = False):
        super().__init__()
        self.pi = nn.Parameter(torch.tensor([0.2, -0.1, 0.3]))
        self.locs = nn.Parameter(torch.tensor([-1.5, 0.2, 1.7]))
        self.log_scale = nn.Parameter(torch.tensor(-0.1))
        self.one_hot = one_hot

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            if self.one_hot:
                z = pyro.sample("z", dist.OneHotCategorical(logits=self.pi))
                loc = z @ self.locs
            else:
                z = pyro.sample("z", dist.Categorical(logits=self.pi))
                loc = self.locs[z]
            pyro.sample("x", dist.Normal(loc, self.log_scale.exp()), obs=x)


class MixtureGuide(nn.Module):
    def __init__(self, one_hot: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([-0.8, 0.1, 0.9]))
        self.b = nn.Parameter(torch.tensor([0.1, 0.3, -0.2]))
        self.one_hot = one_hot

    def forward(self, x):
        logits = x.unsqueeze(-1) * self.a + self.b
        with pyro.plate("data", x.shape[0]):
            cls = dist.OneHotCategorical if self.one_hot else dist.Categorical
            pyro.sample("z", cls(logits=logits))


def chain_case():
    x = torch.tensor([[0.9, 0.4, -0.6], [1.3, -0.2, 0.1]])
    return BernoulliChain(), ChainGuide(), x


def mixture_case(one_hot: bool = False):
    x = torch.tensor([-1.2, 0.4, 1.9, 0.9])
    return Mixture(one_hot), MixtureGuide(one_hot), x


CASES = {"chain": chain_case, "mixture": mixture_case,
         "mixture_one_hot": lambda: mixture_case(True)}


def _params(model, guide):
    return list(model.parameters()) + list(guide.parameters())


def exact_gradient(model, guide, x, k: int = 1, per_point: bool = False) -> torch.Tensor:
    """∇ of minus the exact bound (the estimators' loss); ``per_point``: Σ_n bound(x_n), the
    per-data-point weights the multi-sample estimators keep when every site is in the plate."""
    if per_point:
        bound = sum(exact_bound(model, guide, x[n:n + 1], num_particles=k)
                    for n in range(x.shape[0]))
    else:
        bound = exact_bound(model, guide, x, num_particles=k)
    grads = torch.autograd.grad(-bound, _params(model, guide), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, _params(model, guide))])


def _mean_sem(stats):
    mean = torch.cat([stats.groups["model"].mean, stats.groups["guide"].mean]).double()
    sem = torch.cat([stats.groups["model"].sem, stats.groups["guide"].sem]).double()
    return mean, sem


def _z(stats, exact):
    mean, sem = _mean_sem(stats)
    return (mean - exact.double()).abs() / sem.clamp_min(1e-9)


# ------------------------------------------------------------------- the yardstick itself
def test_enumeration_helper_matches_a_hand_written_sum():
    model, guide, x = mixture_case()
    configs = enumerate_configurations(guide, x)
    assert len(configs) == 3 ** 4
    # per data point, the ELBO is a sum over 3 assignments written out by hand
    q = torch.softmax(x.unsqueeze(-1) * guide.a + guide.b, -1)
    log_prior = torch.log_softmax(model.pi, -1)
    log_lik = dist.Normal(model.locs, model.log_scale.exp()).log_prob(x.unsqueeze(-1))
    by_hand = (q * (log_prior + log_lik - q.log())).sum()
    assert torch.allclose(exact_bound(model, guide, x), by_hand, atol=1e-5)
    # K = 2, one data point: sum over the 9 pairs by hand
    q0, lw0 = q[0], (log_prior + log_lik - q.log())[0]
    pairs = sum(q0[i] * q0[j] * (torch.logaddexp(lw0[i], lw0[j]) - math.log(2))
                for i in range(3) for j in range(3))
    assert torch.allclose(exact_bound(model, guide, x[:1], num_particles=2), pairs, atol=1e-5)


# --------------------------------------------------------------- unbiased single bound: ELBO
ELBO_ESTIMATORS = [  # (case, name, K, draws): the baselines are slower per draw
    ("chain", "score", 1, 500), ("chain", "score_avg_baseline", 1, 150),
    ("chain", "reinforce_loo", 4, 300),
    ("mixture", "score", 1, 500), ("mixture", "reparam", 1, 300),
    ("mixture", "score_avg_baseline", 1, 300), ("mixture", "score_nn_baseline", 1, 300),
    ("mixture", "reinforce_loo", 4, 300)]


@pytest.mark.parametrize("case,name,k,draws", ELBO_ESTIMATORS)
def test_unbiased_estimators_match_the_exact_elbo_gradient(case, name, k, draws):
    model, guide, x = CASES[case]()
    exact = exact_gradient(model, guide, x)
    stats = gradient_stats(model, guide, x, make_estimator(name, k), draws,
                           warmup=ESTIMATORS[name].warmup, seed=3)
    z = _z(stats, exact)
    assert z.max() < 4.0, (name, case, z)
    # the loss is minus the ELBO on average
    loss_sem = stats.loss_std / math.sqrt(draws)
    assert abs(stats.loss_mean + exact_bound(model, guide, x).item()) < 4 * loss_sem + 1e-6


@pytest.mark.parametrize("case", ["chain", "mixture"])
def test_enum_is_the_exact_gradient_with_zero_variance(case):
    model, guide, x = CASES[case]()
    exact = exact_gradient(model, guide, x)
    stats = gradient_stats(model, guide, x, make_estimator("enum"), 3, seed=0)
    mean, _ = _mean_sem(stats)
    assert torch.allclose(mean, exact.double(), atol=1e-5), (mean, exact)
    assert stats.groups["guide"].var.max() < 1e-10
    assert stats.loss_mean == pytest.approx(-exact_bound(model, guide, x).item(), abs=1e-5)


# ----------------------------------------------------------------- K-sample bound: VIMCO
@pytest.mark.parametrize("case,per_point", [("chain", False), ("mixture", True)])
def test_vimco_matches_the_exact_gradient_of_the_k_sample_bound(case, per_point):
    model, guide, x = CASES[case]()
    k = 3
    exact_k = exact_gradient(model, guide, x, k, per_point=per_point)
    exact_1 = exact_gradient(model, guide, x, 1)
    stats = gradient_stats(model, guide, x, make_estimator("vimco", k), 500, seed=5)
    assert _z(stats, exact_k).max() < 4.0, _z(stats, exact_k)
    assert _z(stats, exact_1).max() > 6.0  # the K-sample bound's gradient is another one


def test_vimco_leave_one_out_lowers_the_guide_variance():
    model, guide, x = mixture_case()
    plain = gradient_stats(model, guide, x, VIMCOELBO(4, leave_one_out=False), 300, seed=1)
    loo = gradient_stats(model, guide, x, VIMCOELBO(4), 300, seed=1)
    exact = exact_gradient(model, guide, x, 4, per_point=True)
    assert _z(plain, exact).max() < 4.0  # still unbiased without the baseline
    ratio = loo.groups["guide"].var.mean() / plain.groups["guide"].var.mean()
    assert ratio < 0.5, ratio


def test_reinforce_loo_lowers_the_guide_variance_of_k_score_draws():
    model, guide, x = chain_case()
    plain = gradient_stats(model, guide, x, make_estimator("score", 4), 300, seed=1)
    loo = gradient_stats(model, guide, x, make_estimator("reinforce_loo", 4), 300, seed=1)
    ratio = loo.groups["guide"].var.mean() / plain.groups["guide"].var.mean()
    assert ratio < 0.5, ratio


# ------------------------------------------------------------------ refusals, Renyi's zero
def test_iwae_refuses_a_discrete_guide_where_renyi_gives_a_zero_guide_gradient():
    model, guide, x = mixture_case()
    renyi = gradient_stats(model, guide, x, pyro.infer.RenyiELBO(alpha=0, num_particles=3,
                                                                 vectorize_particles=True), 5)
    exact_k = exact_gradient(model, guide, x, 3, per_point=True)
    n_model = renyi.groups["model"].size
    assert renyi.groups["guide"].mean.abs().max() == 0 and exact_k[n_model:].abs().max() > 0.05
    with pytest.raises(ValueError, match="vimco"):
        gradient_stats(model, guide, x, make_estimator("iwae", 3), 2)


def test_bad_particles_and_unenumerable_sites_are_refused_with_reasons():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        make_estimator("vimco", 1)
    with pytest.raises(ValueError, match="temperature"):
        make_estimator("concrete").__class__(temperature=0)

    def model():
        pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(3)).to_event(1))

    def guide():
        p = pyro.param("p", torch.full((3,), 0.4))
        pyro.sample("z", dist.Bernoulli(p).to_event(1))

    with pytest.raises(ValueError, match="enumerable"):
        make_estimator("enum").differentiable_loss(model, guide)
    model, guide, x = mixture_case()  # integer Categorical: no relaxed one-hot
    with pytest.raises(ValueError, match="OneHotCategorical"):
        make_estimator("concrete").differentiable_loss(model, guide, x)


# ---------------------------------------------------------------------- Concrete: the bias
@pytest.mark.parametrize("case", ["chain", "mixture_one_hot"])
def test_concrete_bias_is_measured_against_the_exact_gradient(case):
    model, guide, x = CASES[case]()
    exact = exact_gradient(model, guide, x).double()
    rows = []
    for temperature in (1.0, 0.5, 0.1):
        est = make_estimator("concrete")
        est.temperature = temperature
        stats = gradient_stats(model, guide, x, est, 150, seed=2)
        mean, sem = _mean_sem(stats)
        rel = float((mean - exact).norm() / exact.norm())
        rows.append((temperature, rel, float(_z(stats, exact).max()),
                     float(stats.groups["guide"].var.mean())))
    print(f"\nconcrete on {case}: (temperature, ‖E g − ∇ELBO‖/‖∇ELBO‖, max z, guide var)",
          rows)
    assert rows[1][2] > 4.0  # at the default temperature 0.5 the bias is detectable
    assert rows[2][1] < rows[0][1]  # and it shrinks as the temperature falls
