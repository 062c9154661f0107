"""Irregular-time-series data: time validation, union-grid / padded collates, toy periodic
generator and tasks, PhysioNet parsing and quantization."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import require_data
from pyro_seqlatent.data.irregular import (
    IrregularDataset,
    apply_task,
    padded_collate,
    union_grid_collate,
)
from pyro_seqlatent.data.periodic import make_periodic, periodic_datasets
from pyro_seqlatent.data.physionet import VARIABLES, _parse_record, _quantized_record
from pyro_seqlatent.nn.times import validate_times


def _item(times, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(times, dtype=torch.float32)
    return {"times": t, "values": torch.randn(len(times), d, generator=g),
            "mask": (torch.rand(len(times), d, generator=g) < 0.7).float()}


@pytest.mark.parametrize(
    "times, match",
    [
        (torch.tensor([0.0, 2.0, 1.0]), "sorted"),
        (torch.tensor([0.0, 1.0, 1.0]), "duplicate"),
        (torch.tensor([0.0, float("nan"), 1.0]), "NaN"),
        (torch.tensor([0.0, float("inf")]), "NaN or inf"),
        (torch.zeros(2, 2, 2), "shape"),
        (torch.tensor([], dtype=torch.float32), "empty"),
    ],
)
def test_bad_times_raise_clear_errors(times, match):
    with pytest.raises(ValueError, match=match):
        validate_times(times, name="times")


def test_bad_time_types():
    with pytest.raises(TypeError, match="floating-point"):
        validate_times(torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="tensor"):
        validate_times([0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        validate_times(torch.zeros(2, 3), shared=True)


def test_padding_only_at_the_end():
    validate_times(torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.5, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="duplicate"):
        validate_times(torch.tensor([[0.0, 1.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="duplicate"):
        validate_times(torch.tensor([[0.0, 1.0, 1.0]]), allow_padding=False)


def test_collate_rejects_bad_items():
    good = _item([0.0, 1.0])
    with pytest.raises(ValueError, match="sorted"):
        union_grid_collate([good, _item([0.0, 2.0, 1.0])])
    bad = dict(good, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask"):
        union_grid_collate([bad])
    with pytest.raises(ValueError, match="features"):
        union_grid_collate([good, _item([0.0], d=3)])
    with pytest.raises(ValueError, match="'values'"):
        union_grid_collate([{"times": torch.zeros(1), "mask": torch.ones(1, 1)}])


def test_union_grid_collate_matches_a_loop():
    items = apply_task([_item([0.0, 0.3, 1.0], seed=1), _item([0.1, 0.3, 2.0, 2.5], seed=2),
                        _item([1.0], seed=3)], "interp", fraction=0.5)
    batch = union_grid_collate(items)
    assert list(batch)[0] == "values"  # the trainer reads the batch size from the first tensor
    expected_grid = sorted({float(t) for it in items for t in it["times"]})
    assert batch["times"].tolist() == pytest.approx(expected_grid)
    for key in ("values", "mask", "obs_mask"):
        assert batch[key].shape == (3, len(expected_grid), 2)
        ref = torch.zeros(3, len(expected_grid), 2)
        for b, it in enumerate(items):
            for i, t in enumerate(it["times"].tolist()):
                ref[b, expected_grid.index(t)] = it[key][i]
        torch.testing.assert_close(batch[key], ref)


def test_padded_collate():
    items = [_item([0.0, 0.3, 1.0]), _item([0.0, 2.0])]
    batch = padded_collate(items)
    torch.testing.assert_close(batch["times"], torch.tensor([[0.0, 0.3, 1.0], [0.0, 2.0, 2.0]]))
    assert batch["mask"][1, 2].sum() == 0 and batch["values"][1, 2].abs().sum() == 0
    torch.testing.assert_close(batch["values"][0], items[0]["values"])
    validate_times(batch["times"])


def test_periodic_paper_recipe():
    items = make_periodic(n_series=5, n_points=100, recipe="paper", noise_std=0.0, seed=3)
    for it in items:
        t, y = it["times"], it["values"][:, 0]
        assert t[0] == 0 and (t[1:] > t[:-1]).all() and t[-1] <= 5
        # y = y0 + sin(2 pi f t): recover f from two points and check the whole curve
        y0 = y[0]
        assert (y - y0).abs().max() <= 1 + 1e-5
    assert not torch.equal(items[0]["times"], items[1]["times"])  # per-sequence times
    code = make_periodic(n_series=3, recipe="code", seed=3)
    assert torch.equal(code[0]["times"], code[2]["times"])
    with pytest.raises(ValueError, match="recipe"):
        make_periodic(recipe="nope")


def test_tasks_interp_and_extrap():
    ds = periodic_datasets("interp", fraction=0.2, n_series=20, seed=0)
    item = ds["train"][0]
    assert item["obs_mask"].sum() == 20 and item["mask"].sum() == 100
    assert (item["obs_mask"] <= item["mask"]).all()
    ds = periodic_datasets("extrap", fraction=1.0, n_series=20, seed=0)
    item = ds["test"][0]
    t = item["times"]
    assert (item["obs_mask"][t > 2.5] == 0).all() and (item["obs_mask"][t <= 2.5] == 1).all()
    assert (item["mask"][t <= 2.5] == 0).all() and (item["mask"][t > 2.5] == 1).all()
    assert isinstance(ds["train"], IrregularDataset) and len(ds["train"]) == 16
    with pytest.raises(ValueError, match="task"):
        apply_task([item], "forecast")


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.5])
def test_extrap_observes_fraction_of_the_prefix(fraction):
    """An extrapolation cell labelled 10 % observes 10 % of the prefix (the reference's
    subsampling of the observed part), and still scores every point after the split."""
    ds = periodic_datasets("extrap", fraction=fraction, n_series=20, seed=0)
    for item in ds["test"]:
        t = item["times"]
        seen = item["obs_mask"][:, 0] > 0
        n_prefix = int((t <= 2.5).sum())
        assert int(seen.sum()) == max(1, round(fraction * n_prefix))
        assert not seen[t > 2.5].any()
        assert (item["mask"][t <= 2.5] == 0).all() and (item["mask"][t > 2.5] == 1).all()
    a, b = ds["test"][0]["obs_mask"], ds["test"][1]["obs_mask"]
    assert not torch.equal(a, b)  # a random subset per series


def test_extrap_prefix_keeps_feature_masks():
    item = _item([0.0, 0.5, 1.0, 1.5, 2.0, 3.0], d=3, seed=4)
    (out,) = apply_task([item], "extrap", fraction=0.5, split=2.5, seed=0)
    rows = out["obs_mask"].any(-1)
    assert int(rows.sum()) == round(0.5 * int(item["mask"][:5].any(-1).sum()))
    assert torch.equal(out["obs_mask"][rows], item["mask"][rows])  # observed rows keep their mask
    assert torch.equal(out["mask"][5], item["mask"][5]) and (out["mask"][:5] == 0).all()


def test_physionet_record_parsing_and_quantization():
    text = ("Time,Parameter,Value\n00:00,RecordID,1\n00:00,Age,50\n00:00,Weight,-1\n"
            "00:00,Weight,80\n"
            "00:03,HR,100\n00:05,HR,110\n00:05,Temp,37\n47:59,HR,90\n48:01,HR,1\n")
    index = {name: i for i, name in enumerate(VARIABLES)}
    minutes, params, values = _parse_record(text, index)
    assert minutes == [0, 3, 5, 5, 2879]  # static variables, weight -1 and t > 48 h dropped
    assert [VARIABLES[p] for p in params] == ["Weight", "HR", "HR", "Temp", "HR"]
    t, mean, mask = _quantized_record(torch.tensor(minutes), torch.tensor(params),
                                      torch.tensor(values), 0.1, len(VARIABLES))
    hr = VARIABLES.index("HR")
    # 0.1 h = 6 min bins: {0, 3, 5} min -> bins 0, 0 (round 0.5 to even), 1
    assert t.tolist() == pytest.approx([0.0, 0.1, 48.0])
    assert mean[0, hr] == 100 and mean[1, hr] == 110 and mask[0].sum() == 2
    t, mean, mask = _quantized_record(torch.tensor(minutes), torch.tensor(params),
                                      torch.tensor(values), 1.0, len(VARIABLES))
    assert t.tolist() == [0.0, 48.0] and mean[0, hr] == 105  # averaged within the hour


@pytest.mark.data
def test_physionet_real_data():
    require_data("physionet2012/physionet2012_seta_setb.tar.gz")
    from pyro_seqlatent.data.physionet import physionet_datasets

    ds = physionet_datasets(quantization=0.1, n_records=200, seed=0)
    assert len(ds["train"]) == 160 and len(ds["test"]) == 20
    assert ds["train"].num_features == 37
    train_vals = torch.cat([it["values"][it["mask"] > 0] for it in ds["train"]])
    assert train_vals.min() >= 0 and train_vals.max() <= 1 + 1e-6
    for it in ds["train"]:
        t = it["times"]
        assert t.min() >= 0 and t.max() <= 1 + 1e-6
        steps = t * 48 / 0.1
        assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert math.isclose(float(train_vals.max()), 1.0, abs_tol=1e-6)


def test_compact_observed_keeps_each_sequences_observations():
    from pyro_seqlatent.data.irregular import compact_observed

    items = [_item([0.0, 0.3, 1.0], seed=1), _item([0.1, 0.3, 2.0, 2.5], seed=2)]
    items[1]["mask"][2] = 0  # a row with nothing observed is dropped
    batch = union_grid_collate(items)
    t, v, m = compact_observed(batch["times"], batch["values"], batch["mask"])
    for b, it in enumerate(items):
        rows = it["mask"].sum(-1) > 0
        k = int(rows.sum())
        torch.testing.assert_close(t[b, :k], it["times"][rows])
        torch.testing.assert_close(v[b, :k], it["values"][rows])
        torch.testing.assert_close(m[b, :k], it["mask"][rows])
        assert (m[b, k:] == 0).all() and (t[b, k:] == it["times"][rows][-1]).all()


def test_hopper_generator_follows_the_recipe():
    """First frame = the recipe's initial state (RandomState(seed) draws, in order); the state
    then moves under the simulator (needs the bench extra, skipped without dm-control)."""
    pytest.importorskip("dm_control")
    import numpy as np

    from pyro_seqlatent.data.hopper import generate_hopper

    raw = generate_hopper(n_traj=2, n_steps=5, seed=7)
    assert raw.shape == (2, 5, 14) and np.isfinite(raw).all()
    rng = np.random.RandomState(7)
    for i in range(2):
        qpos01, qpos_rest = rng.uniform(0, 0.5, size=2), rng.uniform(-2, 2, size=5)
        qvel = rng.uniform(-5, 5, size=7)
        np.testing.assert_allclose(raw[i, 0], np.concatenate([qpos01, qpos_rest, qvel]),
                                   rtol=1e-6, atol=1e-6)
    assert np.abs(raw[:, 1:] - raw[:, :-1]).max() > 1e-4
