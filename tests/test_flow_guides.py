"""FlowGuide: shapes under particle plates, change of variables, gradients, errors."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from torch.autograd.functional import jacobian

from pyro_seqlatent.guides import FlowGuide
from pyro_seqlatent.transforms import FLOW_KINDS

C, D = 4, 3


def _guide(flow, K=2, dtype=torch.float64):
    guide = FlowGuide(C, D, flow=flow, num_flows=K, hidden_dims=(8,), flow_hidden_dims=(8,))
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return guide.to(dtype)


@pytest.mark.parametrize("flow", FLOW_KINDS)
def test_runs_under_a_particle_plate(flow):
    guide = _guide(flow, dtype=torch.float32)
    P, B = 5, 6
    ctx = torch.randn(P, 1, B, C)

    def run():
        with pyro.plate("particles", P, dim=-3), pyro.plate("data", B, dim=-1):
            return guide.sample("z", ctx)

    tr = poutine.trace(run).get_trace()
    z = tr.nodes["z"]["value"]
    assert z.shape == (P, 1, B, D)
    tr.compute_log_prob()
    assert tr.nodes["z"]["log_prob"].shape == (P, 1, B)
    assert torch.isfinite(tr.nodes["z"]["log_prob"]).all()


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("flow", FLOW_KINDS)
def test_log_prob_of_a_fresh_value_is_the_change_of_variables(flow, K):
    guide = _guide(flow, K)
    ctx = torch.randn(C, dtype=torch.float64)
    q = guide(ctx)
    z = torch.randn(D, dtype=torch.float64)  # never sampled by the guide
    f = guide.transform(ctx)
    z0 = f.inv(z)
    # independent log-det: autograd Jacobian of the whole composed map at z0
    J = jacobian(lambda v: guide.transform(ctx)(v), z0.detach().clone())
    expected = guide.base(ctx).log_prob(z0) - torch.linalg.slogdet(J)[1]
    torch.testing.assert_close(q.log_prob(z), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(guide.transform(ctx)(z0.clone()), z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flow", FLOW_KINDS)
def test_every_parameter_trains(flow):
    guide = _guide(flow, K=2, dtype=torch.float32)
    ctx = torch.randn(7, C)
    q = guide(ctx)
    z = q.rsample()
    (z.pow(2).sum() + q.log_prob(z).sum()).backward()
    for name, p in guide.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match="flow must be one of"):
        FlowGuide(C, D, flow="maf")
    with pytest.raises(ValueError, match="num_flows"):
        FlowGuide(C, D, flow="planar", num_flows=0)
    guide = FlowGuide(C, D, flow="iaf")
    with pytest.raises(ValueError, match="context_dim=4"):
        guide(torch.randn(2, C + 1))


def test_svi_steps_with_a_flow_guide_reduce_the_loss():
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    guide_net = FlowGuide(2, D, flow="iaf", num_flows=2, hidden_dims=(8,))
    x = torch.randn(16, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[..., :2], 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("q", guide_net)
        with pyro.plate("data", x.shape[0]):
            guide_net.sample("z", x)

    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO(num_particles=8,
                                                            vectorize_particles=True))
    losses = [svi.step(x) for _ in range(60)]
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-10:]) < sum(losses[:10])
