"""Pyro twins of the EM models: their ELBOs against the exact EM log-likelihoods, SVI steps."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.optim import Adam

from pyro_seqlatent.em import LinearGaussianSSM
from pyro_seqlatent.models.em_twins import (
    EmptyGuide,
    GMMTwin,
    LGSSMGuide,
    LGSSMTwin,
    PPCAGuide,
    PPCATwin,
    raw_from_tril,
)


def test_gmm_twin_enumerated_elbo_is_the_exact_log_likelihood():
    x = torch.randn(50, 3) + torch.tensor([2.0, 0, 0]) * (torch.rand(50, 1) > 0.5)
    model = GMMTwin(x[:3].clone(), init_scale=1.5)
    with torch.no_grad():
        model.logits.copy_(torch.tensor([0.2, -0.3, 0.1]))
        model.raw_scale_tril.add_(0.1 * torch.randn(3, 3, 3))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, EmptyGuide(), x)
    exact = model.to_em().score_samples(x.double()).sum()
    assert abs(-loss - float(exact)) < 1e-3


def test_ppca_twin_elbo_is_tight_at_the_exact_posterior():
    torch.manual_seed(0)
    x = torch.randn(40, 5) @ torch.randn(5, 5)
    model, guide = PPCATwin(5, 2), PPCAGuide(5, 2)
    W, s2 = model.W.detach(), (2 * model.log_sigma.detach()).exp()
    M = W.T @ W + s2 * torch.eye(2)
    with torch.no_grad():  # exact posterior: mean M^-1 W^T (x - mu), covariance s2 M^-1
        guide.encoder.weight.copy_(torch.linalg.solve(M, W.T))
        guide.encoder.bias.copy_(-(torch.linalg.solve(M, W.T) @ model.mu))
        guide.raw_scale_tril.copy_(raw_from_tril(torch.linalg.cholesky(s2 * torch.linalg.inv(M))))
    # at the exact posterior the ELBO equals log p(x) for every sample (zero variance)
    elbo = -Trace_ELBO(num_particles=3).loss(model, guide, x)
    exact = float(model.to_em().score_samples(x.double()).sum())
    assert abs(elbo - exact) < 1e-4 * abs(exact)
    guide.encoder.bias.data.add_(1.0)  # a worse guide: strictly below, by the KL
    assert -Trace_ELBO(num_particles=50).loss(model, guide, x) < exact - 1.0


@pytest.mark.parametrize("which", ["gmm", "ppca", "lgssm"])
def test_svi_on_twins_raises_the_exact_log_likelihood(which):
    pyro.set_rng_seed(0)
    if which == "gmm":
        x = torch.cat([torch.randn(60, 2), torch.randn(60, 2) + 4])
        model, guide, elbo, args = GMMTwin(x[[0, 60]]), EmptyGuide(), TraceEnum_ELBO(
            max_plate_nesting=1), (x,)

        def exact():
            return model.to_em().score(x.double())
    elif which == "ppca":
        x = torch.randn(100, 2) @ torch.randn(2, 6) * 2 + 0.3 * torch.randn(100, 6)
        model, guide, elbo, args = PPCATwin(6, 2), PPCAGuide(6, 2), Trace_ELBO(), (x,)

        def exact():
            return model.to_em().score(x.double())
    else:
        truth = LinearGaussianSSM(1).set_params(A=[[0.9]], Q=[[0.2]], C=[[1.0], [0.5]],
                                                d=[0.0, 1.0], R=0.1 * torch.eye(2), mu0=[0.0],
                                                V0=[[1.0]])
        _, y = truth.sample(6, 12, torch.Generator().manual_seed(0))
        x = y.float()
        mask = torch.ones(6, 12, dtype=torch.bool)
        mask[0, 5] = False
        model, guide = LGSSMTwin(2, 1), LGSSMGuide(2, 1)
        elbo, args = Trace_ELBO(), (x, mask)

        def exact():
            return model.to_em().score(x.double(), mask)
    before = exact()
    svi = SVI(model, guide, Adam({"lr": 0.05}), elbo)
    for _ in range(60):
        svi.step(*args)
    assert exact() > before + 0.05


def test_em_vs_svi_comparison_runs_and_em_wins_on_synthetic_gmm(tmp_path):
    from pyro_seqlatent.experiments.em_vs_svi import run_all

    (res,) = run_all(tmp_path, models=("gmm",), datasets=("synthetic",), em_iters=30,
                     svi_steps=6, eval_every=3)
    assert res["em"]["iterations"] == 30 and res["svi"]["steps"] == 6
    assert res["em"]["final_loglik"] > res["svi"]["final_loglik"]
    assert (tmp_path / res["figure"]).exists() and (tmp_path / "table.md").exists()
    from pyro_seqlatent.registry import list_commands, list_demo_sections

    assert "em-vs-svi" in list_commands() and "em-vs-svi" in list_demo_sections()
