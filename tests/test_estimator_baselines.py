"""The score-function baselines reduce variance: on the same draws (same seed), the decaying
average and the neural baseline give the guide's gradient a much lower variance than the plain
score function (a baseline that is silently off gives the very same gradients)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_seqlatent.infer.estimators import ESTIMATORS, gradient_stats, make_estimator
from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal


@pytest.mark.parametrize("name", ["score_avg_baseline", "score_nn_baseline"])
def test_baseline_lowers_the_score_functions_guide_variance(name):
    model = NormalNormal(1.0, 1.0, learn_noise=True)
    guide = AffineNormalGuide(0.3, 0.2, -0.5)
    x = torch.randn(20, generator=torch.Generator().manual_seed(1)) * 1.2
    plain = gradient_stats(model, guide, x, make_estimator("score"), 300, seed=0)
    pyro.clear_param_store()
    based = gradient_stats(model, guide, x, make_estimator(name), 300,
                           warmup=ESTIMATORS[name].warmup, seed=0)
    # measured: 0.17-0.23 for both baselines (seeds 0, 1, 2); without a baseline exactly 1
    ratio = based.groups["guide"].var.sum() / plain.groups["guide"].var.sum()
    assert ratio < 0.6, ratio
    if name == "score_avg_baseline":  # the decaying averages TraceGraph_ELBO keeps, per site
        assert "__baseline_avg_downstream_cost_z" in pyro.get_param_store().keys()


def _bernoulli_layer(units: int, guide_bias: float):
    """A layer of ``units`` binary units per data point (5 pixels each) in a data plate, as in a
    sigmoid belief network, and a linear Bernoulli guide with the parameter ``"a"``."""
    torch.manual_seed(0)
    w = torch.randn(units, 5) * 0.5

    def model(x):
        with pyro.plate("data", x.shape[0]):
            h = pyro.sample("h", dist.Bernoulli(logits=torch.zeros(units)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=h @ w).to_event(1), obs=x)

    def guide(x):
        a = pyro.param("a", torch.full((5, units), 0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", dist.Bernoulli(logits=x @ a + guide_bias).to_event(1))

    return model, guide


@pytest.mark.parametrize("name", ["score_avg_baseline", "score_nn_baseline"])
def test_baseline_lowers_the_guide_variance_at_a_discrete_site(name):
    """A site that is discrete to begin with (a Bernoulli layer in a data plate, as in a
    sigmoid belief network) gets the baseline too: a baseline that is silently off gives the
    plain score function's variance (ratio 1)."""
    model, guide = _bernoulli_layer(units=6, guide_bias=-0.2)
    x = (torch.rand(8, 5, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    pyro.clear_param_store()
    guide(x)
    group = {"guide": [pyro.param("a").unconstrained()]}
    plain = gradient_stats(model, guide, x, make_estimator("score"), 300, groups=group, seed=0)
    based = gradient_stats(model, guide, x, make_estimator(name), 300, groups=group,
                           warmup=ESTIMATORS[name].warmup, seed=0)
    ratio = based.groups["guide"].var.sum() / plain.groups["guide"].var.sum()
    assert ratio < 0.6, ratio


@pytest.mark.parametrize("batch", [1, 3])
def test_neural_baseline_takes_a_batch_of_one_data_point(batch):
    """TraceGraph_ELBO squeezes a size-1 plate out of the downstream cost (shape ``()`` for one
    data point); the neural baseline is shaped the same way, so a batch of one trains instead
    of stopping at Pyro's "Expected baseline at site h to be () instead got [1]"."""
    model, guide = _bernoulli_layer(units=4, guide_bias=0.0)
    pyro.clear_param_store()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]]).expand(batch, 5)
    estimator = make_estimator("score_nn_baseline")
    loss = estimator.loss_and_grads(model, guide, x)
    grad = pyro.param("a").unconstrained().grad
    assert torch.isfinite(torch.as_tensor(loss)) and grad is not None
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
