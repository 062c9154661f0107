"""Forecasts of any sequence model/guide that follows the forecast protocol
(``pyro_seqlatent.models.sequence_forecast``), and the CRPS against independent computations."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_seqlatent.models.forecast_metrics import crps
from pyro_seqlatent.models.sequence_forecast import (
    check_forecast_protocol,
    forecast,
    forecast_bands,
    forecast_scores,
    plot_forecast,
    split_for_forecast,
)
from pyro_seqlatent.models.vrnn import build_vrnn
from pyro_seqlatent.models.vrnn import forecast as vrnn_forecast


class LinearSSM(nn.Module):
    """A user's sequence model: z_t ~ N(a z_{t-1}, 1), x_t ~ N(W z_t, 0.3^2), written as a Pyro
    user would, following the forecast protocol (it reads the mask, as the issue's DMM did)."""

    def __init__(self, z_dim=2, x_dim=3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.9))
        self.emit = nn.Linear(z_dim, x_dim)
        self.z_dim = z_dim

    def forward(self, x, mask, horizon=0):
        B, T, _ = x.shape
        lengths = mask.sum(-1)  # AttributeError on mask=None before the fix
        assert lengths.shape == (B,)
        z = x.new_zeros(B, self.z_dim)
        with pyro.plate("data", B, dim=-1):
            for t in pyro.markov(range(T)):
                z = pyro.sample(f"z_{t}", dist.Normal(self.a * z, 1.0).to_event(1)
                                .mask(mask[:, t]))
                pyro.sample(f"x_{t}", dist.Normal(self.emit(z), 0.3).to_event(1)
                            .mask(mask[:, t]), obs=x[:, t])
            future = []
            for t in pyro.markov(range(T, T + horizon)):
                z = pyro.sample(f"z_{t}", dist.Normal(self.a * z, 1.0).to_event(1))
                future.append(pyro.sample(f"x_{t}", dist.Normal(self.emit(z), 0.3).to_event(1)))
        if not future:
            return x
        gen = torch.stack(future, -2)
        return torch.cat([x.expand(gen.shape[:-2] + x.shape[-2:]), gen], -2)


class StepGuide(nn.Module):
    def __init__(self, z_dim=2, x_dim=3):
        super().__init__()
        self.net = nn.Linear(x_dim, 2 * z_dim)

    def forward(self, x, mask):
        assert mask.sum() >= 0  # the guide of the issue: mask=None failed here
        with pyro.plate("data", x.shape[0], dim=-1):
            for t in pyro.markov(range(x.shape[1])):
                loc, raw = self.net(x[:, t]).chunk(2, -1)
                pyro.sample(f"z_{t}", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3)
                            .to_event(1).mask(mask[:, t]))


def test_user_sequence_model_forecasts_without_a_mask():
    torch.manual_seed(0)
    model, guide = LinearSSM(), StepGuide()
    prefix = torch.randn(4, 5, 3)
    out = forecast(model, guide, prefix, horizon=6, num_samples=7)
    assert out.shape == (7, 4, 6, 3) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])
    looped = forecast(model, guide, prefix, horizon=6, num_samples=3, vectorize=False)
    assert looped.shape == (3, 4, 6, 3)
    partial = torch.ones(4, 5, dtype=torch.bool)
    partial[0, 3:] = False
    assert forecast(model, guide, prefix, 2, 2, mask=partial).shape == (2, 4, 2, 3)


def test_protocol_errors_name_what_is_missing():
    model, guide = LinearSSM(), StepGuide()

    def no_horizon(x, mask):
        return x

    def one_arg_guide(x):
        pass

    with pytest.raises(TypeError, match="horizon"):
        check_forecast_protocol(no_horizon, guide)
    with pytest.raises(TypeError, match=r"guide must accept guide\(x, mask\)"):
        forecast(model, one_arg_guide, torch.zeros(1, 2, 3), 1)
    with pytest.raises(TypeError, match="the model must be callable"):
        forecast("dmm", guide, torch.zeros(1, 2, 3), 1)
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        forecast(model, guide, torch.zeros(1, 2, 3), 0)
    with pytest.raises(ValueError, match=r"prefix must be a \(B, P, D\) tensor"):
        forecast(model, guide, torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match=r"mask must be a \(B, P\)"):
        forecast(model, guide, torch.zeros(1, 2, 3), 1, mask=torch.ones(2, 2, dtype=bool))

    def prefix_only(x, mask, horizon=0):  # ignores the horizon
        return x

    with pytest.raises(ValueError, match=r"must return the observed prefix followed by the H"):
        forecast(prefix_only, lambda x, mask: None, torch.zeros(1, 2, 3), 4)


def test_a_model_that_does_not_broadcast_is_told_to_loop():
    class CellModel(LinearSSM):  # nn.GRUCell takes (B, F) only
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(3, 2)

        def forward(self, x, mask, horizon=0):
            h = x.new_zeros(x.shape[0], 2)
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z_0", dist.Normal(h, 1.0).to_event(1))
                h = self.cell(x[:, 0], z)
                new = pyro.sample(f"x_{x.shape[1]}", dist.Normal(h @ torch.ones(2, 3), 1.0)
                                  .to_event(1))
            return torch.cat([x, new.unsqueeze(-2)], -2)

    class OneStepGuide(nn.Module):
        def forward(self, x, mask):
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z_0", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    model, guide, prefix = CellModel(), OneStepGuide(), torch.randn(2, 3, 3)
    with pytest.raises((RuntimeError, ValueError), match="vectorize=False"):
        forecast(model, guide, prefix, 1, num_samples=4)
    assert forecast(model, guide, prefix, 1, num_samples=4, vectorize=False).shape == (4, 2, 1, 3)


def _gaussian_crps(mu, sigma, y):
    """Closed form of the CRPS of N(mu, sigma^2) at y (Gneiting & Raftery 2007, eq. 21)."""
    z = (y - mu) / sigma
    normal = torch.distributions.Normal(0.0, 1.0)
    return sigma * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp()
                    - 1 / math.sqrt(math.pi))


def test_crps_matches_the_gaussian_closed_form():
    torch.manual_seed(1)
    mu = torch.tensor([0.0, 1.0, -2.0, 0.5])
    sigma = torch.tensor([1.0, 0.5, 2.0, 0.1])
    y = torch.tensor([0.3, -0.4, 1.0, 0.5])
    samples = (mu + sigma * torch.randn(200_000, 4)).double()
    per_entry = crps(samples, y.double(), reduce=False)
    exact = _gaussian_crps(mu.double(), sigma.double(), y.double())
    # the empirical CRPS is unbiased up to O(1/S) with sd O(sigma / sqrt(S))
    assert torch.allclose(per_entry, exact, atol=0.01, rtol=0.0)
    assert crps(samples, y.double()) == pytest.approx(float(exact.mean()), abs=0.005)


def test_crps_equals_the_pairwise_formula_and_respects_the_mask():
    torch.manual_seed(2)
    samples, y = torch.randn(9, 3, 2).double(), torch.randn(3, 2).double()
    brute = ((samples - y).abs().mean(0)
             - 0.5 * (samples[:, None] - samples[None]).abs().mean((0, 1)))
    assert torch.allclose(crps(samples, y, reduce=False), brute, atol=1e-12)
    mask = torch.tensor([True, False, True])[:, None]
    assert crps(samples, y, mask) == pytest.approx(float(brute[[0, 2]].mean()), abs=1e-12)
    assert crps(samples[:1], y) == pytest.approx(float((samples[0] - y).abs().mean()))
    with pytest.raises(ValueError, match=r"samples must have shape \(S, \*truth.shape\)"):
        crps(samples, y[:2])


class Persistence(nn.Module):
    """Continues every sequence with its last value (no latents): a deterministic forecast."""

    def forward(self, x, mask, horizon=0):
        return torch.cat([x, x[:, -1:].expand(-1, horizon, -1)], -2)


def test_forecast_scores_of_a_perfect_forecast_are_zero():
    seqs = [torch.full((12, 2), float(v)) for v in range(3)] + [torch.ones(6, 2)]
    out = forecast_scores(Persistence(), lambda x, mask: None, seqs, prefix_length=5,
                          horizon=4, num_samples=3)
    assert out["crps"] == pytest.approx(0.0) and out["mae_of_mean"] == pytest.approx(0.0)
    assert out["coverage_90"] == pytest.approx(1.0) and out["num_sequences"] == 4
    shifted = [s + 1.0 for s in seqs]  # truth 1 above the forecast: CRPS = |error| = 1
    _, truth, truth_mask = split_for_forecast(shifted, 5, 4)
    assert truth_mask.sum(-1).tolist() == [4, 4, 4, 1]  # the short sequence scores 1 step
    out = forecast_scores(Persistence(), lambda x, mask: None,
                          [torch.cat([s[:5], s[5:] + 1]) for s in seqs], 5, 4, num_samples=2)
    assert out["crps"] == pytest.approx(1.0) and out["crps_by_step"] == pytest.approx([1.0] * 4)


def test_vrnn_bands_scores_and_figure(tmp_path):
    torch.manual_seed(3)
    model, guide = build_vrnn(5, emission="gaussian", z_dim=2, h_dim=6, feature_dim=4,
                              hidden_dim=8)
    prefix = torch.randn(2, 4, 5)
    cont = vrnn_forecast(model, guide, prefix, horizon=3, num_samples=4)
    assert cont.shape == (4, 2, 3, 5)
    bands = forecast_bands(model, guide, prefix, horizon=3, num_samples=50)
    assert set(bands) == {"samples", "mean", "lower", "upper"}
    assert bands["lower"].shape == (2, 3, 5)
    assert (bands["lower"] <= bands["upper"]).all()
    seqs = [torch.randn(n, 5) for n in (9, 10, 3, 12)]
    scores = forecast_scores(model, guide, seqs, prefix_length=4, horizon=3, num_samples=20,
                             batch_size=2)
    assert scores["num_sequences"] == 3 and math.isfinite(scores["crps"]) and scores["crps"] > 0
    assert len(scores["crps_by_step"]) == 3
    path = plot_forecast(model, guide, seqs, 4, 5, tmp_path / "f.png", num_samples=20)
    assert path.stat().st_size > 1000


def test_crps_scores_latent_ode_forecasts():
    from pyro_seqlatent.models.latent_ode import LatentODEGuide, LatentODEModel
    from pyro_seqlatent.models.latent_ode import forecast as ode_forecast

    torch.manual_seed(4)
    model, guide = LatentODEModel(1, 2, (8,)), LatentODEGuide(1, 2, hidden_dim=6)
    t = torch.linspace(0.0, 1.0, 6)
    batch = {"times": t, "values": torch.randn(2, 6, 1), "mask": torch.ones(2, 6, 1),
             "obs_mask": torch.ones(2, 6, 1)}
    out = ode_forecast(model, guide, batch, num_samples=5)
    score = crps(out["samples"], batch["values"], batch["mask"])
    assert math.isfinite(score) and score > 0
