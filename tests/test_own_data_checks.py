"""Own data, bad data: guides check their inputs as their models do (one function per family),
ragged sequences get a collate or a clear error, irregular series take NaN where they are
unobserved (issue 28 item 2)."""

import pyro
import pytest
import torch
from torch.utils.data import TensorDataset

from pyro_seqlatent.data.irregular import IrregularDataset, union_grid_collate
from pyro_seqlatent.data.sequences import SequenceDataset, pad_collate
from pyro_seqlatent.infer import train
from pyro_seqlatent.infer.loader import make_loader
from pyro_seqlatent.models.latent_ode import LatentODEGuide, LatentODEModel
from pyro_seqlatent.models.ode_rnn import ODERNN
from pyro_seqlatent.models.rnn_baselines import RNNModel
from pyro_seqlatent.models.vae import VAE, VAEGuide, prepare_images
from pyro_seqlatent.models.vrnn import build_vrnn


def small_vae(likelihood="bernoulli", with_model=True):
    model = VAE(data_dim=16, latent_dim=2, hidden_dims=(8,), likelihood=likelihood)
    guide = VAEGuide(data_dim=16, latent_dim=2, hidden_dims=(8,),
                     model=model if with_model else None)
    return model, guide


def binary_images(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 4, 4, generator=gen) > 0.5).float()


# ------------------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("x, kind, match", [
    (torch.full((3, 16), 0.5), ValueError, "binary"),  # the guide knows the model's likelihood
    (torch.zeros(3, 10), ValueError, r"shape \(batch, 16\).*4x4"),
    (torch.tensor([[float("nan")] * 16]), ValueError, "NaN"),
    (torch.full((3, 4, 4), 200, dtype=torch.uint8), ValueError, "x / 255 > 0.5"),
])
def test_the_guide_refuses_bad_images_with_the_models_message_before_its_encoder_runs(x, kind,
                                                                                   match):
    model, guide = small_vae()
    with pytest.raises(kind, match=match):
        guide(x)
    with pytest.raises(kind, match=match):
        model(x)


def test_a_guide_without_the_model_checks_shape_and_values_but_not_binary():
    _, guide = small_vae(with_model=False)
    guide(torch.full((3, 16), 0.5))  # Gaussian data are fine for an encoder alone
    with pytest.raises(ValueError, match="NaN or inf"):
        guide(torch.tensor([[0.0] * 15 + [float("inf")]]))


def test_images_and_integer_pixels_are_converted_to_the_flat_float_batch():
    x = binary_images()
    flat = x.reshape(6, 16)
    for variant in (x, x.unsqueeze(1), x.to(torch.uint8), x.bool()):
        out = prepare_images(variant, 16, "bernoulli")
        assert out.dtype == torch.get_default_dtype() and torch.equal(out, flat)
    assert prepare_images(flat, 16, "bernoulli") is flat  # the usual batch: no copy
    model, guide = small_vae()
    pyro.set_rng_seed(0)
    z_images = guide(x.to(torch.uint8))
    pyro.set_rng_seed(0)
    assert torch.equal(z_images, guide(flat))


def test_image_label_pairs_train_and_labels_must_have_the_batch_size():
    model, guide = small_vae()
    data = TensorDataset(binary_images(8).reshape(8, 16), torch.arange(8))
    result = train(model, guide, data, num_steps=3, batch_size=4, lr=1e-2, progress=False)
    assert result.step == 3
    with pytest.raises(ValueError, match="labels"):
        guide(binary_images(4).reshape(4, 16), torch.arange(3))


# ------------------------------------------------------------------------------------ sequences
def jsb_like(lengths=(5, 3, 4), dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(t, dim, generator=gen) > 0.5).float() for t in lengths]


@pytest.mark.parametrize("build", ["vrnn", "rnn"])
def test_sequence_models_and_guides_refuse_bad_sequences_naming_the_fix(build):
    if build == "vrnn":
        model, guide = build_vrnn(3, z_dim=2, h_dim=4, feature_dim=4, hidden_dim=4)
        owners = (guide, model)
    else:
        owners = (RNNModel(3, h_dim=4, feature_dim=4, hidden_dim=4),)
    batch = pad_collate(jsb_like())
    x, mask = batch["x"], batch["mask"]
    for fn in owners:
        with pytest.raises(TypeError, match=r"x\.float\(\)"):
            fn(x.long(), mask)
        with pytest.raises(ValueError, match="binary"):
            fn(x + 0.5 * mask.unsqueeze(-1), mask)
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(torch.where(mask.unsqueeze(-1), x.new_tensor(float("nan")), x), mask)
        padded = torch.where(mask.unsqueeze(-1), x, x.new_tensor(float("nan")))  # NaN padding
        fn(padded, mask)  # accepted: padding may hold anything


def test_ragged_sequences_take_the_models_collate_or_get_the_fix():
    model, guide = build_vrnn(3, z_dim=2, h_dim=4, feature_dim=4, hidden_dim=4)
    data = SequenceDataset(jsb_like((5, 3, 4, 2)))
    result = train(model, guide, data, num_steps=2, batch_size=2, progress=False)
    assert result.step == 2
    with pytest.raises(ValueError, match="pad_collate"):
        next(iter(make_loader(data, batch_size=2)))

    def own_model(x):  # a model of the user's: no collate_fn attribute
        pass

    with pytest.raises(ValueError, match="different sizes.*pad_collate"):
        train(own_model, own_model, data, num_steps=1, batch_size=4, progress=False)


# ------------------------------------------------------------------------------ irregular series
def series(n=4, points=6, dim=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        times = torch.sort(torch.rand(points, generator=gen)).values + 0.01
        mask = (torch.rand(points, dim, generator=gen) > 0.3).float()
        mask[0] = 1.0
        items.append({"times": times, "values": torch.randn(points, dim, generator=gen) * mask,
                      "mask": mask})
    return union_grid_collate(items)


def latent_ode_pair():
    model = LatentODEModel(2, latent_dim=2, ode_hidden_dims=(8,), method="euler")
    guide = LatentODEGuide(2, latent_dim=2, hidden_dim=4, ode_hidden_dims=(4,),
                           guide_hidden_dims=(4,))
    return model, guide


def test_nan_where_unobserved_is_a_missing_value_and_scores_as_zero_there():
    batch = series()
    missing = dict(batch, values=batch["values"].masked_fill(batch["mask"] == 0, float("nan")))
    model, guide = latent_ode_pair()
    baseline = ODERNN(2, hidden_dim=4, ode_hidden_dims=(4,), decoder_hidden_dims=(4,))
    for fn in (guide, baseline):
        pyro.set_rng_seed(0)
        clean = pyro.poutine.trace(fn).get_trace(**batch)
        pyro.set_rng_seed(0)
        nan = pyro.poutine.trace(fn).get_trace(**missing)
        assert torch.isfinite(nan.log_prob_sum())
        assert torch.equal(nan.log_prob_sum(), clean.log_prob_sum())
    guide_trace = pyro.poutine.trace(guide).get_trace(**batch)
    with_model = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace))
    assert torch.equal(with_model.get_trace(**missing).log_prob_sum(),
                       with_model.get_trace(**batch).log_prob_sum())


@pytest.mark.parametrize("change, match", [
    (lambda b: dict(b, values=b["values"].masked_fill(b["mask"] == 1, float("nan"))),
     "NaN or inf at entries where mask is 1"),
    (lambda b: dict(b, mask=b["mask"] * 0.5), "mask must hold 0 and 1"),
    (lambda b: dict(b, obs_mask=b["mask"] * 0.5), "obs_mask must hold 0 and 1"),
    (lambda b: dict(b, values=b["values"].masked_fill(b["mask"] == 0, float("nan")),
                    obs_mask=torch.ones_like(b["mask"])),
     "NaN or inf at entries where obs_mask is 1"),
])
def test_irregular_batches_refuse_nan_where_observed_and_fractional_masks(change, match):
    batch = change(series())
    model, guide = latent_ode_pair()
    baseline = ODERNN(2, hidden_dim=4, ode_hidden_dims=(4,), decoder_hidden_dims=(4,))
    for fn in (guide, model, baseline):
        with pytest.raises(ValueError, match=match):
            fn(**batch)


def test_irregular_items_train_without_a_collate_fn():
    items = []
    gen = torch.Generator().manual_seed(1)
    for n in (4, 6, 5, 3):
        times = torch.sort(torch.rand(n, generator=gen)).values + 0.01
        values = torch.randn(n, 2, generator=gen)
        values[1, 0] = float("nan")  # missing, as real data mark it
        mask = torch.ones(n, 2)
        mask[1, 0] = 0.0
        items.append({"times": times, "values": values, "mask": mask})
    model, guide = latent_ode_pair()
    result = train(model, guide, IrregularDataset(items), num_steps=2, batch_size=2,
                   progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(r["loss"]))
                                    for r in result.history)


def test_evaluate_batches_ragged_sequences_with_the_models_collate_fn():
    """evaluate(), like train(), falls back on model.collate_fn: ragged sequences score without
    a collate_fn and equal the scores with pad_collate given explicitly."""
    from pyro_seqlatent.infer import evaluate

    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = build_vrnn(3, z_dim=2, h_dim=4, feature_dim=4, hidden_dim=4)
    data = SequenceDataset(jsb_like((5, 3, 4, 2)))
    implicit = evaluate(model, guide, data, num_samples=4, batch_size=4, seed=1)
    explicit = evaluate(model, guide, data, num_samples=4, batch_size=4, seed=1,
                        collate_fn=pad_collate)
    assert len(implicit["log_marginal_per_point"]) == 4
    torch.testing.assert_close(torch.as_tensor(implicit["log_marginal_per_point"]),
                               torch.as_tensor(explicit["log_marginal_per_point"]))


def test_run_summary_says_which_state_train_handed_back():
    from pyro_seqlatent.experiments.systems import run_summary

    pyro.clear_param_store()
    model, guide = build_vrnn(3, z_dim=2, h_dim=4, feature_dim=4, hidden_dim=4)
    data = SequenceDataset(jsb_like((5, 3, 4, 2)))
    result = train(model, guide, data, valid_data=data, num_steps=4, valid_every=2,
                   batch_size=4, return_best=True, progress=False)
    summary = run_summary(result)
    assert summary["state"] == "best" and summary["best_step"] in (2, 4)
