"""train(..., return_best=True) hands back the best validation's parameters and says so;
score_sequences gives per-step and per-sequence -ELBO and NLL (issue 28 item 3)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pyro_seqlatent.data.sequences import SequenceDataset, pad_collate
from pyro_seqlatent.infer import BEST, restore_modules, score_sequences, train
from pyro_seqlatent.infer.scoring import sequence_steps


class Location(nn.Module):
    """x ~ N(loc, 1) with no latent; its guide is empty."""

    def __init__(self, loc=3.0):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(float(loc)))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, 1.0), obs=x)


def empty_guide(x):
    pass


def drifting_run(**settings):
    """Training pulls loc from 3 towards the train data (0) while the validation data sit at 3:
    every validation is worse than the one before, so the best is the first (step 1)."""
    pyro.clear_param_store()
    model = Location()
    result = train(model, empty_guide, TensorDataset(torch.zeros(8)),
                   valid_data=TensorDataset(torch.full((8,), 3.0)), valid_every=1,
                   num_steps=5, batch_size=8, lr=0.1, progress=False, **settings)
    return model, result


def test_return_best_hands_back_the_best_validations_parameters(tmp_path):
    pyro.clear_param_store()
    first = Location()
    train(first, empty_guide, TensorDataset(torch.zeros(8)), num_steps=1, batch_size=8, lr=0.1,
          progress=False)
    last, last_result = drifting_run()
    best, best_result = drifting_run(return_best=True)
    on_disk, _ = drifting_run(return_best=True, run_dir=tmp_path)
    assert last_result.state == "last" and best_result.state == "best"
    valid = [r["valid_loss"] for r in best_result.history]
    assert valid == sorted(valid) and best_result.best_step == 1 == last_result.best_step
    assert best.loc.item() == first.loc.item() != last.loc.item()  # the step-1 parameters
    assert on_disk.loc.item() == first.loc.item()
    reloaded = Location()
    restore_modules(tmp_path / BEST, reloaded, empty_guide)
    assert reloaded.loc.item() == first.loc.item()


def test_return_best_with_averaging_hands_back_the_averaged_best(tmp_path):
    averaged, result = drifting_run(return_best=True, ema_decay=0.5, run_dir=tmp_path)
    reloaded = Location()
    restore_modules(tmp_path / BEST, reloaded, empty_guide)
    assert result.state == "best" and averaged.loc.item() == reloaded.loc.item()


def test_return_best_needs_validation():
    with pytest.raises(ValueError, match="return_best=True .*valid_data"):
        train(Location(), empty_guide, TensorDataset(torch.zeros(4)), num_steps=1,
              batch_size=4, return_best=True, progress=False)


# --------------------------------------------------------------------------------- scoring
class StepNoise(nn.Module):
    r"""z_t ~ N(0, 1), x_t ~ N(z_t, s^2) for the unmasked steps: log p(x) = sum_t
    log N(x_t; 0, 1 + s^2) exactly."""

    collate_fn = staticmethod(pad_collate)

    def __init__(self, s=0.8):
        super().__init__()
        self.s = s

    def forward(self, x, mask):
        with pyro.plate("data", x.shape[0], dim=-1):
            prior = dist.Normal(x.new_zeros(x.shape), 1.0).to_event(1).mask(mask).to_event(1)
            z = pyro.sample("z", prior)
            like = dist.Normal(z, self.s).to_event(1).mask(mask).to_event(1)
            pyro.sample("x", like, obs=x)


class StepGuide(nn.Module):
    """q(z_t | x_t) = N(a x_t, v): the exact posterior at a = 1/(1 + s^2), v = s^2/(1 + s^2)."""

    def __init__(self, a, v):
        super().__init__()
        self.a, self.v = a, v

    def forward(self, x, mask):
        with pyro.plate("data", x.shape[0], dim=-1):
            q = dist.Normal(self.a * x, math.sqrt(self.v)).to_event(1).mask(mask).to_event(1)
            pyro.sample("z", q)


def sequences():
    gen = torch.Generator().manual_seed(3)
    return SequenceDataset([torch.randn(t, 1, generator=gen) for t in (4, 1, 6, 3, 5)])


def exact_log_px(data, s):
    return torch.tensor([float(dist.Normal(0.0, math.sqrt(1 + s * s)).log_prob(x).sum())
                         for x in data.sequences], dtype=torch.float64)


def closed_form_elbo(data, s, a, v):
    """E_q[log p(z) + log p(x | z) - log q(z)] for q = N(a x, v), summed over the steps."""
    out = []
    for x in data.sequences:
        m = a * x.double()
        prior = -0.5 * math.log(2 * math.pi) - 0.5 * (m**2 + v)
        like = -0.5 * math.log(2 * math.pi * s * s) - ((x - m) ** 2 + v) / (2 * s * s)
        entropy = 0.5 * math.log(2 * math.pi * math.e * v)
        out.append(float((prior + like + entropy).sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_with_the_exact_posterior_both_scores_are_the_exact_log_likelihood():
    s = 0.8
    data = sequences()
    scores = score_sequences(StepNoise(s), StepGuide(1 / (1 + s * s), s * s / (1 + s * s)),
                             data, num_samples=3, batch_size=2)  # the model's pad_collate
    exact = exact_log_px(data, s)
    assert torch.allclose(scores.nll, -exact, atol=1e-4)
    assert torch.allclose(scores.neg_elbo, -exact, atol=1e-4)
    assert scores.steps.tolist() == [4, 1, 6, 3, 5]
    assert math.isclose(scores.nll_per_step, float(-exact.sum() / 19), rel_tol=1e-5)
    assert math.isclose(scores.nll_per_sequence, float(-exact.mean()), rel_tol=1e-5)
    assert scores.as_dict()["num_steps"] == 19


def test_with_another_guide_the_elbo_is_its_closed_form_and_the_nll_is_exact():
    s, a, v = 0.8, 0.5, 0.6
    data = sequences()
    k = 4000
    scores = score_sequences(StepNoise(s), StepGuide(a, v), data, pad_collate, num_samples=k,
                             batch_size=5, seed=1)
    elbo = closed_form_elbo(data, s, a, v)
    # the mean of k log-weights: within 5 standard errors of E_q[log w] (its variance bounded
    # by that of log w over the steps, here < 4 per step)
    assert torch.all((scores.neg_elbo + elbo).abs() < 5 * torch.sqrt(4 * scores.steps / k))
    assert torch.allclose(scores.nll, -exact_log_px(data, s), atol=0.03)
    assert scores.neg_elbo_per_step > scores.nll_per_step  # the gap of a worse guide


def test_sequence_steps_counts_the_scored_steps_of_each_layout():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert sequence_steps({"x": torch.zeros(2, 3, 1), "mask": mask}).tolist() == [2, 1]
    irregular = torch.zeros(2, 3, 2)
    irregular[0, 0, 1] = irregular[0, 2, 0] = irregular[1, 1, 1] = 1.0
    assert sequence_steps({"values": irregular, "mask": irregular}).tolist() == [2, 1]
    assert sequence_steps(torch.zeros(2, 5, 1)).tolist() == [5, 5]
    with pytest.raises(ValueError, match="collate_fn"):
        sequence_steps(torch.zeros(4))
