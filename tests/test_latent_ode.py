"""Latent ODE model/guide: Poisson factor against closed forms, masking, per-sequence times,
particle plates, forecasting and the deterministic baselines."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from pyro_seqlatent.data.irregular import apply_task, padded_collate, union_grid_collate
from pyro_seqlatent.data.periodic import make_periodic
from pyro_seqlatent.models.latent_ode import (
    LatentODEGuide,
    LatentODEModel,
    forecast,
    nfe_metrics,
    reset_nfe,
    variable_weights,
)
from pyro_seqlatent.models.ode_rnn import ODERNN, EmptyGuide, RNNDeltaT
from pyro_seqlatent.nn.ode import CountingField


def _batch(n_series=4, n_points=12, task="interp", collate=union_grid_collate, seed=0):
    items = make_periodic(n_series, n_points, seed=seed)
    items = apply_task(items, task, fraction=0.5, split=2.5, seed=seed)
    return collate(items)


class UnitSpeed(CountingField):
    """dz/dt = 1, so z(t) = z0 + t."""

    def field(self, t, z):
        return torch.ones_like(z)


class LogAffine(nn.Module):
    """log lambda(z) = log(a + b z) (one shared rate)."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, z):
        return torch.log(self.a + self.b * z[..., :1])


def _site_log_prob(trace, name):
    trace.compute_log_prob()
    return trace.nodes[name]["log_prob"]


def _model_trace(model, z0, batch):
    conditioned = poutine.condition(model, data={"z0": z0})
    return poutine.trace(conditioned).get_trace(**batch)


def test_poisson_constant_rate_closed_form():
    torch.manual_seed(0)
    batch = _batch(n_series=3)
    model = LatentODEModel(1, latent_dim=3, poisson=True, poisson_rates="per_feature")
    last = model.log_rate.net[-1]
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, math.log(2.5))  # lambda = 2.5 whatever z is
    z0 = torch.randn(3, 3)
    tr = _model_trace(model, z0, batch)
    events = torch.maximum(batch["mask"], batch["obs_mask"]).sum((-1, -2))
    span = batch["times"][-1] - 0.0  # window [t0, t_end]
    expected = events * math.log(2.5) - 2.5 * span
    torch.testing.assert_close(_site_log_prob(tr, "poisson"), expected,
                               atol=1e-4, rtol=1e-5)


def test_poisson_affine_rate_closed_form():
    """lambda(t) = a + b t: log p = sum_i log(a + b t_i) - (a T + b T^2 / 2)."""
    a, b = 0.7, 1.3
    batch = _batch(n_series=2, n_points=9)
    model = LatentODEModel(1, latent_dim=1, poisson=True, poisson_rates="shared")
    model.func = UnitSpeed()
    model.log_rate = LogAffine(a, b)
    z0 = torch.zeros(2, 1)
    z, cum = model.solve(z0, batch["times"])
    torch.testing.assert_close(z[0, :, 0], batch["times"])
    events = torch.maximum(batch["mask"], batch["obs_mask"])
    log_p = model.poisson_log_likelihood(z, cum, events)
    t_end = float(batch["times"][-1])
    for s in range(2):
        seen = events[s, :, 0] > 0
        expected = torch.log(a + b * batch["times"][seen]).sum() - (a * t_end + b * t_end ** 2 / 2)
        torch.testing.assert_close(log_p[s], expected, atol=1e-4, rtol=1e-5)
    # the same value is what the model's pyro.factor adds
    tr = _model_trace(model, z0, batch)
    torch.testing.assert_close(_site_log_prob(tr, "poisson"), log_p)


def test_poisson_switch():
    batch = _batch()
    z0 = torch.zeros(4, 5)
    assert "poisson" not in _model_trace(LatentODEModel(1, 5), z0, batch).nodes
    assert "poisson" in _model_trace(LatentODEModel(1, 5, poisson=True), z0, batch).nodes


def test_masked_entries_do_not_change_the_loss():
    torch.manual_seed(0)
    batch = _batch()
    model, guide = LatentODEModel(1, 4), LatentODEGuide(1, 4, hidden_dim=8)
    z0 = torch.randn(4, 4)
    changed = dict(batch, values=torch.where(batch["mask"] > 0, batch["values"],
                                             torch.full_like(batch["values"], 7.0)))
    lp = _model_trace(model, z0, batch).log_prob_sum()
    torch.testing.assert_close(_model_trace(model, z0, changed).log_prob_sum(), lp)
    # and the guide only reads obs_mask entries
    hidden = dict(batch, values=torch.where(batch["obs_mask"] > 0, batch["values"],
                                            torch.full_like(batch["values"], -3.0)))
    torch.testing.assert_close(guide.posterior(**hidden).mean, guide.posterior(**batch).mean)
    # a visible entry does change it (the test can fail)
    assert not torch.allclose(_model_trace(model, z0, dict(batch, values=batch["values"] + 1))
                              .log_prob_sum(), lp)


def _multivariate_batch():
    """3 series, 6 times, 3 variables measured unequally often (series 2: equally often)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]],
                         [[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]],
                         [[1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]],
                        dtype=torch.float32)
    values = torch.randn(3, 6, 3, generator=g) * mask
    times = torch.linspace(0.1, 1.0, 6)
    return {"values": values, "mask": mask, "times": times}


def test_variable_weights_spread_each_series_total_equally_over_its_variables():
    mask = _multivariate_batch()["mask"]
    w = variable_weights(mask)
    torch.testing.assert_close(w.sum((-1, -2)), mask.sum((-1, -2)))  # N_b kept
    per_variable = w.sum(-2)  # each observed variable weighs N_b / V_b
    torch.testing.assert_close(per_variable[0], torch.tensor([7 / 2, 7 / 2, 0.0]))
    torch.testing.assert_close(per_variable[1], torch.tensor([0.0, 8 / 2, 8 / 2]))
    torch.testing.assert_close(w[2], mask[2])  # equal counts: the ELBO's weights
    assert (w[mask == 0] == 0).all()
    assert (variable_weights(torch.zeros(1, 4, 2)) == 0).all()
    torch.testing.assert_close(variable_weights(mask.bool()), w)  # bool/int masks: same weights
    torch.testing.assert_close(variable_weights(mask.long()), w)


def test_variable_weighting_against_a_direct_per_variable_mean():
    torch.manual_seed(0)
    batch = _multivariate_batch()
    point = LatentODEModel(3, 4)
    weighted = LatentODEModel(3, 4, obs_weighting="variable")
    weighted.load_state_dict(point.state_dict())
    z0 = torch.randn(3, 4)
    tr_point, tr_weighted = _model_trace(point, z0, batch), _model_trace(weighted, z0, batch)
    loc = tr_point.nodes["_RETURN"]["value"]
    normal = torch.distributions.Normal(loc, point.obs_std)
    for b in range(3):
        m = batch["mask"][b].bool()
        lp = normal.log_prob(batch["values"])[b]
        direct_point = lp[m].sum()
        observed = [d for d in range(3) if m[:, d].any()]
        direct_weighted = m.sum() / len(observed) * sum(lp[m[:, d], d].mean() for d in observed)
        torch.testing.assert_close(_site_log_prob(tr_point, "x")[b], direct_point)
        torch.testing.assert_close(_site_log_prob(tr_weighted, "x")[b], direct_weighted)
    # series 2 measures its variables equally often: the two weightings agree there only
    lp_weighted, lp_point = _site_log_prob(tr_weighted, "x"), _site_log_prob(tr_point, "x")
    torch.testing.assert_close(lp_weighted[2], lp_point[2])
    assert not torch.isclose(lp_weighted[:2], lp_point[:2]).any()
    # unobserved entries stay out of the weighted term, and SVI runs with particle dimensions
    changed = dict(batch, values=torch.where(batch["mask"] > 0, batch["values"], 1e3))
    torch.testing.assert_close(_model_trace(weighted, z0, changed).log_prob_sum(),
                               tr_weighted.log_prob_sum())
    guide = LatentODEGuide(3, 4, hidden_dim=8)
    elbo = pyro.infer.Trace_ELBO(num_particles=2, vectorize_particles=True)
    loss = elbo.differentiable_loss(weighted, guide, **batch)
    loss.backward()
    assert torch.isfinite(loss) and weighted.decoder.net[-1].weight.grad is not None
    with pytest.raises(ValueError, match="obs_weighting"):
        LatentODEModel(3, 4, obs_weighting="feature")


def test_union_grid_and_per_sequence_batches_give_the_same_likelihood():
    torch.manual_seed(0)
    items = apply_task(make_periodic(3, 10, seed=1), "interp", fraction=0.5)
    model = LatentODEModel(1, 4, poisson=True, rtol=1e-7, atol=1e-8).double()
    z0 = torch.randn(3, 4, dtype=torch.float64)
    to64 = [{k: v.double() for k, v in it.items()} for it in items]
    union, padded = union_grid_collate(to64), padded_collate(to64)
    tr_u, tr_p = _model_trace(model, z0, union), _model_trace(model, z0, padded)
    torch.testing.assert_close(_site_log_prob(tr_u, "x"), _site_log_prob(tr_p, "x"),
                               atol=1e-4, rtol=1e-6)
    # Poisson windows differ (union grid: up to the batch's last time; per-sequence: the
    # sequence's own last time) but the event terms agree; check the window integral directly
    z_u, cum_u = model.solve(z0, union["times"])
    z_p, cum_p = model.solve(z0, padded["times"])
    for b, item in enumerate(to64):
        i = union["times"].tolist().index(float(item["times"][-1]))
        torch.testing.assert_close(cum_p[b, -1], cum_u[b, i], atol=1e-5, rtol=1e-6)


def test_elbo_and_particle_plate():
    torch.manual_seed(0)
    batch = _batch(n_series=5)
    model = LatentODEModel(1, 4, poisson=True)
    guide = LatentODEGuide(1, 4, hidden_dim=8, guide="iaf", num_flows=1)
    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True)
    loss = elbo.differentiable_loss(model, guide, **batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.func.net.net[0].weight.grad is not None
    assert guide.cell.gru.weight_ih.grad is not None
    assert nfe_metrics(model, guide)["gen_nfe_forward"] > 0
    reset_nfe(model, guide)
    assert nfe_metrics(model, guide)["gen_nfe_forward"] == 0
    try:
        from pyro_seqlatent.infer import log_marginal
    except ImportError:  # pragma: no cover
        return
    log_px, elbo_b, _ = log_marginal(model, guide, batch, num_samples=4)
    assert log_px.shape == (5,) and (log_px >= elbo_b - 1e-3).all()


def test_forecast_extends_time():
    torch.manual_seed(0)
    batch = _batch(task="extrap")
    model, guide = LatentODEModel(1, 4), LatentODEGuide(1, 4, hidden_dim=8)
    future = torch.linspace(0, 7.5, 30)
    out = forecast(model, guide, batch, times=future, num_samples=6)
    assert out["samples"].shape == (6, 4, 30, 1)
    assert (out["lower"] <= out["mean"] + 1e-6).all() and (out["mean"] <= out["upper"] + 1e-6).all()


def test_bad_batches_raise():
    batch = _batch()
    model = LatentODEModel(1, 4)
    with pytest.raises(ValueError, match="times"):
        model(**dict(batch, times=batch["times"][:-1]))
    with pytest.raises(ValueError, match="t0"):
        model(**dict(batch, times=batch["times"] - 1.0))
    with pytest.raises(ValueError, match="sorted"):
        model(**dict(batch, times=batch["times"].flip(0)))
    with pytest.raises(ValueError, match="poisson_rates"):
        LatentODEModel(1, 4, poisson_rates="per_time")


@pytest.mark.parametrize("cls", [ODERNN, RNNDeltaT])
def test_baselines_predict_before_reading(cls):
    torch.manual_seed(0)
    batch = _batch(n_series=3, n_points=8)
    batch = dict(batch, obs_mask=batch["mask"].clone())
    net = cls(1, hidden_dim=8)
    pred = net.predict(**batch)
    values = batch["values"].clone()
    b, i = 1, int(torch.nonzero(batch["mask"][1, :, 0])[2])
    values[b, i] += 5.0
    pred2 = net.predict(**dict(batch, values=values))
    torch.testing.assert_close(pred2[:, : i + 1], pred[:, : i + 1])  # x_i unseen by pred_i
    assert not torch.allclose(pred2[b, i + 1:], pred[b, i + 1:])  # but used afterwards
    loss = pyro.infer.Trace_ELBO().differentiable_loss(net, EmptyGuide(), **batch)
    sse = (((pred - batch["values"]) ** 2) * batch["mask"]).sum()
    n = batch["mask"].sum()
    expected = sse / (2 * 0.01 ** 2) + n * (math.log(0.01) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-2)


def test_encoder_same_on_union_grid_and_per_sequence_batches():
    torch.manual_seed(0)
    items = apply_task(make_periodic(3, 10, seed=1), "interp", fraction=0.5)
    guide = LatentODEGuide(1, 4, hidden_dim=8)
    q_u = guide.posterior(**union_grid_collate(items))
    q_p = guide.posterior(**padded_collate(items))
    torch.testing.assert_close(q_u.mean, q_p.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_u.stddev, q_p.stddev, atol=1e-5, rtol=1e-5)


class Rotation(CountingField):
    """dz/dt = A z with A = [[0, -w], [w, 0]]: z(t) = R(w (t - t0)) z0."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def field(self, t, z):
        return self.w * torch.stack([-z[..., 1], z[..., 0]], dim=-1)


@pytest.mark.parametrize("t0", [0.0, -0.4])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_decoder_sees_z_at_each_observation_time(t0, per_sequence):
    """x_i is scored against dec(z(t_i)) with z0 living at t0, also when the grid starts
    after t0 (closed form of a rotation field; the decoder reads the first coordinate)."""
    w = 1.3
    model = LatentODEModel(1, 2, rtol=1e-8, atol=1e-9, t0=t0).double()
    model.func = Rotation(w)
    with torch.no_grad():
        model.decoder.net[-1].weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.decoder.net[-1].bias.zero_()
    times = torch.tensor([[0.5, 1.1, 2.0, 3.7], [0.2, 0.9, 2.6, 2.6]], dtype=torch.float64)
    if not per_sequence:
        times = times[0]
    b, n = 2, 4
    values = torch.zeros(b, n, 1, dtype=torch.float64)
    batch = {"values": values, "mask": torch.ones_like(values), "times": times}
    z0 = torch.tensor([[1.0, 0.0], [0.3, -0.8]], dtype=torch.float64)
    loc = _model_trace(model, z0, batch).nodes["x"]["fn"].base_dist.base_dist.loc
    angle = w * (times.expand(b, n) - t0)
    expected = z0[:, :1] * torch.cos(angle) - z0[:, 1:] * torch.sin(angle)
    torch.testing.assert_close(loc[..., 0], expected, atol=1e-6, rtol=1e-6)


def test_extrap_train_all_scores_the_prefix_in_training_only():
    from pyro_seqlatent.models.latent_ode import DATA_DEFAULTS, system_datasets

    opts = {**DATA_DEFAULTS, "task": "extrap", "n_series": 40, "recipe": "code"}
    future = system_datasets(opts)
    both = system_datasets({**opts, "extrap_train": "all"})
    for a, b in zip(future["train"].items, both["train"].items):
        assert torch.equal(a["obs_mask"], b["obs_mask"]) and torch.equal(a["values"], b["values"])
        assert a["mask"].sum() > 0 and (a["mask"] * a["obs_mask"]).sum() == 0  # future only
        assert torch.equal(b["mask"], torch.maximum(a["mask"], a["obs_mask"]))
        assert b["mask"].sum() == a["mask"].sum() + a["obs_mask"].sum()
    for split in ("valid", "test"):  # scored on the future either way
        for a, b in zip(future[split].items, both[split].items):
            assert torch.equal(a["mask"], b["mask"])
    interp = {**opts, "task": "interp"}
    for a, b in zip(system_datasets(interp)["train"].items,
                    system_datasets({**interp, "extrap_train": "all"})["train"].items):
        assert torch.equal(a["mask"], b["mask"])  # interpolation has no prefix to add
    with pytest.raises(ValueError, match="extrap_train must be one of"):
        system_datasets({**opts, "extrap_train": "prefix"})


def test_reference_init_option_sets_every_linear_layer():
    """init="normal": every Linear of model and guide N(0, 0.1²) with zero bias (the
    reference's init_network_weights); "torch" leaves PyTorch's defaults; others are refused."""
    from pyro_seqlatent.nn.init import init_linear_normal_
    from pyro_seqlatent.registry import get_model

    spec = get_model("latent_ode")
    opts = dict(dataset="periodic", ode_units=300, ode_layers=2)
    model, guide = spec.build(spec.options(init="normal", **opts))
    linears = [m for root in (model, guide) for m in root.modules()
               if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 5
    big = [m.weight for m in linears if m.weight.numel() >= 3000]
    assert big and all(abs(float(w.std()) - 0.1) < 0.01 for w in big)
    assert all(m.bias is None or not m.bias.any() for m in linears)
    torch.manual_seed(0)
    default_model, _ = spec.build(spec.options(**opts))
    fan_in_300 = [m.weight for m in default_model.modules()
                  if isinstance(m, torch.nn.Linear) and m.in_features == 300]
    assert fan_in_300 and all(float(w.std()) < 0.04 for w in fan_in_300)  # U(±1/√300)
    with pytest.raises(ValueError, match="init must be one of"):
        spec.build(spec.options(init="xavier", **opts))
    with pytest.raises(ValueError, match="std must be positive"):
        init_linear_normal_(model, std=0.0)


@pytest.mark.parametrize("flow", ["iaf", "real_nvp"])
def test_reference_init_leaves_flow_guides_at_their_identity_start(flow):
    from pyro_seqlatent.registry import get_model

    spec = get_model("latent_ode")
    _, guide = spec.build(spec.options(dataset="periodic", init="normal", guide=flow))
    z, context = torch.randn(7, guide.site.latent_dim), torch.randn(7, guide.site.context_dim)
    for f in guide.site.flows:
        assert torch.allclose(f.condition(context)(z), z)


def test_training_and_evaluation_record_the_function_evaluations_of_model_and_guide():
    """``train`` logs the NFE of each step and ``evaluate`` those of its pass: the same counts as
    the same computations counted by hand (fixed-step solvers: the counts depend on the grid
    only)."""
    from pyro_seqlatent.data.irregular import IrregularDataset
    from pyro_seqlatent.infer import evaluate, log_marginal, train

    items = apply_task(make_periodic(6, 10, seed=1), "interp", fraction=0.5, seed=1)
    batch = union_grid_collate(items)

    def pair():
        torch.manual_seed(0)
        return (LatentODEModel(1, 3, ode_hidden_dims=(8,), method="euler"),
                LatentODEGuide(1, 3, hidden_dim=6, ode_hidden_dims=(8,)))

    model, guide = pair()
    reset_nfe(model, guide)
    pyro.infer.Trace_ELBO().differentiable_loss(model, guide, **batch).backward()
    by_hand = nfe_metrics(model, guide)
    assert min(by_hand.values()) > 0

    class IntCounter(nn.Module):  # another convention (torchdiffeq's examples): not a counter
        nfe = 0

        def reset_nfe(self):
            self.nfe = 0

    model, guide = pair()
    model.other = IntCounter()
    # validation after every step: its solves must not leak into the step's counts
    result = train(model, guide, IrregularDataset(items), valid_data=IrregularDataset(items),
                   valid_every=1, collate_fn=union_grid_collate, num_steps=2, batch_size=6,
                   lr=1e-3, progress=False)
    expected = {f"{owner}_nfe_{way}": by_hand[f"{prefix}_nfe_{way}"]
                for owner, prefix in (("model", "gen"), ("guide", "enc"))
                for way in ("forward", "backward")}
    assert [{key: record[key] for key in expected} for record in result.history] == [expected] * 2

    # the evaluation path sums its batches' counts (forward only: no gradients there)
    by_hand = {"model": 0, "guide": 0}
    for chunk in (items[:4], items[4:]):
        reset_nfe(model, guide)
        log_marginal(model, guide, union_grid_collate(chunk), num_samples=5)
        counts = nfe_metrics(model, guide)
        by_hand["model"] += counts["gen_nfe_forward"]
        by_hand["guide"] += counts["enc_nfe_forward"]
    ev = evaluate(model, guide, IrregularDataset(items), num_samples=5, batch_size=4,
                  collate_fn=union_grid_collate)
    assert min(by_hand.values()) > 0
    assert {key: ev[key] for key in expected} == {
        "model_nfe_forward": by_hand["model"], "model_nfe_backward": 0,
        "guide_nfe_forward": by_hand["guide"], "guide_nfe_backward": 0}

    # a model without counters logs no NFE
    rnn = RNNDeltaT(1, hidden_dim=4)
    result = train(rnn, EmptyGuide(), IrregularDataset(items), collate_fn=union_grid_collate,
                   num_steps=1, batch_size=6, lr=1e-3, progress=False)
    assert not any("nfe" in key for key in result.history[0])
    ev = evaluate(rnn, EmptyGuide(), IrregularDataset(items), num_samples=2, batch_size=6,
                  collate_fn=union_grid_collate)
    assert not any("nfe" in key for key in ev)
