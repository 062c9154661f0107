r"""Deterministic baselines of the Latent ODE paper, trained on the same batches and metrics.

``ODERNN`` (Rubanova et al. 2019, Algorithm 1), forward in time:

.. math:: h'_i = \mathrm{ODESolve}(f_\theta, h_{i-1}, t_{i-1} \to t_i),\quad
          \hat x_i = \mathrm{dec}(h'_i),\quad
          h_i = \mathrm{GRU}(h'_i, [x_i \odot m_i, m_i]) \text{ where observed, else } h'_i.

``RNNDeltaT`` (the "RNN-Δt" baseline): the state stays constant between observations and the
elapsed time :math:`\Delta_i = t_i - \tau_{i}` since the last encoder-visible observation
:math:`\tau_i` is an input:

.. math:: \hat x_i = \mathrm{dec}([h_{i-1}, \Delta_i]),\quad
          h_i = \mathrm{GRU}(h_{i-1}, [x_i \odot m_i, m_i, \Delta_i]) \text{ where observed}.

Both predict :math:`x_i` *before* reading it (no leakage), read only ``obs_mask`` entries, and
are scored on ``mask`` entries with a Gaussian likelihood of fixed :math:`\sigma` — so the ELBO
(no latent variables, empty guide) is :math:`-\frac{1}{2\sigma^2}\,\mathrm{SSE} + c`, i.e.
masked-MSE training, vectorized over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_seqlatent.data.irregular import union_grid_collate
from pyro_seqlatent.models.latent_ode import checked_batch
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.nn.ode import ODERNNCell, run_odernn


class _Baseline(nn.Module):
    obs_std: float
    #: how to batch a dataset of items with their own times (``train`` uses it when given none)
    collate_fn = staticmethod(union_grid_collate)

    def predict(self, values, mask, times, obs_mask=None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, values, mask, times, obs_mask=None):
        pyro.module(self._pyro_name, self)
        values, obs_mask = checked_batch(values, mask, times, obs_mask)  # NaN where unobserved
        pred = self.predict(values, mask, times, obs_mask)
        with pyro.plate("data", values.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(pred, self.obs_std).mask(mask.bool()).to_event(2),
                        obs=values)
        return pred


class ODERNN(_Baseline):
    """ODE-RNN baseline; see the module docstring."""

    _pyro_name = "ode_rnn"

    def __init__(self, data_dim: int, hidden_dim: int = 50, ode_hidden_dims: Sequence[int] = (50,),
                 decoder_hidden_dims: Sequence[int] = (50,), obs_std: float = 0.01,
                 max_step_fraction: float = 1 / 50, method: str = "euler"):
        super().__init__()
        self.cell = ODERNNCell(data_dim, hidden_dim, ode_hidden_dims, method=method)
        self.decoder = MLP(hidden_dim, decoder_hidden_dims, data_dim)
        self.obs_std = float(obs_std)
        self.max_step_fraction = float(max_step_fraction)

    @property
    def func(self):
        return self.cell.func

    def predict(self, values, mask, times, obs_mask=None):
        values, obs_mask = checked_batch(values, mask, times, obs_mask)
        _, pre = run_odernn(self.cell, times, values, obs_mask, return_pre_update=True,
                            max_step_fraction=self.max_step_fraction)
        return self.decoder(pre)


class RNNDeltaT(_Baseline):
    """RNN with the elapsed time as input; see the module docstring."""

    _pyro_name = "rnn_dt"

    def __init__(self, data_dim: int, hidden_dim: int = 50,
                 decoder_hidden_dims: Sequence[int] = (50,), obs_std: float = 0.01):
        super().__init__()
        self.gru = nn.GRUCell(2 * data_dim + 1, hidden_dim)
        self.decoder = MLP(hidden_dim + 1, decoder_hidden_dims, data_dim)
        self.hidden_dim = int(hidden_dim)
        self.obs_std = float(obs_std)

    def predict(self, values, mask, times, obs_mask=None):
        values, obs_mask = checked_batch(values, mask, times, obs_mask)
        b, n, _ = values.shape
        t = times if times.dim() == 2 else times.expand(b, n)
        h = values.new_zeros(b, self.hidden_dim)
        last = t[:, 0]
        preds = []
        for i in range(n):
            delta = (t[:, i] - last).unsqueeze(-1).to(values.dtype)
            preds.append(self.decoder(torch.cat([h, delta], -1)))
            m = obs_mask[:, i]
            seen = m.sum(-1, keepdim=True) > 0
            new = self.gru(torch.cat([values[:, i] * m, m, delta], -1), h)
            h = torch.where(seen, new, h)
            last = torch.where(seen.squeeze(-1), t[:, i], last)
        return torch.stack(preds, dim=1)


class EmptyGuide(nn.Module):
    """The guide of a model without latent variables."""

    def forward(self, *args, **kwargs):
        return None


def _register():
    from pyro_seqlatent.data.irregular import union_grid_collate
    from pyro_seqlatent.models.latent_ode import (
        DATA_CHOICES,
        DATA_DEFAULTS,
        DATA_HELP,
        data_dim,
        system_datasets,
    )
    from pyro_seqlatent.registry import ModelSpec, register_model

    def build_ode_rnn(options):
        hidden = (options["ode_units"],) * options["ode_layers"]
        return (ODERNN(data_dim(options), options["hidden_dim"], hidden,
                       obs_std=options["obs_std"]), EmptyGuide())

    def build_rnn_dt(options):
        return RNNDeltaT(data_dim(options), options["hidden_dim"], obs_std=options["obs_std"]), \
            EmptyGuide()

    common = {**DATA_DEFAULTS, "hidden_dim": 50, "obs_std": 0.01}
    helps = {**DATA_HELP, "hidden_dim": "state size of the recurrent network",
             "obs_std": "standard deviation sigma of the Gaussian observation noise",
             "ode_units": "width of each hidden layer of the ODE between observations",
             "ode_layers": "hidden layers of the ODE between observations"}
    groups = {"data": list(DATA_DEFAULTS)}
    train_defaults = {"batch_size": 50, "lr": 1e-2, "clip_norm": 1e4, "valid_every": 100}
    register_model(ModelSpec(
        name="ode_rnn", build=build_ode_rnn, datasets=system_datasets,
        defaults={**common, "ode_units": 50, "ode_layers": 1}, collate_fn=union_grid_collate,
        train_defaults=train_defaults, option_help=helps, option_choices=DATA_CHOICES,
        option_groups=groups,
        description="ODE-RNN baseline (Rubanova et al. 2019, Algorithm 1), deterministic"))
    register_model(ModelSpec(
        name="rnn_dt", build=build_rnn_dt, datasets=system_datasets, defaults=common,
        collate_fn=union_grid_collate, train_defaults=train_defaults,
        option_help={k: v for k, v in helps.items() if k in common},
        option_choices=DATA_CHOICES, option_groups=groups,
        description="GRU with the elapsed time Δt as input (RNN-Δt baseline), deterministic"))


_register()
