"""Flows from other libraries (Pyro's splines, Pyro transform modules, zuko) through ``flow=``:
the same log-det-vs-autograd-Jacobian and inverse tests as ours (``test_transforms``'s own test
functions, run on the new kinds), every entry point that takes ``flow=``, and the estimators'
refusal of a flow without an inverse."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as PT
import pytest
import test_transforms as base
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_seqlatent.guides import AutoAmortized, AutoFlow, FlowGuide
from pyro_seqlatent.infer.estimators import make_estimator
from pyro_seqlatent.models.flow_density import FlowDensity
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.transforms.foreign import (
    FLOW_NAMES,
    build_conditional_flow,
    build_flow,
    is_zuko_flow,
)

try:
    import zuko
except ImportError:  # an optional extra: the zuko kinds are skipped, the rest runs
    zuko = None

needs_zuko = pytest.mark.skipif(zuko is None, reason="zuko not installed (pip install .[zuko])")
C = base.CONTEXT_DIM


def _zuko(ctor, conditional=False):
    """A zuko flow's transform as a torch Transform (zuko's goes data -> noise; any bijection
    does for these tests), randomized like ours."""
    def build(D, scale=0.4):
        flow = base._randomize(ctor(D).double(), scale)
        if not conditional:
            return flow, lambda: flow().transform
        ctx = torch.randn(C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        return flow, lambda: flow(ctx).transform
    return build


FOREIGN = {
    "spline": base._plain(lambda D: build_flow("spline", D, 2, (16,))),
    "pyro_spline_coupling": base._plain(lambda D: PT.spline_coupling(D, hidden_dims=[16])),
    "pyro_affine_coupling_factory": base._plain(
        lambda D: build_flow(functools.partial(PT.affine_coupling, hidden_dims=[16]), D)),
    "cond_spline": base._conditional(
        lambda D, C: build_conditional_flow("spline", D, C, 2, (16,))),
    "cond_pyro_affine_coupling": base._conditional(
        lambda D, C: PT.conditional_affine_coupling(D, C, hidden_dims=[16])),
}
ZUKO = {
    "zuko_nsf": _zuko(lambda D: zuko.flows.NSF(D, hidden_features=(16,))),
    "zuko_maf": _zuko(lambda D: zuko.flows.MAF(D, hidden_features=(16,))),
    "cond_zuko_nsf": _zuko(lambda D: zuko.flows.NSF(D, C, hidden_features=(16,)), True),
}
KINDS = sorted(FOREIGN) + [pytest.param(k, marks=needs_zuko) for k in sorted(ZUKO)]


@pytest.fixture
def foreign_flows(monkeypatch):
    for name, build in {**FOREIGN, **ZUKO}.items():
        monkeypatch.setitem(base.FLOWS, name, build)


@pytest.mark.parametrize("D", base.DIMS)
@pytest.mark.parametrize("name", KINDS)
def test_log_det_matches_autograd_jacobian(name, D, foreign_flows):
    base.test_log_det_matches_autograd_jacobian(name, D)


@pytest.mark.parametrize("D", base.DIMS)
@pytest.mark.parametrize("name", KINDS)
def test_round_trips_bypassing_the_cache(name, D, foreign_flows):
    base.test_round_trips_bypassing_the_cache(name, D)


def test_flow_names_and_bad_arguments():
    assert FLOW_NAMES[-1] == "spline" and "iaf" in FLOW_NAMES
    with pytest.raises(ValueError, match="flow must be one of"):
        build_flow("glow", 3)
    with pytest.raises(ValueError, match="flow must be one of"):
        FlowGuide(4, 3, flow="glow")
    with pytest.raises(TypeError, match="is conditional"):
        build_flow(PT.conditional_spline_autoregressive(3, 2), 3)
    with pytest.raises(TypeError, match="is not conditional"):
        FlowGuide(4, 3, flow=PT.spline_autoregressive(3))
    with pytest.raises(TypeError, match="factory returned"):
        FlowGuide(4, 3, flow=lambda d, c: "nope")
    with pytest.raises(TypeError, match="not a flow"):
        FlowGuide(4, 3, flow=nn.Linear(3, 3))
    with pytest.raises(ValueError, match="num_flows"):
        build_flow("spline", 3, num_flows=0)


def _conditional_kinds():
    kinds = {"spline": "spline",
             "pyro_module": PT.conditional_spline_autoregressive(3, 4, hidden_dims=[8]),
             "pyro_factory": lambda d, c: PT.conditional_affine_coupling(d, c, [8])}
    if zuko is not None:
        kinds["zuko"] = zuko.flows.NSF(3, 4, hidden_features=(8,))
        kinds["zuko_factory"] = functools.partial(zuko.flows.MAF, hidden_features=(8,))
    return kinds


@pytest.mark.parametrize("kind", sorted(_conditional_kinds()))
def test_flow_guide_takes_any_conditional_flow(kind):
    flow = _conditional_kinds()[kind]
    guide = FlowGuide(4, 3, flow=flow, num_flows=2)
    assert guide.is_zuko == kind.startswith("zuko")
    ctx = torch.randn(6, 4)
    q = guide(ctx)
    z = q(torch.Size())  # as pyro.sample draws it
    assert z.shape == (6, 3) and q.log_prob(z).shape == (6,)
    # log q of a value it did not sample (a fresh tensor) agrees with the draw's own score
    torch.testing.assert_close(q.log_prob(z.detach().clone()), q.log_prob(z), atol=1e-4,
                               rtol=1e-4)
    (-q.log_prob(z).sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())
    with pyro.plate("data", 6):
        trace = pyro.poutine.trace(guide.sample).get_trace("z", ctx)
    assert trace.nodes["z"]["value"].shape == (6, 3)


def _plain_kinds():
    kinds = {"spline": "spline",
             "pyro_factory": functools.partial(PT.iterated, 2, PT.spline_coupling)}
    if zuko is not None:
        kinds["zuko_factory"] = functools.partial(zuko.flows.NSF, hidden_features=(8,))
    return kinds


def _regression(y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(w.sum(-1, keepdim=True), 0.5), obs=y)


@pytest.mark.parametrize("kind", sorted(_plain_kinds()))
def test_autoflow_and_autoamortized_take_any_flow(kind):
    y = 1.0 + 0.5 * torch.randn(20)
    guide = AutoFlow(_regression, flow=_plain_kinds()[kind])
    svi = SVI(_regression, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(20)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert guide.median(y)["w"].shape == (2,)
    assert guide.is_zuko == kind.startswith("zuko")

    conditional = _conditional_kinds()
    flow = {"spline": "spline", "pyro_factory": conditional["pyro_factory"],
            "zuko_factory": conditional.get("zuko_factory")}[kind]
    decoder = MLP(3, (8,), 10)

    def vae(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    x = (torch.rand(16, 10) < 0.4).float()
    amortized = AutoAmortized(vae, nn.Sequential(MLP(10, (), 4), nn.ReLU()), flow=flow)
    svi = SVI(vae, amortized, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert all(torch.isfinite(torch.tensor(svi.step(x))) for _ in range(5))
    assert amortized.local_guides[0].is_zuko == kind.startswith("zuko")


def test_flow_density_takes_spline_and_a_pyro_module():
    x = torch.rand(8, 4) * 0.9 + 0.05
    for flow in ("spline", PT.spline_coupling(4, hidden_dims=[8])):
        model = FlowDensity(4, flow=flow, num_couplings=2, hidden_dims=(8,))
        lp = model.distribution().log_prob(x)
        assert lp.shape == (8,) and torch.isfinite(lp).all()
        assert sum(p.numel() for p in model.parameters()) > 0


@needs_zuko
def test_is_zuko_flow():
    assert is_zuko_flow(zuko.flows.MAF(3)) and not is_zuko_flow(PT.spline_autoregressive(3))


# ----------------------------------------------------------------------------- estimators


def _guide_pair(flow):
    site = FlowGuide(2, 2, flow=flow, num_flows=1)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("site", site)
        with pyro.plate("data", x.shape[0]):
            site.sample("z", x)

    return model, guide


@pytest.mark.parametrize("estimator", ["score", "stl", "dreg"])
def test_estimators_refuse_a_flow_without_an_inverse(estimator):
    model, guide = _guide_pair(lambda d, c: PT.conditional_planar(d, c))  # Pyro's: no inverse
    x = torch.randn(5, 2)
    elbo = make_estimator(estimator)
    with pytest.raises(ValueError, match="has no inverse.*invertible flow"):
        elbo.loss_and_grads(model, guide, x)
    # the same guide trains by the pathwise estimator
    assert torch.isfinite(torch.tensor(make_estimator("reparam").loss_and_grads(model, guide, x)))


@pytest.mark.parametrize("flow", ["spline", pytest.param("zuko", marks=needs_zuko)])
@pytest.mark.parametrize("estimator", ["score", "stl"])
def test_estimators_accept_foreign_invertible_flows(flow, estimator):
    kind = zuko.flows.NSF(2, 2, hidden_features=(8,)) if flow == "zuko" else flow
    model, guide = _guide_pair(kind)
    loss = make_estimator(estimator).loss_and_grads(model, guide, torch.randn(5, 2))
    assert torch.isfinite(torch.tensor(loss))


def test_docs_snippet_runs(capsys):
    page = (Path(__file__).resolve().parents[1] / "docs" / "flows.md").read_text()
    section = page.split("## Flows from other libraries", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    exec(compile(code, "docs/flows.md", "exec"), {})
    out = capsys.readouterr().out
    assert "median w" in out and "torch.Size([5, 3])" in out
