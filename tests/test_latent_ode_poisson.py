r"""The Latent ODE's Poisson-process factor with several features (D > 1) against closed forms.

With :math:`\dot z = v` (constant velocity) and a linear log-rate
:math:`\log\lambda_d(z) = w_d^\top z + c_d`, the rate along the path is
:math:`\lambda_d(t) = e^{a_d + k_d t}` with :math:`a_d = w_d^\top z_0 + c_d`,
:math:`k_d = w_d^\top v`, so

.. math:: \log p = \sum_{i,d} e_{i,d}\,(a_d + k_d t_i) - \sum_d \Lambda_d(T),\qquad
          \Lambda_d(T) = \int_0^T \lambda_d = e^{a_d}\,\frac{e^{k_d T} - 1}{k_d},

summed over the features (per-feature rates, events :math:`e_{i,d} = m_{i,d}`), or one shared
rate with :math:`e_i = \max_d m_{i,d}`. Averaging the compensator over features instead of
summing it, or counting events per entry for a shared rate, changes these values.
"""

from __future__ import annotations

import math

import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from pyro_seqlatent.models.latent_ode import LatentODEModel
from pyro_seqlatent.nn.ode import CountingField

B, N, D, L = 3, 7, 4, 2


class ConstantVelocity(CountingField):
    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity

    def field(self, t, z):
        return self.velocity.expand_as(z)


def _model(num_rates, rates):
    model = LatentODEModel(D, latent_dim=L, poisson=True, rtol=1e-9, atol=1e-11,
                           poisson_rates=rates).double()
    velocity = torch.tensor([0.8, -0.5], dtype=torch.float64)
    model.func = ConstantVelocity(velocity)
    linear = nn.Linear(L, num_rates).double()
    with torch.no_grad():  # distinct rates and slopes per feature
        linear.weight.copy_(torch.linspace(-1.0, 1.2, num_rates * L).reshape(num_rates, L))
        linear.bias.copy_(torch.linspace(-0.7, 0.9, num_rates))
    model.log_rate = linear
    return model, velocity


def _batch(per_sequence: bool):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, N, D, generator=gen) < 0.5).double()
    obs_mask = mask * (torch.rand(B, N, D, generator=gen) < 0.6).double()
    mask[:, 1, :] = 0.0  # a time point with no observation at all
    mask[0, 2, :] = 1.0  # one with every feature
    mask[0, 3, 1], obs_mask[0, 3, 1] = 0.0, 1.0  # an entry only the encoder sees: an event too
    steps = torch.rand(B if per_sequence else 1, N, generator=gen, dtype=torch.float64) + 0.1
    times = steps.cumsum(-1) * 0.3
    return values, mask, (times if per_sequence else times[0]), obs_mask


def _closed_form(model, velocity, z0, mask, times, obs_mask, shared):
    w, c = model.log_rate.weight, model.log_rate.bias
    a = z0 @ w.T + c  # (B, R)
    k = velocity @ w.T  # (R,)
    times = times.expand(B, N)
    t_end = times[:, -1:]  # (B, 1): each sequence's window [0, its last time]
    compensator = (a.exp() * torch.expm1(k * t_end) / k).sum(-1)  # (B,) summed over rates
    events = torch.maximum(mask, obs_mask)  # (B, N, D)
    if shared:
        events = (events.sum(-1, keepdim=True) > 0).double()  # (B, N, 1)
    log_rate = a[:, None, :] + k * times[..., None]  # (B, N, R)
    return (events * log_rate).sum((-1, -2)) - compensator


def _poisson_factor(model, z0, values, mask, times, obs_mask):
    conditioned = poutine.condition(model, data={"z0": z0})
    trace = poutine.trace(conditioned).get_trace(values, mask, times, obs_mask)
    trace.compute_log_prob()
    return trace.nodes["poisson"]["log_prob"]


@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared_grid", "per_sequence"])
@pytest.mark.parametrize("rates", ["per_feature", "shared"])
def test_poisson_factor_with_several_features_matches_the_closed_form(rates, per_sequence):
    shared = rates == "shared"
    model, velocity = _model(1 if shared else D, rates)
    values, mask, times, obs_mask = _batch(per_sequence)
    z0 = torch.randn(B, L, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = _closed_form(model, velocity, z0, mask, times, obs_mask, shared)
    got = _poisson_factor(model, z0, values, mask, times, obs_mask)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)
    # the compensator alone: Lambda(T) from the augmented solve, summed over the D rates
    z, cum_rate = model.solve(z0, times)
    no_events = torch.zeros_like(mask)
    expected_total = -_closed_form(model, velocity, z0, no_events, times, no_events, shared)
    torch.testing.assert_close(-model.poisson_log_likelihood(z, cum_rate, no_events),
                               expected_total, rtol=1e-7, atol=1e-7)


def test_per_feature_compensator_is_the_sum_of_the_features_integrals():
    """Every feature with the same rate: D features pay D times one feature's integral."""
    model, _ = _model(D, "per_feature")
    with torch.no_grad():
        model.log_rate.weight.zero_()
        model.log_rate.bias.fill_(0.4)  # lambda_d = e^0.4 for every d
    values, mask, times, obs_mask = _batch(per_sequence=False)
    z0 = torch.zeros(B, L, dtype=torch.float64)
    got = _poisson_factor(model, z0, values, mask, times, obs_mask)
    events = torch.maximum(mask, obs_mask).sum((-1, -2))
    expected = events * 0.4 - D * math.exp(0.4) * times[-1]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
