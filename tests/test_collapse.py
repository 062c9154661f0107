"""Posterior-collapse diagnostics (pyro_seqlatent.infer.collapse) against independent
computations: closed-form Gaussian KLs, Monte Carlo within its confidence interval, active
units of a guide with known means, and the collapse warning."""

from __future__ import annotations

import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.transforms import AffineTransform
from torch import nn

from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.infer import train
from pyro_seqlatent.infer.collapse import collapse_diagnostics
from pyro_seqlatent.models.vrnn import build_vrnn

D = 4


def gaussian_kl(m, s):
    """KL(N(m, s^2) || N(0, 1)) per element."""
    return -torch.log(s) + 0.5 * (s ** 2 + m ** 2 - 1.0)


class Model(nn.Module):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], D), 1.0).to_event(1))
            loc = z.sum(-1, keepdim=True).expand(*z.shape[:-1], x.shape[-1])
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


class Guide(nn.Module):
    """q(z|x) = N(loc(x), scale): dims 0, 1 follow the data, dims 2, 3 are constant.
    ``kind``: "normal" (closed-form KL), "affine" (element-wise transformed Normal: no
    registered KL, Monte Carlo per dimension), "joint" (an affine flow on the whole vector:
    no per-dimension density), "prior" (q = p: a collapsed latent)."""

    def __init__(self, kind="normal"):
        super().__init__()
        self.kind = kind
        self.shift = nn.Parameter(torch.zeros(()))  # 0 unless trained

    def params(self, x):
        loc = torch.stack([x[:, 0], 2.0 * x[:, 1], torch.full_like(x[:, 0], 0.7),
                           torch.full_like(x[:, 0], -0.3)], -1)
        scale = torch.tensor([0.5, 1.5, 0.8, 1.0]).expand_as(loc)
        if self.kind == "prior":
            return torch.zeros_like(loc) + self.shift, torch.ones_like(loc)
        return loc + self.shift, scale

    def distribution(self, x):
        loc, scale = self.params(x)
        if self.kind in ("normal", "prior"):
            return dist.Normal(loc, scale).to_event(1)
        if self.kind == "affine":
            base = dist.Normal(torch.zeros_like(loc), 1.0)
            return dist.TransformedDistribution(base, [AffineTransform(loc, scale)]).to_event(1)
        base = dist.Normal(torch.zeros_like(loc), 1.0).to_event(1)
        return dist.TransformedDistribution(base, [AffineTransform(loc, scale, event_dim=1)])

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.distribution(x))


def known_params(x):
    with torch.no_grad():
        return Guide().params(x)


def data(n=64, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def test_kl_per_dimension_equals_the_closed_form_gaussian_kl():
    x = data()
    diag = collapse_diagnostics(Model(), Guide("normal"), [x[:40], x[40:]])
    loc, scale = known_params(x)
    expected = gaussian_kl(loc, scale).mean(0)
    assert diag.analytic == {"z": True}
    assert torch.tensor(diag.kl_per_dim["z"]) == pytest.approx(expected.double(), abs=1e-5)
    assert diag.kl == pytest.approx(float(expected.sum()), abs=1e-5)
    assert diag.kl_per_step["z"] == pytest.approx([float(expected.sum())], abs=1e-5)
    assert diag.num_points == 64


def test_monte_carlo_kl_agrees_with_the_closed_form_within_its_confidence_interval():
    x = data(32)
    loc, scale = known_params(x)
    exact = gaussian_kl(loc, scale).mean(0)
    n_draws = 300
    # the spread of one draw's log q - log p, from independent draws
    z = loc + scale * torch.randn((2000, *loc.shape), generator=torch.Generator().manual_seed(1))
    term = (dist.Normal(loc, scale).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)).mean(1)
    se = term.std(0) / math.sqrt(n_draws)
    mc = collapse_diagnostics(Model(), Guide("affine"), [x], num_samples=n_draws)
    assert mc.analytic == {"z": False}
    assert (torch.tensor(mc.kl_per_dim["z"]).float() - exact).abs().le(4 * se).all()
    joint = collapse_diagnostics(Model(), Guide("joint"), [x], num_samples=n_draws)
    assert joint.kl_per_dim == {"z": None}  # a flow over the vector: no per-dimension density
    assert abs(joint.kl - float(exact.sum())) < 4 * float(term.sum(-1).std() / math.sqrt(n_draws))


def test_active_units_of_a_guide_with_known_means():
    x = data(200)
    loc, _ = known_params(x)
    diag = collapse_diagnostics(Model(), Guide("normal"), [x[:120], x[120:]])
    expected = loc.var(0)  # Cov_x(E_q[z_u]), the sample covariance over the 200 points
    assert torch.tensor(diag.activity["z"]) == pytest.approx(expected.double(), abs=1e-5)
    assert diag.active_units == {"z": 2} and diag.num_units == {"z": 4}
    # a flow has no .mean: E_q[z] from draws, their noise subtracted
    flow = collapse_diagnostics(Model(), Guide("joint"), [x], mean_samples=64)
    acts = torch.tensor(flow.activity["z"])
    assert flow.active_units == {"z": 2}
    assert acts[:2].float() == pytest.approx(expected[:2], rel=0.15)
    assert acts[2:].abs().max() < 0.01


def test_the_warning_fires_on_a_collapsed_latent_and_not_on_a_used_one():
    x = data()
    collapsed = collapse_diagnostics(Model(), Guide("prior"), [x])
    assert collapsed.kl == pytest.approx(0.0, abs=1e-6)
    assert collapsed.collapsed() and "posterior collapse" in collapsed.warning()
    used = collapse_diagnostics(Model(), Guide("normal"), [x])
    assert not used.collapsed() and used.warning() is None
    # one informative dimension is enough (the rule is "every dimension below the threshold")
    assert json.loads(json.dumps(used.record()))["collapsed"] is False


def _ragged():
    torch.manual_seed(0)
    return pad_collate([torch.rand(n, 6).round() for n in (4, 2, 3)])


@pytest.mark.parametrize("guide_kind", ["meanfield", "iaf"])
def test_vrnn_kl_per_step_matches_the_traces_and_counts_only_observed_steps(guide_kind):
    """Per step: the closed-form KL (mean field) or log q - log p at the draw (IAF, where no
    KL is registered), over the sequences observed at that step; computed here from the same
    draw's traces with torch's Independent KL / Pyro's masked log-densities."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    model, guide = build_vrnn(6, guide=guide_kind, z_dim=3, h_dim=5, feature_dim=4,
                              hidden_dim=8, num_components=3)
    batch = _ragged()
    diag = collapse_diagnostics(model, guide, [batch], seed=5)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(5)
        model.eval(), guide.eval()
        g = poutine.trace(guide).get_trace(**batch)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(**batch)
    mask = batch["mask"].float()
    steps = []
    for t in range(4):
        q, p = g.nodes[f"z_{t}"]["fn"], m.nodes[f"z_{t}"]["fn"]
        z = g.nodes[f"z_{t}"]["value"]
        if guide_kind == "meanfield":
            kl = _independent_kl(q, p)
        else:
            kl = q.log_prob(z) - p.log_prob(z)
        steps.append(float((kl * mask[:, t]).sum() / mask[:, t].sum()))
    assert diag.kl_per_step["z"] == pytest.approx(steps, rel=1e-4, abs=1e-6)
    assert diag.analytic == {"z": guide_kind == "meanfield"}
    assert (diag.kl_per_dim["z"] is None) == (guide_kind == "iaf")
    per_sequence = sum(s * float(mask[:, t].sum()) for t, s in enumerate(steps)) / 3
    assert diag.kl == pytest.approx(per_sequence, rel=1e-4)


def _independent_kl(q, p):
    def unmasked(d):
        while isinstance(d, dist.MaskedDistribution):
            d = d.base_dist
        return d
    q, p = unmasked(q), unmasked(p)
    return torch.distributions.kl_divergence(
        torch.distributions.Independent(torch.distributions.Normal(q.base_dist.loc,
                                                                   q.base_dist.scale), 1),
        torch.distributions.Independent(torch.distributions.Normal(p.base_dist.loc,
                                                                   p.base_dist.scale), 1))


class _Points(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_train_logs_the_diagnostics_at_validation_and_warns_when_the_latent_is_unused(tmp_path):
    x = data(40)
    from pyro_seqlatent.experiments.systems import run_summary

    with pytest.warns(UserWarning, match="posterior collapse"):
        collapsed = train(Model(), Guide("prior"), x, valid_data=x[:20], num_steps=4,
                          valid_every=2, collapse_every=1, batch_size=20, run_dir=tmp_path,
                          progress=False)
    summary = run_summary(collapsed)
    assert "posterior collapse" in summary["warning"]
    assert summary["collapse"]["active_units"] == {"z": 0}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "collapse" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert logged[-1]["collapse"]["collapsed"] is True
    assert logged[-1]["collapse"]["num_units"] == {"z": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = train(Model(), Guide("normal"), x, valid_data=x[:20], num_steps=2,
                       valid_every=2, collapse_every=1, batch_size=20, progress=False)
    assert result.history[-1]["collapse"]["active_units"] == {"z": 2}
    assert "warning" not in run_summary(result)
    with pytest.raises(ValueError, match="collapse_every"):
        train(Model(), Guide("normal"), x, num_steps=2, collapse_every=1, progress=False)


class _Steps(nn.Module):
    """50 steps z_t ~ N(0, 1) (model) and q(z_t) = N(shift, 1) (guide): KL per dimension and
    step shift^2 / 2."""

    def __init__(self, shift, guide):
        super().__init__()
        self.shift, self.guide = shift, guide

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            for t in range(50):
                loc = torch.full((x.shape[0], 2), self.shift if self.guide else 0.0)
                pyro.sample(f"z_{t}", dist.Normal(loc + 0.1 * x[:, :2] * self.guide, 1.0)
                            .to_event(1))


def test_a_sequence_latent_is_judged_per_step():
    """Summed over 50 steps a tiny KL per step exceeds the threshold; per step it does not."""
    x = data(30)
    tiny = collapse_diagnostics(_Steps(0.0, False), _Steps(0.04, True), [x])
    per_step = 0.5 * (0.04 + 0.1 * x[:, :2]) ** 2  # closed form, per data point and dim
    assert torch.tensor(tiny.kl_per_dim["z"]).float() == pytest.approx(
        50 * per_step.mean(0), rel=1e-4)
    assert min(tiny.kl_per_dim["z"]) > 0.01 > max(tiny.kl_per_dim_and_step()["z"])
    assert tiny.steps_per_point == {"z": 50.0}
    assert tiny.collapsed()
    used = collapse_diagnostics(_Steps(0.0, False), _Steps(0.5, True), [x])
    assert not used.collapsed()


def test_the_collapse_figure_draws_test_diagnostics_and_the_validation_history(tmp_path):
    from pyro_seqlatent.experiments.report import plot_collapse

    x = data(40)
    train(Model(), Guide("normal"), x, valid_data=x[:20], num_steps=4, valid_every=2,
          collapse_every=1, batch_size=20, run_dir=tmp_path, progress=False)
    diag = collapse_diagnostics(Model(), Guide("normal"), [x])
    assert plot_collapse(tmp_path, diag).stat().st_size > 0
    assert plot_collapse(tmp_path, out=tmp_path / "from_history.png").exists()
    empty = tmp_path / "no_latent"
    empty.mkdir()
    assert plot_collapse(empty) is None  # nothing logged, nothing given


def test_the_demo_report_gives_sequence_models_per_step_figures_in_the_anchors_unit():
    from pyro_seqlatent.experiments.report import _per_step_lines, per_step_figures
    from pyro_seqlatent.registry import get_model

    seqs = [torch.ones(3, 88), torch.ones(5, 88)]  # 8 scored steps in all
    metrics = {"num_points": 2, "elbo": -40.0, "log_marginal": -36.0}  # per sequence
    row = per_step_figures(seqs, get_model("vrnn"), metrics, {"dataset": "jsb"})
    assert row["test_steps"] == 8
    assert row["test_neg_elbo_per_step"] == pytest.approx(80.0 / 8)
    assert row["test_nll_per_step"] == pytest.approx(72.0 / 8)
    assert "6.87" in row["per_step_anchor"]
    assert per_step_figures(seqs, get_model("vae"), metrics, {}) == {}  # not a sequence model
    line = _per_step_lines([{"model": "vrnn", "test_points": 2, **row}])[-1]
    assert line.startswith("| vrnn | 2 | 8 | 10 | 9 |")


def test_the_vrnn_benchmark_figure2_draws_the_per_step_kl_of_an_iaf_guide(tmp_path):
    """It raised NotImplementedError (no KL(q||p) for a flow) before it used infer.collapse."""
    from types import SimpleNamespace

    from conftest import load_benchmark

    bench = load_benchmark("vrnn")
    model, guide = build_vrnn(6, guide="iaf", z_dim=3, h_dim=5, feature_dim=4, hidden_dim=8,
                              emission="gaussian")
    data = {"test": SimpleNamespace(sequences=[torch.randn(5, 6), torch.randn(7, 6)])}
    bench.figure2(model, guide, data, tmp_path / "fig2.png")
    assert (tmp_path / "fig2.png").stat().st_size > 0


def test_evaluate_reports_the_gap_between_the_is_log_likelihood_and_the_elbo():
    """A guide equal to the prior on a model whose posterior is not the prior: a positive gap,
    the mean of the per-point differences (a paired figure, with its own standard error)."""
    from pyro_seqlatent.infer import evaluate

    x = data(20) * 3.0
    out = evaluate(Model(), Guide("prior"), x, num_samples=200, batch_size=10)
    diff = out["log_marginal_per_point"] - out["elbo_per_point"]
    assert out["log_marginal_minus_elbo"] == pytest.approx(float(diff.mean()))
    assert out["log_marginal_minus_elbo_sem"] == pytest.approx(
        float(diff.std() / math.sqrt(20)))
    assert out["log_marginal_minus_elbo"] > 5 * out["log_marginal_minus_elbo_sem"] > 0


def test_the_diagnostics_change_nothing_a_run_computes_and_a_resume_may_turn_them_on(tmp_path):
    """The diagnostics draw from a forked RNG in eval mode: a run with them has the losses of a
    run without them, and resuming a run with ``collapse_every`` set is not refused."""
    x = data(40)

    def run(folder, steps, resume=False, **extra):
        torch.manual_seed(0)
        pyro.clear_param_store()
        return train(Model(), _Trained(), x, valid_data=x[:20], num_steps=steps, valid_every=2,
                     batch_size=10, run_dir=folder, resume=resume, checkpoint_every=2,
                     progress=False, **extra)

    plain = [r["loss"] for r in run(tmp_path / "plain", 6).history]
    on = run(tmp_path / "on", 6, collapse_every=1).history
    assert [r["loss"] for r in on] == plain and "collapse" in on[-1]
    run(tmp_path / "resumed", 4)
    resumed = run(tmp_path / "resumed", 6, resume=True, collapse_every=1).history
    assert [r["loss"] for r in resumed] == plain and "collapse" in resumed[-1]


class _Trained(Guide):
    """The data-dependent guide with a trainable shift and scale (the loss moves)."""

    def __init__(self):
        super().__init__("normal")
        self.log_scale = nn.Parameter(torch.zeros(D))

    def distribution(self, x):
        loc, scale = self.params(x)
        return dist.Normal(loc, scale * self.log_scale.exp()).to_event(1)


class _UserVAE(nn.Module):
    """A user's VAE-shaped model (the own-model example's shape), broadcasting over particles."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(D, 6)

    def forward(self, x):
        with pyro.plate("data", x.shape[-2], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


@pytest.mark.parametrize("flow", [None, "iaf"])
def test_user_models_with_autoguides_get_the_diagnostics(flow):
    """AutoAmortized (mean field: closed-form KL per dimension; IAF: Monte Carlo, no per-dim
    figure), checked against the same draw's traces."""
    from pyro_seqlatent.guides import AutoAmortized

    torch.manual_seed(0)
    pyro.clear_param_store()
    x = torch.randint(0, 2, (12, 6)).float()
    model = _UserVAE()
    guide = AutoAmortized(model, nn.Linear(6, 8), flow=flow, num_flows=1, hidden_dims=(8,))
    guide(x)  # builds its lazy parts
    diag = collapse_diagnostics(model, guide, [x], seed=3)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        g = poutine.trace(guide).get_trace(x)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(x)
    q, p, z = g.nodes["z"]["fn"], m.nodes["z"]["fn"], g.nodes["z"]["value"]
    if flow is None:
        expected = torch.distributions.kl_divergence(q, p).mean()
        assert sum(diag.kl_per_dim["z"]) == pytest.approx(float(expected), rel=1e-5)
    else:
        expected = (q.log_prob(z) - p.log_prob(z)).mean()
        assert diag.kl_per_dim["z"] is None
    assert diag.kl == pytest.approx(float(expected), rel=1e-5)
    assert diag.num_units == {"z": D} and diag.num_points == 12
