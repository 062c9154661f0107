"""DeviceTrace_ELBO: Pyro's Trace_ELBO estimator, summed without host reads."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_seqlatent.infer import DeviceTrace_ELBO, make_elbo, train
from pyro_seqlatent.testing import count_host_syncs


class Mixed(nn.Module):
    """A reparameterized latent, a discrete (score-function) latent, and data in a plate."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(torch.sigmoid(self.w[0] + 0.1 * x)))
            pyro.sample("x", dist.Normal(z[0] + c * self.w[1], 1.0), obs=x)


class MixedGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor([0.1, 0.2]))
        self.logit = nn.Parameter(torch.tensor(0.4))

    def forward(self, x):
        pyro.sample("z", dist.Normal(self.loc, 0.7).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=self.logit + 0 * x))


@pytest.mark.parametrize("num_particles", [1, 3])
def test_same_loss_and_gradients_as_trace_elbo(num_particles):
    x = torch.randn(7)
    model, guide = Mixed(), MixedGuide()
    params = list(model.parameters()) + list(guide.parameters())
    results = []
    for elbo in (pyro.infer.Trace_ELBO(num_particles=num_particles),
                 DeviceTrace_ELBO(num_particles=num_particles)):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide, x)
        grads = torch.autograd.grad(loss, params)
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert all(g.abs().sum() > 0 for g in grads_b)  # both kinds of site carry gradient


def test_no_host_reads_where_trace_elbo_makes_one_per_site():
    x = torch.randn(7)
    model, guide = Mixed(), MixedGuide()
    counts = {}
    with pyro.validation_enabled(False):
        for name, elbo in (("pyro", pyro.infer.Trace_ELBO()), ("device", DeviceTrace_ELBO())):
            with count_host_syncs() as c:
                elbo.differentiable_loss(model, guide, x).backward()
            counts[name] = sum(c.values())
    assert counts["device"] == 0
    assert counts["pyro"] >= 5  # three model sites, two guide sites (and the loss)


def test_no_sample_sites_gives_a_zero_tensor():
    loss = DeviceTrace_ELBO().differentiable_loss(lambda: None, lambda: None)
    assert isinstance(loss, torch.Tensor) and float(loss) == 0.0
    assert isinstance(make_elbo("DeviceTrace_ELBO"), DeviceTrace_ELBO)


def test_vrnn_training_step_reads_the_host_a_fixed_number_of_times():
    """Per step, with DeviceTrace_ELBO and Pyro's validation off, the host reads do not grow with
    the sequence length (Trace_ELBO's grow by two per time step)."""
    from pyro_seqlatent.data.sequences import pad_collate
    from pyro_seqlatent.models.vrnn import build_vrnn

    def reads_per_step(T, elbo, validation):
        g = torch.Generator().manual_seed(0)
        seqs = [(torch.rand(T, 6, generator=g) < 0.3).float() for _ in range(8)]
        per_run = []
        for steps in (1, 3):
            pyro.clear_param_store()
            torch.manual_seed(0)
            model, guide = build_vrnn(6, z_dim=2, h_dim=8, feature_dim=8, hidden_dim=8)
            with count_host_syncs() as c:
                train(model, guide, seqs, collate_fn=pad_collate, num_steps=steps, batch_size=4,
                      elbo=elbo, pyro_validation=validation, progress=False)
            per_run.append(sum(c.values()))
        return (per_run[1] - per_run[0]) / 2

    short, long = (reads_per_step(T, "DeviceTrace_ELBO", False) for T in (4, 12))
    assert short == long
    pyro_short, pyro_long = (reads_per_step(T, "Trace_ELBO", None) for T in (4, 12))
    assert pyro_long - pyro_short >= 2 * 8


def test_the_estimator_labs_names_are_elbos_train_accepts():
    """``make_elbo`` / ``train(elbo=...)`` / ``--elbo`` take the lab's estimators by name: a
    VIMCO with the asked K trains the discrete latent of a model built here; unknown names
    and keywords other than num_particles are refused by name."""
    from pyro_seqlatent.infer.estimators_discrete import VIMCOELBO

    elbo = make_elbo("vimco", num_particles=3)
    assert isinstance(elbo, VIMCOELBO) and elbo.num_particles == 3
    with pytest.raises(ValueError, match="only num_particles"):
        make_elbo("reinforce_loo", vectorize_particles=True)
    with pytest.raises(ValueError, match="estimator of the lab"):
        make_elbo("vimcoo")
    torch.manual_seed(0)
    v = torch.tensor([1.5, -1.0, 0.5])

    def model(x):
        with pyro.plate("data", x.shape[-1]):
            h = pyro.sample("h", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("x", dist.Normal(h @ v, 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.zeros(3))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("h", dist.Bernoulli(logits=x.unsqueeze(-1) * a).to_event(1))

    x = torch.tensor([0.4, -1.2, 2.0, 0.3])
    pyro.clear_param_store()
    result = train(model, guide, list(x), elbo="vimco", elbo_kwargs={"num_particles": 3},
                   num_steps=5, batch_size=4, lr=0.05, progress=False, seed=0)
    assert result.step == 5 and pyro.param("a").abs().sum() > 0  # the guide learned
    with pytest.raises(ValueError, match="estimator of the lab"):
        train(model, guide, list(x), elbo="vimcoo", num_steps=1, progress=False)
    from pyro_seqlatent.infer.config import TrainConfig

    with pytest.raises(ValueError, match="num_particles >= 2"):  # at configuration, not step 1
        TrainConfig(elbo="reinforce_loo", elbo_kwargs={"num_particles": 1}, num_steps=1).validate()
