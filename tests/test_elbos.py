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
