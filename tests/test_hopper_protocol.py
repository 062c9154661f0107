"""Hopper protocols ("ours" vs the reference implementation's), extrapolation ``fraction``, the
persistence baseline, the reference scoring rules (``pyro_seqlatent.models.forecast_metrics``)
and the Latent ODE benchmark's table. Tiny synthetic arrays; only the last test needs
dm-control."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import pyro_seqlatent.data.hopper as hopper
from conftest import load_benchmark
from pyro_seqlatent.data.irregular import (
    apply_task,
    observed_count,
    persistence_predict,
    union_grid_collate,
)
from pyro_seqlatent.models import forecast_metrics
from pyro_seqlatent.models.latent_ode import system_datasets

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_benchmark("latent_ode")


def _raw():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 4, 4, generator=g) * 3 + 1
    raw[..., 1] = -raw[..., 1].abs() - 0.5  # all negative: max < 0
    raw[..., 1].view(-1)[5] = 0.0  # max == 0 -> divided by 1
    raw[..., 2] = 2.5  # constant feature
    raw[..., 3] = raw[..., 3].abs() + 1  # all positive
    return raw


def test_normalisation_formulas():
    raw = _raw()
    flat = raw.reshape(-1, 4)
    lo, hi = flat.min(0).values, flat.max(0).values
    ours, lo1, hi1 = hopper.minmax_normalize(raw)
    assert torch.equal(lo1, lo) and torch.equal(hi1, hi)
    for d in (0, 1, 3):
        assert torch.allclose(ours[..., d], (raw[..., d] - lo[d]) / (hi[d] - lo[d]))
    assert (ours[..., 2] == 0).all()
    assert ours.amin((0, 1))[[0, 1, 3]].eq(0).all() and ours.amax((0, 1))[[0, 1, 3]].eq(1).all()

    ref, lo2, hi2 = hopper.reference_normalize(raw)
    assert hi[1] == 0 and hi2[1] == 1  # a zero max is replaced by 1
    for d in (0, 2, 3):
        assert torch.allclose(ref[..., d], (raw[..., d] - lo[d]) / hi[d])
    assert torch.allclose(ref[..., 1], raw[..., 1] - lo[1])
    # re-expressing our min-max data in the reference's units gives the reference's data
    assert torch.allclose(hopper.ours_to_reference(ours, lo, hi), ref, atol=1e-6)
    # the squared-error factor between the units is ((hi - lo) / hi)^2 per feature
    err = torch.full_like(ours, 0.01)
    factor = (hopper.ours_to_reference(err, lo, hi) / err)[0, 0, 3] ** 2
    assert torch.isclose(factor, ((hi[3] - lo[3]) / hi[3]) ** 2)


def test_observed_counts():
    assert [observed_count(p, 100, "floor") for p in (0.1, 0.2, 0.3, 0.5)] == [10, 20, 30, 50]
    assert [observed_count(p, 66, "floor") for p in (0.1, 0.2, 0.3, 0.5)] == [6, 13, 19, 33]
    assert [observed_count(p, 66, "round") for p in (0.1, 0.2, 0.3, 0.5)] == [7, 13, 20, 33]
    assert observed_count(0.29, 100, "floor") == 28  # int() as the reference, float error kept
    assert observed_count(0.001, 10) == 1 and observed_count(1.0, 7, "floor") == 7
    with pytest.raises(ValueError, match="rounding"):
        observed_count(0.5, 10, "ceil")
    with pytest.raises(ValueError, match="fraction"):
        observed_count(0.0, 10)


def _frames(n_traj=6, n_steps=200, d=2):
    """Trajectory i, frame t holds 1000 i + t in every feature."""
    t = torch.arange(n_steps, dtype=torch.float32)
    x = 1000 * torch.arange(n_traj, dtype=torch.float32).view(-1, 1) + t
    return x.unsqueeze(-1).expand(n_traj, n_steps, d).clone()


def test_reference_windows():
    data = _frames(n_traj=300, n_steps=102)
    starts, win = hopper.reference_windows(data, 100, torch.Generator().manual_seed(0))
    assert win.shape == (300, 100, 2)
    assert set(starts.tolist()) == {0, 1, 2}  # 0 .. n_steps - window, both ends included
    first = win[:, 0, 0] - 1000 * torch.arange(300)
    assert torch.equal(first, starts.float())
    assert (win[:, 1:, 0] - win[:, :-1, 0] == 1).all()  # consecutive frames
    with pytest.raises(ValueError, match="window"):
        hopper.reference_windows(data, 103)


@pytest.mark.parametrize("fraction, n_obs", [(0.1, 10), (0.2, 20), (0.3, 30), (0.5, 50)])
def test_reference_interp_items(fraction, n_obs):
    items = hopper.hopper_items(_frames(), "interp", fraction, seed=0, protocol="reference")
    times = torch.arange(100) / 200
    for item in items:
        assert torch.allclose(item["times"], times)  # every window gets the first 100 times
        assert item["values"].shape == (100, 2) and item["mask"].sum() == 200  # all scored
        assert int(item["obs_mask"].any(-1).sum()) == n_obs
        assert (item["obs_mask"] <= item["mask"]).all()
        frames = item["values"][:, 0] % 1000
        assert (frames[1:] - frames[:-1] == 1).all() and frames[0] <= 100
    ours = hopper.hopper_items(_frames(), "interp", fraction, seed=0, protocol="ours")
    assert ours[0]["times"].shape == (200,)
    assert int(ours[0]["obs_mask"].any(-1).sum()) == round(fraction * 200)


@pytest.mark.parametrize("fraction, n_ref, n_ours", [(0.1, 6, 10), (0.2, 13, 20), (0.3, 19, 30),
                                                     (0.5, 33, 50), (1.0, 66, 100)])
def test_extrapolation_prefix_is_subsampled(fraction, n_ref, n_ours):
    for protocol, n_prefix, n_obs in (("reference", 66, n_ref), ("ours", 100, n_ours)):
        items = hopper.hopper_items(_frames(), "extrap", fraction, seed=1, protocol=protocol)
        for item in items:
            seen = item["obs_mask"].any(-1)
            scored = item["mask"].any(-1)
            assert item["times"].shape == (200,)
            assert int(seen.sum()) == n_obs and not seen[n_prefix:].any()
            assert not scored[:n_prefix].any() and scored[n_prefix:].all()  # 134 / 100 scored
        # different trajectories observe different subsets (unless the prefix is full)
        if fraction < 1:
            assert not torch.equal(items[0]["obs_mask"], items[1]["obs_mask"])


def test_hopper_splits(monkeypatch):
    data = _frames(n_traj=50, n_steps=30)
    monkeypatch.setattr(hopper, "load_hopper", lambda *a, **k: data)
    ref = hopper.hopper_datasets("extrap", 0.5, n_traj=50, n_steps=30, protocol="reference")
    assert [len(ref[k]) for k in ("train", "valid", "test")] == [35, 5, 10]
    test_ids = [int(item["values"][0, 0]) // 1000 for item in ref["test"]]
    assert test_ids == list(range(40, 50))  # the last 20 %, as split_train_test
    ours = hopper.hopper_datasets("extrap", 0.5, n_traj=50, n_steps=30, protocol="ours")
    assert [len(ours[k]) for k in ("train", "valid", "test")] == [40, 5, 5]
    with pytest.raises(ValueError, match="protocol"):
        hopper.hopper_datasets(protocol="paper")


def test_protocol_option_is_hopper_only():
    from pyro_seqlatent.registry import get_model

    for name in ("latent_ode", "ode_rnn", "rnn_dt"):
        assert get_model(name).defaults["protocol"] == "ours"
    options = get_model("latent_ode").options(dataset="periodic", protocol="reference")
    with pytest.raises(ValueError, match="hopper"):
        system_datasets(options)


def test_persistence_predictor_by_hand():
    values = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]]])
    obs = torch.tensor([[[0, 1], [1, 0], [0, 0], [1, 1], [0, 0]]], dtype=torch.float32)
    pred = persistence_predict(values, obs)
    # feature 0 observed at 1 and 3: before any -> first observed (2), then carried forward,
    # an observed point is predicted from the observation before it (not itself)
    assert pred[0, :, 0].tolist() == [2.0, 2.0, 2.0, 2.0, 4.0]
    # feature 1 observed at 0 and 3
    assert pred[0, :, 1].tolist() == [10.0, 10.0, 10.0, 10.0, 40.0]
    never = persistence_predict(values, torch.zeros_like(values))
    assert (never == 0).all()
    batch = persistence_predict(torch.cat([values, values + 1]), torch.cat([obs, obs.flip(1)]))
    assert torch.equal(batch[:1], pred)
    assert batch[1, :, 0].tolist() == [3.0, 3.0, 3.0, 3.0, 5.0]  # obs at 1 and 3 again


def _grid_batch():
    """Two sequences on a union grid; the second starts one grid time later."""
    ones = torch.ones(3, 1)
    a = {"times": torch.tensor([0.0, 0.1, 0.2]), "values": torch.tensor([[1.0], [2.0], [3.0]]),
         "mask": ones, "obs_mask": torch.tensor([[0.0], [1.0], [1.0]])}
    b = {"times": torch.tensor([0.1, 0.2, 0.3]), "values": torch.tensor([[5.0], [6.0], [7.0]]),
         "mask": ones, "obs_mask": torch.tensor([[1.0], [0.0], [1.0]])}
    return union_grid_collate([a, b])


def test_reference_first_point_rule():
    batch = _grid_batch()
    pred = torch.full_like(batch["values"], 9.0)
    out = forecast_metrics.reference_first_point(pred, batch)
    # sequence a: first point unobserved -> 0; sequence b starts at grid index 1, observed -> 5
    assert out[0, :, 0].tolist() == [0.0, 9.0, 9.0, 9.0]
    assert out[1, :, 0].tolist() == [9.0, 5.0, 9.0, 9.0]
    assert torch.equal(pred, torch.full_like(pred, 9.0))  # not modified in place


class _Constant(torch.nn.Module):
    def predict(self, values, mask, times, obs_mask=None):
        return torch.full_like(values, 2.0)


def test_reference_scoring_of_baselines_and_persistence():
    items = [{k: v[b, [0, 1, 2] if b == 0 else [1, 2, 3]] if k != "times" else None
              for k, v in _grid_batch().items()} for b in range(2)]
    for item, t in zip(items, ([0.0, 0.1, 0.2], [0.1, 0.2, 0.3])):
        item["times"] = torch.tensor(t)
    scores = forecast_metrics.reference_test_mse(_Constant(), None, items)
    # plain: errors (1, 0, 1) and (9, 16, 25) -> 52 / 6; rule: first points 0 (a) and 5 (b)
    assert scores["test_mse_without_first_point_rule"] == pytest.approx(52 / 6)
    assert scores["test_mse"] == pytest.approx((1 + 0 + 1 + 0 + 16 + 25) / 6)
    pers = forecast_metrics.persistence_mse(items, "reference")
    # a: obs at 1, 2 -> preds (2, 2, 2) -> 1 + 0 + 1; b: obs at 0, 2 -> (5, 5, 5) -> 0 + 1 + 4
    assert pers["test_mse"] == pytest.approx(7 / 6)
    # with the rule a's first point becomes 0 (error 1 -> 1), b's stays 5
    assert pers["test_mse_with_first_point_rule"] == pytest.approx(7 / 6)
    assert "test_mse_with_first_point_rule" not in forecast_metrics.persistence_mse(items, "ours")


def test_reference_latent_ode_score_is_mean_of_sample_mses():
    from pyro_seqlatent.data.periodic import make_periodic
    from pyro_seqlatent.models.latent_ode import LatentODEGuide, LatentODEModel, forecast

    items = apply_task(make_periodic(4, 8, recipe="code", seed=0), "interp", fraction=0.5)
    model, guide = LatentODEModel(1, 3, (8,)), LatentODEGuide(1, 3, hidden_dim=6)
    torch.manual_seed(1)
    score = forecast_metrics.reference_test_mse(model, guide, items)["test_mse"]
    torch.manual_seed(1)
    batch = next(iter(DataLoader(items, batch_size=50, collate_fn=union_grid_collate)))  # same RNG
    samples = forecast(model, guide, batch, num_samples=3)["samples"]
    per_sample = [float(((s - batch["values"]) ** 2 * batch["mask"]).sum() / batch["mask"].sum())
                  for s in samples]
    assert score == pytest.approx(sum(per_sample) / 3, rel=1e-5)
    torch.manual_seed(1)  # every series has 4 observed points: pooled = per-record mean here
    pooled = forecast_metrics.reference_test_mse(model, guide, items)["test_mse_pooled"]
    assert pooled == pytest.approx(sum(per_sample) / 3, rel=1e-5)


def test_markdown_anchor_only_for_reference_rows():
    bench = _bench()
    base = {"dataset": "hopper", "fraction": 0.1, "steps": 10, "epochs": 1.0,
            "s_per_epoch": 1.0, "step_s": 0.1, "command": "cmd"}
    old = dict(base, task="extrap", fraction=0.5, model="latent_ode", test_mse=0.009,
               anchor_mse=0.01258)  # a row written before the protocol field
    ours = dict(base, task="interp", model="ode_rnn", protocol="ours", test_mse=0.002,
                anchor_mse=None)
    ref = dict(base, task="interp", model="ode_rnn", protocol="reference", test_mse=0.0165,
               anchor_mse=0.01647, test_mse_without_first_point_rule=0.006)
    pers = dict(base, task="interp", model="persistence", protocol="reference", test_mse=0.01,
                steps=0, epochs=None, s_per_epoch=None, step_s=None, anchor_mse=None,
                test_mse_with_first_point_rule=0.019)
    assert bench.row_key(old)[-1] == "ours"
    assert len(bench.merge_row([ours, ref], dict(ours, test_mse=1.0))) == 2
    text = bench.markdown([old, ours, ref, pers], None)
    lines = {line.split("|")[5].strip() + "/" + line.split("|")[4].strip(): line
             for line in text.splitlines() if line.startswith("| hopper")}
    assert "| 0.01258 |" not in lines["latent_ode/ours"] and "0.5† |" in lines["latent_ode/ours"]
    assert "| 0.002 | – | – |" in lines["ode_rnn/ours"]
    assert "| 0.01647 | 1.00× |" in lines["ode_rnn/reference"]
    persistence = "| persistence | 0.01 | – | – | 0 | – | – | – | – | – |"
    assert persistence in lines["persistence/reference"]
    assert "≈4.1×" in text and "†" in text and "0.019" in text and "0.006" in text


def test_generate_subset_matches_full_set():
    pytest.importorskip("dm_control")
    full = hopper.generate_hopper(n_traj=3, n_steps=4, seed=5)
    some = hopper.generate_hopper(n_traj=3, n_steps=4, seed=5, indices=[2, 0])
    assert (some[0] == full[2]).all() and (some[1] == full[0]).all()
