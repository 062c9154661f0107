"""Flow density model: Pyro model log-likelihood = change of variables; trains through infer."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.autograd.functional import jacobian

from pyro_seqlatent.models.flow_density import (
    DIGITS_LEVELS,
    FlowDensity,
    NoLatents,
    bits_per_dim,
    digits_datasets,
)
from pyro_seqlatent.registry import get_model


@pytest.mark.parametrize("prior", ["normal", "logistic"])
def test_model_log_likelihood_is_the_change_of_variables(prior):
    model = FlowDensity(3, "real_nvp", 2, (8,), prior=prior).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(4, 3, dtype=torch.float64)
    tr = poutine.trace(model).get_trace(x)
    tr.compute_log_prob()
    log_px = tr.nodes["x"]["log_prob"]
    d = model.distribution()
    # independent: invert the whole map, then an autograd Jacobian of the forward map
    transform = torch.distributions.ComposeTransform(d.transforms)
    for i in range(4):
        z = transform.inv(x[i].clone())
        J = jacobian(lambda v: transform(v), z.detach().clone())
        expected = d.base_dist.log_prob(z) - torch.linalg.slogdet(J)[1]
        torch.testing.assert_close(log_px[i], expected, atol=1e-6, rtol=0)


def test_trains_by_maximum_likelihood_through_infer_train():
    infer = pytest.importorskip("pyro_seqlatent.infer")
    spec = get_model("flow_density")
    data = digits_datasets({"dataset": "digits"})
    model, guide = spec.build(spec.options(num_couplings=2, hidden=32))
    assert isinstance(guide, NoLatents)
    before = bits_per_dim(model, data["test"], DIGITS_LEVELS)
    assert math.log2(DIGITS_LEVELS) < before < 8.0  # an untrained flow is worse than uniform
    pyro.clear_param_store()
    infer.train(model, guide, data["train"], num_steps=40, batch_size=64, lr=3e-3,
                progress=False)
    after = bits_per_dim(model, data["test"], DIGITS_LEVELS)
    assert after < before - 0.3
    samples = spec.generate(model, 5, {})
    assert samples.shape == (5, 8, 8) and samples.min() >= 0 and samples.max() < DIGITS_LEVELS
