"""The parameter-free baselines of the Latent ODE tables (linear interpolation and
last-value-carried-forward, pyro_seqlatent.models.forecast_metrics) on hand-computed cases:
per variable, per series, on each series' own irregular times, reading only observed values."""

from __future__ import annotations

import pytest
import torch

from pyro_seqlatent.data.irregular import union_grid_collate
from pyro_seqlatent.models.forecast_metrics import (
    baseline_mse,
    linear_interp_predict,
    locf_predict,
)

NAN = float("nan")


def one_series():
    """Times 0, 1, 3, 4, 6; variable 0 observed at t=1 (2.0) and t=4 (6.0), NaN elsewhere (how
    real data marks missing values); variable 1 observed only at t=3 (-1.0); variable 2 never."""
    times = torch.tensor([0.0, 1.0, 3.0, 4.0, 6.0])
    values = torch.full((1, 5, 3), NAN)
    obs = torch.zeros(1, 5, 3)
    values[0, 1, 0], values[0, 3, 0], obs[0, 1, 0], obs[0, 3, 0] = 2.0, 6.0, 1, 1
    values[0, 2, 1], obs[0, 2, 1] = -1.0, 1
    return times, values, obs


def test_linear_interpolation_by_hand():
    times, values, obs = one_series()
    pred = linear_interp_predict(values, obs, times)[0]
    # variable 0: held before t=1, 2 + (3 - 1) / (4 - 1) * (6 - 2) at t=3, held after t=4
    assert pred[:, 0].tolist() == pytest.approx([2.0, 2.0, 2.0 + 8.0 / 3.0, 6.0, 6.0])
    assert pred[:, 1].tolist() == [-1.0] * 5  # one observation: constant
    assert pred[:, 2].tolist() == [0.0] * 5  # never observed: 0
    assert not pred.isnan().any()
    # the same with per-series times (B, N) as padded_collate gives them
    assert torch.equal(linear_interp_predict(values, obs, times[None])[0], pred)


def test_locf_by_hand():
    _, values, obs = one_series()
    pred = locf_predict(values, obs)[0]
    assert pred[:, 0].tolist() == [2.0, 2.0, 2.0, 6.0, 6.0]  # first value back-filled
    assert pred[:, 1].tolist() == [-1.0] * 5
    assert pred[:, 2].tolist() == [0.0] * 5
    assert not pred.isnan().any()


def test_each_series_uses_its_own_times_and_observations_on_a_union_grid():
    # A: times 0, 1, 2, observed at 0 (0.0) and 2 (4.0), scored at 1
    # B: times 0.5, 1.5, observed at 0.5 (10.0), scored at 1.5
    a = {"times": torch.tensor([0.0, 1.0, 2.0]), "values": torch.tensor([[0.0], [9.0], [4.0]]),
         "mask": torch.tensor([[0.0], [1.0], [0.0]]),
         "obs_mask": torch.tensor([[1.0], [0.0], [1.0]])}
    b = {"times": torch.tensor([0.5, 1.5]), "values": torch.tensor([[10.0], [7.0]]),
         "mask": torch.tensor([[0.0], [1.0]]), "obs_mask": torch.tensor([[1.0], [0.0]])}
    batch = union_grid_collate([a, b])  # grid 0, 0.5, 1, 1.5, 2
    assert batch["times"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    lin = linear_interp_predict(batch["values"], batch["obs_mask"], batch["times"])
    locf = locf_predict(batch["values"], batch["obs_mask"])
    assert lin[0, 2, 0] == pytest.approx(2.0)  # A at t=1: halfway between 0 and 4
    assert locf[0, 2, 0] == 0.0  # A at t=1: its value at t=0, not B's at 0.5
    assert lin[1, 3, 0] == 10.0 and locf[1, 3, 0] == 10.0  # B: after its last observation
    # scored entries: A at t=1 (truth 9), B at t=1.5 (truth 7)
    lin_ours = baseline_mse([a, b], "ours", "linear_interp")["test_mse"]
    assert lin_ours == pytest.approx(((2.0 - 9.0) ** 2 + (10.0 - 7.0) ** 2) / 2)
    locf_ours = baseline_mse([a, b], "ours", "locf")["test_mse"]
    assert locf_ours == pytest.approx(((0.0 - 9.0) ** 2 + (10.0 - 7.0) ** 2) / 2)


def test_reference_weighting_averages_each_record_over_its_variables():
    # one record, two variables; variable 0 scored twice, variable 1 never: the reference's
    # per-record MSE is the mean over both variables, 0 for the unscored one
    item = {"times": torch.tensor([0.0, 1.0, 2.0, 3.0]),
            "values": torch.tensor([[0.0, 5.0], [3.0, 5.0], [2.0, 5.0], [5.0, 5.0]]),
            "obs_mask": torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
            "mask": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])}
    # linear interpolation of variable 0: t=1 -> 1.0 (truth 3), t=3 -> 2.0 (truth 5)
    lin_var0 = ((1.0 - 3.0) ** 2 + (2.0 - 5.0) ** 2) / 2
    assert baseline_mse([item], "reference", "linear_interp")["test_mse"] == pytest.approx(
        lin_var0 / 2)
    assert baseline_mse([item], "ours", "linear_interp")["test_mse"] == pytest.approx(lin_var0)
    locf_var0 = ((0.0 - 3.0) ** 2 + (2.0 - 5.0) ** 2) / 2
    assert baseline_mse([item], "reference", "locf")["test_mse"] == pytest.approx(locf_var0 / 2)


def test_bad_inputs_are_refused_by_name():
    _, values, obs = one_series()
    with pytest.raises(ValueError, match="times must have shape"):
        linear_interp_predict(values, obs, torch.zeros(4))
    with pytest.raises(ValueError, match="obs_mask"):
        locf_predict(values, obs[..., :2])
    with pytest.raises(ValueError, match="kind='spline'"):
        baseline_mse([], "ours", "spline")


def test_the_benchmark_merges_baseline_rows_into_a_table_without_training(tmp_path, monkeypatch):
    import json

    from conftest import load_benchmark

    bench = load_benchmark("latent_ode")

    def forbidden(*args, **kwargs):
        raise AssertionError("--baselines-only trained something")

    monkeypatch.setattr(bench, "train_system", forbidden)
    monkeypatch.setattr(bench, "union_vs_rescaled", forbidden)
    trained = {"model": "latent_ode", "dataset": "periodic", "task": "interp", "fraction": 0.5,
               "protocol": "ours", "options": {}, "steps": 40, "epochs": 2.0, "train_s": 1.0,
               "train_cpu_s": 1.0, "s_per_epoch": 0.5, "test_mse": 0.029, "anchor_mse": None,
               "command": "python benchmarks/latent_ode.py # latent_ode"}
    (tmp_path / "results.json").write_text(json.dumps({"rows": [trained], "solve": None}))
    bench.main(["--baselines-only", "--cells", "periodic:interp:0.5", "--n-series", "30",
                "--out", str(tmp_path)])
    rows = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"latent_ode", "persistence", "locf", "linear_interp"}
    assert rows["latent_ode"]["test_mse"] == 0.029
    # the rows score the benchmark's own test split, as baseline_mse does directly
    data = bench.system_datasets({**bench.DATA_DEFAULTS,
                                  **bench.cell_options(bench.parse_cell("periodic:interp:0.5"),
                                                       bench.build_parser().parse_args(
                                                           ["--n-series", "30"]))})
    assert rows["linear_interp"]["test_mse"] == pytest.approx(
        baseline_mse(data["test"], "ours", "linear_interp")["test_mse"])
    assert rows["linear_interp"]["test_mse"] < rows["locf"]["test_mse"]  # smooth sine series
    assert "--baselines-only" in rows["locf"]["command"]
    table = (tmp_path / "results.md").read_text()
    assert "| linear_interp |" in table and "| locf |" in table and "| latent_ode |" in table


def test_the_demo_report_sets_the_latent_ode_beside_its_baselines():
    from pyro_seqlatent.experiments.report import _forecast_lines, forecast_baselines
    from pyro_seqlatent.models.forecast_metrics import predictive_mse
    from pyro_seqlatent.models.latent_ode import DATA_DEFAULTS, system_datasets
    from pyro_seqlatent.registry import get_model

    spec = get_model("latent_ode")
    options = {**DATA_DEFAULTS, "dataset": "periodic", "task": "interp", "n_series": 20,
               "recipe": "code"}
    test = system_datasets(options)["test"]
    model, guide = spec.build(spec.options(**options, latent_dim=2, hidden_dim=4,
                                           ode_units=4, method="euler"))
    row = forecast_baselines(model, guide, test, spec)["forecast_mse"]
    for kind in ("persistence", "locf", "linear_interp"):
        assert row[kind] == baseline_mse(test, "ours", kind)["test_mse"]
    torch.manual_seed(0)
    assert row["model"] == pytest.approx(predictive_mse(model, guide, test))
    assert forecast_baselines(model, guide, test, get_model("vae")) == {}
    line = _forecast_lines([{"model": "latent_ode", "forecast_mse": row}])[-1]
    assert line.startswith("| latent_ode | ") and f"{row['linear_interp']:.4g} |" in line
