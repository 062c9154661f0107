"""The estimator lab's default run completes on a continuous, a flow-guided and a discrete model:
estimators that do not apply are listed with the reason, silent equivalences are noted, and a
gradient that is identically zero or not finite is flagged and never ranked, in tables and
figures."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyro
import pytest
import torch
from test_estimators import LinearGaussian2, _linear_flow, _normal_normal
from test_estimators_discrete import chain_case, mixture_case
from torch import nn
from torch.utils.data import TensorDataset

from pyro_seqlatent.guides import FlowGuide
from pyro_seqlatent.infer.estimators import (
    ESTIMATORS,
    GradientStats,
    GroupStats,
    compare_estimators,
    compare_training,
    write_report,
)
from pyro_seqlatent.infer.estimators_report import (
    _bar_values,
    _log_bars,
    plot_stats,
    stats_table,
)

REPARAM_ONLY = {n for n, s in ESTIMATORS.items() if s.sites == "reparameterizable"}
DISCRETE_ONLY = {n for n, s in ESTIMATORS.items() if s.sites == "discrete"}


def test_default_lab_on_a_continuous_model(tmp_path):
    model, guide, x = _normal_normal()
    res = compare_estimators(model, guide, x, num_draws=5, num_particles=3, warmup=2)
    assert set(res) == set(ESTIMATORS) - DISCRETE_ONLY
    assert set(res.skipped) == DISCRETE_ONLY
    assert "vimco would equal iwae" in res.skipped["vimco"]
    assert not any(res.notes.values())  # the analytic KL is registered, nothing is silent
    text = write_report(tmp_path, "t", res).read_text()
    assert "### Not run" in text and "| enum | every guide site is reparameterizable" in text


def test_default_lab_on_a_flow_guided_model_notes_the_monte_carlo_kl(tmp_path):
    model = LinearGaussian2()
    site = FlowGuide(3, 2, flow="iaf", num_flows=1)

    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.site = site

        def forward(self, x):
            with pyro.plate("data", x.shape[-2]):
                return self.site.sample("z", x)

    _, _, x = _linear_flow()
    res = compare_estimators(model, Guide(), x, num_draws=4, num_particles=2, warmup=2)
    assert {"reparam", "analytic_kl", "score", "stl", "iwae", "dreg"} <= set(res)
    assert any("Monte-Carlo KL at 'z'" in n for n in res.notes["analytic_kl"])
    text = write_report(tmp_path, "flow", res).read_text()
    assert "Monte-Carlo KL" in text


@pytest.mark.parametrize("case", ["mixture", "chain"])
def test_default_lab_on_a_discrete_model(tmp_path, case):
    model, guide, x = mixture_case() if case == "mixture" else chain_case()
    res = compare_estimators(model, guide, x, num_draws=4, num_particles=3, warmup=2)
    assert set(res.skipped) >= REPARAM_ONLY  # analytic_kl, stl, iwae, dreg: with the reason
    assert "identically zero guide gradient" in res.skipped["iwae"]
    assert {"reparam", "score", "vimco", "reinforce_loo", "enum"} <= set(res)
    assert any("same estimator" in n for n in res.notes["reparam"])
    if case == "mixture":  # an integer Categorical has no relaxation
        assert "OneHotCategorical" in res.skipped["concrete"]
    else:
        assert "concrete" in res and any("biased" in n for n in res.notes["concrete"])
    assert res["enum"].groups["guide"].flag == "exact"
    text = write_report(tmp_path, case, res).read_text()
    assert "Against exact enumeration" in text and "| iwae |" in text
    assert (tmp_path / "variance_snr.png").stat().st_size > 1000


def test_training_lab_on_a_discrete_model_skips_what_does_not_apply(tmp_path):
    model, guide, x = mixture_case()
    data = TensorDataset(x.repeat(2))
    curves = compare_training(lambda: mixture_case()[:2], data, (x,), ["reparam", "iwae", "vimco"],
                              num_steps=4, eval_every=2, num_particles=3, batch_size=4)
    assert set(curves) == {"reparam", "vimco"} and "iwae" in curves.skipped
    assert all(math.isfinite(c.elbo[-1]) for c in curves.values())


def _stats(mean, var, n=10):
    g = GroupStats("guide", n, torch.tensor(mean), torch.tensor(var))
    return GradientStats({"guide": g}, 0.0, 0.0, 1e-3, n)


def test_zero_and_non_finite_gradients_are_flagged_never_ranked(tmp_path):
    stats = {"reparam": _stats([1.0, -2.0], [1.0, 4.0]),
             "iwae": _stats([0.0, 0.0], [0.0, 0.0]),
             "broken": _stats([math.nan, 1.0], [1.0, 1.0]),
             "enum": _stats([1.0, -2.0], [0.0, 0.0])}
    assert [stats[n].groups["guide"].flag for n in stats] == [None, "zero gradient",
                                                              "non-finite", "exact"]
    rows = {line.split("|")[1].strip(): line for line in stats_table(stats).splitlines()[2:]}
    assert "**zero gradient**" in rows["iwae"] and "inf" not in rows["iwae"]
    assert rows["iwae"].count("—") >= 4  # no ratio, no SNRs
    assert "**non-finite**" in rows["broken"] and "nan" not in rows["broken"].split("|")[5]
    assert "∞ (exact)" in rows["enum"]
    assert plot_stats(stats, tmp_path / "f.png").stat().st_size > 1000
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in ("mean_variance", "median_snr"):
        values, labels = _bar_values(stats, "guide", key)
        assert labels[1:3] == ["zero gradient", "non-finite"]
        fig, ax = plt.subplots()
        _log_bars(ax, list(stats), values, labels, "red", key)
        lo, hi = ax.get_ylim()
        plt.close(fig)
        # the log axis spans the finite values (variance 1-4, SNR ~1), not 1e-300 .. inf
        assert 1e-3 < lo and hi < 1e3, (key, lo, hi)


def test_a_biased_estimators_bars_are_hatched_and_named(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = {"reparam": _stats([1.0, -2.0], [1.0, 4.0]), "concrete": _stats([1.0, 2.0],
                                                                           [0.5, 0.5])}
    stats["concrete"].extra["biased"] = True
    fig, ax = plt.subplots()
    values, labels = _bar_values(stats, "guide", "mean_variance")
    _log_bars(ax, ["reparam", "concrete (biased)"], values, labels, "red", "v", [False, True])
    assert [bar.get_hatch() for bar in ax.patches] == [None, "//"]
    plt.close(fig)
    # plot_stats names and hatches it in every panel
    from pyro_seqlatent.infer import estimators_report

    seen = []
    monkeypatch.setattr(estimators_report, "_log_bars",
                        lambda ax, names, *a: seen.append((names, a[-1])))
    estimators_report.plot_stats(stats, tmp_path / "f.png")
    assert seen and all(names == ["reparam", "concrete (biased)"] and biased == [False, True]
                        for names, biased in seen)


ROOT = Path(__file__).resolve().parent.parent


def test_discrete_example_runs_and_agrees_with_the_exact_gradient(tmp_path):
    spec = importlib.util.spec_from_file_location("discrete_estimators",
                                                  ROOT / "examples" / "discrete_estimators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--quick", "--out", str(tmp_path)])
    assert {"analytic_kl", "stl", "iwae", "dreg", "concrete"} == set(out["skipped"])
    assert out["checks"]["enum"]["relative_error"] < 1e-4
    for name in ("score", "score_avg_baseline", "score_nn_baseline", "vimco", "reinforce_loo"):
        assert out["checks"][name]["max_z"] < 4.0, (name, out["checks"][name])
    assert all(v > out["initial_elbo"] + 0.5 for v in out["trained"].values()), out
    assert (tmp_path / "estimators.md").exists()


def test_compare_estimators_cli_on_a_discrete_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from pyro_seqlatent.cli import main

    out = tmp_path / "report"
    code = main(["compare-estimators", "--pair", "examples.discrete_estimators:make_pair",
                 "--option", "n=40", "--estimators", "reparam,iwae,vimco,enum",
                 "--num-draws", "5", "--batch-size", "20", "--pretrain-steps", "3",
                 "--train-steps", "4", "--eval-every", "2", "--num-particles", "3",
                 "--out", str(out)])
    assert code == 0
    text = (out / "estimators.md").read_text()
    assert "| iwae | not reparameterizable" in text and "| vimco | guide |" in text
    assert "| enum | guide |" in text and "exact" in text
    assert (out / "elbo_curves.png").exists()
