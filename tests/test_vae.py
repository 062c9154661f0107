"""VAE: hand-computed ELBO, estimators A/B, reusable guides, MAP mode, bad input, training."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from conftest import require_data
from pyro_seqlatent.guides import FlowGuide, MeanFieldGuide
from pyro_seqlatent.infer import log_marginal, train
from pyro_seqlatent.models.vae import VAE, VAEGuide


def small_vae(guide="meanfield", **kw):
    model = VAE(data_dim=12, latent_dim=3, hidden_dims=(16,), **kw)
    return model, VAEGuide(12, 3, (16,), guide=guide, num_flows=2, model=model,
                           map_decoder="weight_prior_scale" in kw)


def binary(n=6, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.3).float()


def test_elbo_matches_hand_computation():
    model, guide = small_vae()
    x = binary()
    pyro.set_rng_seed(5)
    loss_a = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x)
    pyro.set_rng_seed(5)
    loss_b = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide, x)
    pyro.set_rng_seed(5)
    z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    with torch.no_grad():
        loc, scale = guide.site.loc_scale(guide.encoder(x))
        logits = model.decoder(z)
        loglik = (x * logits - torch.nn.functional.softplus(logits)).sum()
        log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum()
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum()
        kl = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum()
    assert torch.allclose(loss_a, -(loglik + log_prior - log_q), rtol=1e-5)
    assert torch.allclose(loss_b, -(loglik - kl), rtol=1e-5)


def test_estimators_a_and_b_agree_in_expectation():
    model, guide = small_vae()
    x = binary(n=4)
    n = 600
    with torch.no_grad():
        a = torch.stack([pyro.infer.Trace_ELBO().loss(model, guide, x) * torch.ones(())
                         for _ in range(n)])
        b = torch.stack([pyro.infer.TraceMeanField_ELBO().loss(model, guide, x) * torch.ones(())
                         for _ in range(n)])
    diff = a.mean() - b.mean()
    se = (a.var() / n + b.var() / n).sqrt()
    assert diff.abs() < 4 * se
    assert b.var() < a.var()  # the analytic KL removes variance


def test_site_guide_is_reused_by_two_models():
    site = FlowGuide(context_dim=5, latent_dim=3, flow="iaf", num_flows=2)

    class GuideA(nn.Module):  # a VAE-style guide
        def __init__(self):
            super().__init__()
            self.site, self.enc = site, nn.Linear(12, 5)

        def forward(self, x):
            with pyro.plate("data", x.shape[-2]):
                self.site.sample("z", self.enc(x))

    class LinearModel(nn.Module):  # a second, tiny model with the same latent name
        def __init__(self):
            super().__init__()
            self.W = nn.Linear(3, 12)

        def forward(self, x):
            with pyro.plate("data", x.shape[-2]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.W(z), 1.0).to_event(1), obs=x)

    model_a = VAE(data_dim=12, latent_dim=3, hidden_dims=(8,))
    guide_a = GuideA()
    x = binary()
    r1 = train(model_a, guide_a, x, num_steps=3, batch_size=6, progress=False)
    r2 = train(LinearModel(), guide_a, x, num_steps=3, batch_size=6, progress=False)
    assert len(r1.history) == len(r2.history) == 3
    assert math.isfinite(log_marginal(LinearModel(), guide_a, x, num_samples=5)
                         .log_marginal.sum().item())
    assert isinstance(MeanFieldGuide(5, 3)(torch.zeros(2, 5)), dist.Independent)


def test_map_mode_adds_exactly_the_weight_prior():
    model, guide = small_vae(weight_prior_scale=0.5)
    ml_model, _ = small_vae()
    ml_model.load_state_dict(model.state_dict())
    plain_guide = VAEGuide(12, 3, (16,))
    plain_guide.load_state_dict({k: v for k, v in guide.state_dict().items()
                                 if not k.startswith("map_values")})
    x = binary()
    pyro.set_rng_seed(1)
    loss_map = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x)
    pyro.set_rng_seed(1)
    loss_ml = pyro.infer.Trace_ELBO().differentiable_loss(ml_model, plain_guide, x)
    log_prior = sum(dist.Normal(0.0, 0.5).log_prob(p).sum() for p in guide.map_values)
    assert torch.allclose(loss_map - loss_ml, -log_prior, rtol=1e-4)
    # the MAP sites are point estimates outside the data plate: log_marginal leaves them out
    # and equals the maximum-likelihood model's log p(x) at the same weights, bit for bit
    pyro.set_rng_seed(2)
    lm = log_marginal(model, guide, x, num_samples=7)
    pyro.set_rng_seed(2)
    lm_ml = log_marginal(ml_model, plain_guide, x, num_samples=7)
    assert torch.allclose(lm.log_marginal, lm_ml.log_marginal)
    # it trains through the same core; the prior pulls the weights in; and the trained weights
    # are the model decoder's own (what generate / sample use)
    before = sum(p.norm() ** 2 for p in guide.map_values).item()
    train(model, guide, x, num_steps=30, batch_size=6, lr=0.05, progress=False)
    after = sum(p.norm() ** 2 for p in guide.map_values).item()
    assert after < before
    assert torch.equal(model.decoder.linears[0].weight, guide.map_values[0])
    assert not torch.equal(model.decoder.linears[0].weight, ml_model.decoder.linears[0].weight)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.full((2, 12), 0.5), "binary"),
        (torch.zeros(2, 10), "shape"),
        (torch.zeros(12), "shape"),
        (torch.tensor([[float("nan")] * 12]), "NaN"),
    ],
)
def test_bad_input_is_a_clear_error(x, match):
    model, guide = small_vae()
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(ValueError, match="guide="):
        VAEGuide(guide="maf")


@pytest.mark.parametrize("x, likelihood, match", [
    (torch.tensor([[0.0] * 11 + [float("inf")]]), "bernoulli", "NaN or inf"),
    (torch.tensor([[0.0] * 11 + [-1e-45]]), "bernoulli", "binary"),  # the smallest non-0
    (torch.tensor([[1.0] * 11 + [1 - 2**-24]]), "bernoulli", "binary"),  # the largest below 1
    (torch.tensor([[0.0] * 11 + [2.0]], dtype=torch.float64), "bernoulli", "binary"),
    (torch.tensor([[0, 1] * 5 + [1, 3]]), "bernoulli", "binary"),  # integers: the slow checks
    (torch.tensor([[0.5] * 11 + [float("nan")]]), "gaussian", "NaN or inf"),
    (torch.tensor([[0.5] * 11 + [float("-inf")]]), "gaussian", "NaN or inf"),
    (torch.tensor([[3e38] * 12]), "gaussian", None),  # the sum overflows; the values are fine
    (torch.tensor([[0.0, 1.0, -0.0] * 4], dtype=torch.float64), "bernoulli", None),
    (torch.tensor([[0, 1] * 6]), "bernoulli", None),
])
def test_the_one_pass_data_check_decides_as_the_full_checks(x, likelihood, match):
    model = VAE(data_dim=12, latent_dim=3, hidden_dims=(16,), likelihood=likelihood)
    if match is None:
        model.check_data(x)
    else:
        with pytest.raises(ValueError, match=match):
            model.check_data(x)


@pytest.mark.parametrize("guide", ["meanfield", "iaf", "real_nvp", "planar"])
def test_jit_training_freezes_no_check_into_its_trace(guide):
    """The shape and value checks are skipped while torch.jit traces (they ran on the untraced
    first call): no TracerWarning, from this project or from torch's BCE size check."""
    import warnings

    model, guide = small_vae(guide)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        result = train(model, guide, binary(n=20), num_steps=2, batch_size=10,
                       elbo="JitTrace_ELBO", progress=False)
    assert result.step == 2 and math.isfinite(result.final_loss)


def test_short_training_on_real_mnist_lowers_the_loss():
    require_data("binarized_mnist/binarized_mnist_train.mat")
    from pyro_seqlatent.data.mnist import BinarizedMNIST

    data = BinarizedMNIST("train", limit=1000)
    model = VAE(latent_dim=8, hidden_dims=(128,))
    guide = VAEGuide(latent_dim=8, hidden_dims=(128,), guide="planar", num_flows=2)
    result = train(model, guide, data, num_steps=120, batch_size=100, lr=3e-3, progress=False)
    first = sum(r["loss"] for r in result.history[:10]) / 10
    last = sum(r["loss"] for r in result.history[-10:]) / 10
    assert first > 400 and last < first - 150
