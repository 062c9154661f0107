"""The sigmoid belief network (pyro_seqlatent.models.sbn): its log joint against a hand
computation, its exact evidence by enumeration against an independent sum and against
log_marginal's importance-sampling estimate, and its registration and errors."""

import itertools
import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_seqlatent.infer import log_marginal
from pyro_seqlatent.infer.estimators import make_estimator
from pyro_seqlatent.models.sbn import SBN, SBNGuide, build
from pyro_seqlatent.registry import get_model, list_models, load_builtin_models


def _random_pair(data_dim: int, hidden_dim: int, seed: int = 0, guide_hidden=()):
    torch.manual_seed(seed)
    model, guide = SBN(data_dim, hidden_dim), SBNGuide(data_dim, hidden_dim, guide_hidden)
    with torch.no_grad():
        model.prior_logits.normal_(0, 1.5)
        model.decoder.weight.normal_(0, 1.5)
        model.decoder.bias.normal_(0, 1.0)
    x = torch.bernoulli(torch.full((5, data_dim), 0.4))
    return model, guide, x


def _hand_log_joint(model: SBN, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """log p(x, h) summed unit by unit and pixel by pixel in float64 numpy."""
    b = model.prior_logits.detach().double().numpy()
    w = model.decoder.weight.detach().double().numpy()
    c = model.decoder.bias.detach().double().numpy()
    out = np.zeros(x.shape[0])
    for n in range(x.shape[0]):
        for u in range(b.shape[0]):
            p = 1 / (1 + math.exp(-b[u]))
            out[n] += math.log(p) if h[n, u] else math.log(1 - p)
        for j in range(x.shape[1]):
            p = 1 / (1 + math.exp(-(w[j] @ h[n] + c[j])))
            out[n] += math.log(p) if x[n, j] else math.log(1 - p)
    return out


def test_model_trace_log_joint_matches_hand_computation():
    model, guide, x = _random_pair(6, 4)
    h = torch.bernoulli(torch.full((5, 4), 0.5))
    conditioned = poutine.condition(model, data={"h": h})
    trace = poutine.trace(conditioned).get_trace(x)
    per_point = sum(site["fn"].log_prob(site["value"]) for site in trace.nodes.values()
                    if site["type"] == "sample")
    hand = _hand_log_joint(model, x.numpy(), h.numpy())
    np.testing.assert_allclose(per_point.detach().double().numpy(), hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.log_joint(x, h).detach().double().numpy(), hand,
                               rtol=1e-5, atol=1e-5)
    assert trace.nodes["h"]["value"].shape == (5, 4)


def test_exact_log_marginal_matches_an_independent_sum():
    model, _, x = _random_pair(5, 3)
    hand = np.array([np.logaddexp.reduce([
        _hand_log_joint(model, x[n:n + 1].numpy(), np.array([cfg], dtype=float))[0]
        for cfg in itertools.product((0, 1), repeat=3)]) for n in range(x.shape[0])])
    np.testing.assert_allclose(model.exact_log_marginal(x).double().numpy(), hand, rtol=1e-5,
                               atol=1e-5)


def test_log_marginal_importance_sampling_agrees_with_enumeration():
    """8 hidden units (256 configurations): log_marginal's IS estimate (the guide as proposal,
    particles in a plate at the left) is within 4 standard errors (delta method, from its ESS)
    of the exact sum."""
    model, guide, x = _random_pair(12, 8, seed=1, guide_hidden=(16,))
    exact = model.exact_log_marginal(x)
    k = 4000
    pyro.set_rng_seed(0)
    est = log_marginal(model, guide, x, num_samples=k)
    se = torch.sqrt((k / est.ess - 1).clamp_min(0) / k)
    assert torch.all((est.log_marginal - exact).abs() < 4 * se + 1e-4), \
        (est.log_marginal, exact, se)
    assert torch.all(est.elbo <= exact + 1e-4)  # the ELBO bounds log p(x) from below


@pytest.mark.parametrize("name, k", [("vimco", 3), ("reinforce_loo", 3), ("concrete", 1),
                                     ("score_avg_baseline", 1)])
def test_discrete_estimators_give_finite_guide_gradients(name, k):
    model, guide, x = _random_pair(12, 4, seed=2)
    pyro.set_rng_seed(0)
    est = make_estimator(name, k)
    if hasattr(est, "differentiable_loss") and name != "score_avg_baseline":
        est.differentiable_loss(model, guide, x).backward()
    else:
        est.loss_and_grads(model, guide, x)
    grad = guide.encoder.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_registered_and_builds_from_options():
    load_builtin_models()
    assert "sbn" in list_models()
    spec = get_model("sbn")
    model, guide = spec.build(spec.options(hidden_dim=7, guide_hidden="10,5"))
    assert model.hidden_dim == 7 and guide.encoder(torch.zeros(1, 784)).shape == (1, 7)
    with pytest.raises(ValueError, match="guide_hidden"):
        build({"hidden_dim": 3, "guide_hidden": "a,b"})


def test_bad_input_is_refused_by_name():
    model, guide, _ = _random_pair(6, 3)
    with pytest.raises(ValueError, match="binary"):
        model(torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match="hidden_dim"):
        SBN(6, 0)
    with pytest.raises(ValueError, match="log_marginal"):
        SBN(6, 21).exact_log_marginal(torch.zeros(1, 6))


# ------------------------------------------------------------------ the deeper variant (L = 2)
def _two_layer_pair(data_dim=6, hidden_dim=2, seed=3):
    torch.manual_seed(seed)
    model = SBN(data_dim, hidden_dim, layers=2)
    guide = SBNGuide(data_dim, hidden_dim, layers=2)
    with torch.no_grad():
        for p in list(model.parameters()) + list(guide.parameters()):
            p.normal_(0, 1.0)
    x = torch.bernoulli(torch.full((3, data_dim), 0.4))
    return model, guide, x


def _log_bern(v, logits):
    """Σ log Bernoulli(v | σ(logits)), unit by unit in float64 numpy."""
    p = 1 / (1 + np.exp(-logits))
    return float(np.sum(np.where(v > 0.5, np.log(p), np.log1p(-p))))


def _np(t):
    return t.detach().double().numpy()


def _hand_two_layer(model, x, h1, h2):
    """log p(x, h1, h2) = log p(h2) + log p(h1 | h2) + log p(x | h1), written out."""
    u, d = _np(model.between[0].weight), _np(model.between[0].bias)
    w, c = _np(model.decoder.weight), _np(model.decoder.bias)
    return (_log_bern(h2, _np(model.prior_logits)) + _log_bern(h1, u @ h2 + d)
            + _log_bern(x, w @ h1 + c))


def test_two_layer_trace_and_log_joint_match_hand_computation():
    model, guide, x = _two_layer_pair()
    assert model.sites == ("h1", "h2") and guide.sites == ("h1", "h2")
    h1, h2 = torch.bernoulli(torch.full((3, 2), 0.5)), torch.bernoulli(torch.full((3, 2), 0.5))
    trace = poutine.trace(poutine.condition(model, data={"h1": h1, "h2": h2})).get_trace(x)
    per_point = sum(site["fn"].log_prob(site["value"]) for site in trace.nodes.values()
                    if site["type"] == "sample")
    hand = [_hand_two_layer(model, _np(x[n]), _np(h1[n]), _np(h2[n])) for n in range(3)]
    np.testing.assert_allclose(_np(per_point), hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(model.log_joint(x, (h1, h2))), hand, rtol=1e-5, atol=1e-5)
    guide_trace = poutine.trace(guide).get_trace(x)
    order = list(guide_trace.nodes)
    assert order.index("h1") < order.index("h2")  # bottom-up: q(h1 | x) q(h2 | h1)
    assert guide_trace.nodes["h2"]["value"].shape == (3, 2)


def test_two_layer_exact_log_marginal_and_importance_sampling_agree_with_a_hand_sum():
    model, guide, x = _two_layer_pair()
    configs = [np.array(c, dtype=float) for c in itertools.product((0, 1), repeat=2)]
    hand = np.array([np.logaddexp.reduce([_hand_two_layer(model, _np(x[n]), a, b)
                                          for a in configs for b in configs])
                     for n in range(3)])
    exact = model.exact_log_marginal(x)
    np.testing.assert_allclose(_np(exact), hand, rtol=1e-5, atol=1e-5)
    k = 4000
    pyro.set_rng_seed(0)
    est = log_marginal(model, guide, x, num_samples=k)
    se = torch.sqrt((k / est.ess - 1).clamp_min(0) / k)
    assert torch.all((est.log_marginal - exact).abs() < 4 * se + 1e-4), (est.log_marginal, exact)


def _exact_two_layer_elbo(model, guide, x):
    """The ELBO of one data point by summing over the 16 configurations of (h1, h2), with the
    guide's factors q(h1 | x) q(h2 | h1) written from its weights (differentiable)."""
    hs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=4)))
    h1, h2 = hs[:, :2], hs[:, 2:]

    def log_bern(v, logits):
        return (v * logits - torch.nn.functional.softplus(logits)).sum(-1)

    log_q = log_bern(h1, guide.encoder(x)) + log_bern(h2, guide.upward[0](h1))
    log_p = model.log_joint(x, (h1, h2))
    return (log_q.exp() * (log_p - log_q)).sum()


@pytest.mark.parametrize("name, k, draws", [("reinforce_loo", 4, 400),
                                             ("score_nn_baseline", 1, 300)])
def test_two_layer_estimators_match_the_exact_elbo_gradient(name, k, draws):
    """Both layers' sites are score-function sites: the estimators' mean gradient is within 4
    standard errors of the exact ELBO gradient (16 configurations) on every coordinate of both
    layers of the model and the recognition model."""
    from pyro_seqlatent.infer.estimators import ESTIMATORS, gradient_stats

    model, guide, x = _two_layer_pair(data_dim=5, seed=4)
    x = x[:1]
    params = list(model.parameters()) + list(guide.parameters())
    grads = torch.autograd.grad(-_exact_two_layer_elbo(model, guide, x), params)
    exact = torch.cat([g.reshape(-1) for g in grads]).double()
    stats = gradient_stats(model, guide, (x,), make_estimator(name, k), draws,
                           warmup=ESTIMATORS[name].warmup, seed=1)
    mean = torch.cat([stats.groups["model"].mean, stats.groups["guide"].mean]).double()
    sem = torch.cat([stats.groups["model"].sem, stats.groups["guide"].sem]).double()
    assert mean.shape == exact.shape
    z = (mean - exact).abs() / sem.clamp_min(1e-9)
    assert z.max() < 4.0, z
    assert stats.groups["guide"].var.sum() > 0  # a real Monte Carlo estimate, not a constant


def test_two_layer_builds_from_options_and_refuses_bad_layers():
    load_builtin_models()
    spec = get_model("sbn")
    model, guide = spec.build(spec.options(hidden_dim=5, layers=3))
    assert model.sites == ("h1", "h2", "h3") and len(guide.upward) == 2
    assert model.generate(4).shape == (4, 784)


def test_two_layer_generate_draws_each_layer_from_the_one_above():
    """Saturated weights pin every draw: top units all on, layer 2 copies them through U_2,
    layer 1 negates through U_1, the pixels read layer 1. Decoding straight from the top
    layer, or skipping a layer, gives the opposite pixels."""
    model = SBN(3, 2, layers=3)
    with torch.no_grad():
        model.prior_logits.fill_(30.0)  # h3 = (1, 1)
        model.between[1].weight.copy_(torch.eye(2) * 60)  # h2 = h3
        model.between[1].bias.fill_(-30.0)
        model.between[0].weight.copy_(-torch.eye(2) * 60)  # h1 = 1 - h2 = (0, 0)
        model.between[0].bias.fill_(30.0)
        model.decoder.weight.fill_(60.0)  # pixels on iff some h1 unit is on
        model.decoder.bias.fill_(-30.0)
    probs = model.generate(5)
    assert torch.allclose(probs, torch.zeros(5, 3), atol=1e-6), probs
    with pytest.raises(ValueError, match="layers"):
        SBN(6, 3, layers=0)
    with pytest.raises(ValueError, match="log_marginal"):
        SBN(6, 11, layers=2).exact_log_marginal(torch.zeros(1, 6))
