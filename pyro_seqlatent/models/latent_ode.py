r"""Latent ODE (Chen et al. 2018; Rubanova et al. 2019) as a Pyro model/guide pair.

Generative model, for sequence :math:`b` observed at times :math:`t_{b,i}` with feature masks
:math:`m_{b,i,d}`:

.. math::
    z_0 \sim \mathcal N(0, I),\qquad z(t) = z_0 + \int_{t_0}^{t} f_\theta(z(s))\,ds
    \ \ (\texttt{odeint}),\qquad
    x_{b,i,d} \sim \mathcal N\bigl(\mathrm{dec}(z(t_{b,i}))_d,\ \sigma^2\bigr)^{m_{b,i,d}},

plus, when ``poisson=True``, the Poisson-process factor over observation times (Chen et al.
§5), with :math:`\Lambda(t) = \int_{t_0}^t \lambda(z(s))\,ds` solved as extra ODE state:

.. math:: \log p(t_1, \dots, t_N \mid z) = \sum_{i,r} e_{i,r} \log\lambda_r(z(t_i))
          - \sum_r \bigl(\Lambda_r(t_\mathrm{end}) - \Lambda_r(t_\mathrm{start})\bigr),

with one rate per feature (``poisson_rates="per_feature"``, the reference; events
:math:`e_{i,d} = m_{i,d}`) or one shared rate (``"shared"``; :math:`e_i = \max_d m_{i,d}`).
The window is :math:`[t_0, t_\mathrm{end}]`, :math:`t_\mathrm{end}` = last time of the batch grid
(per-sequence grids: the sequence's own last time).

Guide: the ODE-RNN encoder (:func:`pyro_seqlatent.nn.ode.run_odernn`) runs backwards from
:math:`t_N` to :math:`t_0` over the encoder-visible entries ``obs_mask`` and its final state is
the context of a site guide :math:`q(z_0 \mid x, t)` (diagonal Normal or a flow guide).

Batches are dicts ``{"values": (B, N, D), "mask": (B, N, D), "times": (N,) or (B, N),
"obs_mask": (B, N, D)}`` (``mask``: entries scored; ``obs_mask``: entries the encoder sees,
default ``mask``). ``z0`` may carry leading particle dimensions; the solve treats them as batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_seqlatent.data.irregular import validate_times
from pyro_seqlatent.guides import FlowGuide, MeanFieldGuide, SiteGuide
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.nn.ode import (
    ODEFunc,
    ODERNNCell,
    PoissonAugmentedField,
    odeint_times,
    run_odernn,
)

GUIDES = ("meanfield", "planar", "radial", "iaf", "iaf_gated", "nice", "real_nvp")
POISSON_RATES = ("per_feature", "shared")


def check_batch(values, mask, times, obs_mask=None, t0: float | None = None):
    """Validate a batch; returns ``obs_mask`` (``mask`` when not given)."""
    for name, x in (("values", values), ("mask", mask)):
        if not torch.is_tensor(x) or x.dim() != 3:
            raise ValueError(f"{name} must be a (B, N, D) tensor, got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, values {tuple(values.shape)}")
    validate_times(times, name="times")
    b, n, _ = values.shape
    if times.shape[-1] != n or (times.dim() == 2 and times.shape[0] != b):
        raise ValueError(f"times has shape {tuple(times.shape)}; expected ({n},) or ({b}, {n}) "
                         f"for values of shape {tuple(values.shape)}")
    if t0 is not None and bool((times[..., 0] < t0).any()):
        raise ValueError(f"times start before t0={t0}; z0 lives at t0, so every time must be "
                         ">= t0 (set the model's t0 to the start of the observation window)")
    if obs_mask is None:
        return mask
    if obs_mask.shape != values.shape:
        raise ValueError(f"obs_mask has shape {tuple(obs_mask.shape)}, values "
                         f"{tuple(values.shape)}")
    return obs_mask


def prepend_t0(times, t0: float):
    """``(grid, added)``: ``times`` with ``t0`` prepended when it starts later than ``t0``
    (any row, for per-sequence times)."""
    first = times[..., :1]
    if bool((first == t0).all()):
        return times, False
    start = torch.full_like(first, t0)
    return torch.cat([start, times], dim=-1), True


def make_site_guide(kind: str, context_dim: int, latent_dim: int, hidden_dims=(),
                    num_flows: int = 4) -> SiteGuide:
    if kind == "meanfield":
        return MeanFieldGuide(context_dim, latent_dim, hidden_dims)
    if kind in GUIDES:
        return FlowGuide(context_dim, latent_dim, flow=kind, num_flows=num_flows,
                         hidden_dims=hidden_dims)
    raise ValueError(f"guide={kind!r} is not one of {GUIDES}")


class LatentODEModel(nn.Module):
    r"""The generative model (see the module docstring).

    :param data_dim: ``D``. :param latent_dim: ``L``.
    :param ode_hidden_dims: hidden layers of the tanh MLP :math:`f_\theta`.
    :param decoder_hidden_dims: ``()`` = a Linear decoder (the reference).
    :param obs_std: :math:`\sigma` (0.01 in the reference).
    :param poisson: add the Poisson-process factor ``"poisson"``.
    :param poisson_rates: ``"per_feature"`` or ``"shared"``.
    :param method, rtol, atol, adjoint: torchdiffeq solver settings (dopri5, 1e-3, 1e-4).
    :param t0: time at which ``z0`` lives (times must be ``>= t0``).
    """

    def __init__(self, data_dim: int, latent_dim: int = 10,
                 ode_hidden_dims: Sequence[int] = (50, 50),
                 decoder_hidden_dims: Sequence[int] = (), obs_std: float = 0.01,
                 poisson: bool = False, poisson_rates: str = "per_feature",
                 rate_hidden_dims: Sequence[int] = (50,), method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-4, adjoint: bool = False, t0: float = 0.0):
        super().__init__()
        if poisson_rates not in POISSON_RATES:
            raise ValueError(f"poisson_rates={poisson_rates!r}: use one of {POISSON_RATES}")
        if not obs_std > 0:
            raise ValueError(f"obs_std must be positive, got {obs_std!r}")
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)
        self.func = ODEFunc(self.latent_dim, ode_hidden_dims, activation="tanh")
        self.decoder = MLP(self.latent_dim, decoder_hidden_dims, self.data_dim)
        self.obs_std = float(obs_std)
        self.poisson = bool(poisson)
        self.poisson_rates = poisson_rates
        self.num_rates = self.data_dim if poisson_rates == "per_feature" else 1
        self.log_rate = MLP(self.latent_dim, rate_hidden_dims, self.num_rates, activation="tanh")
        self.solver = {"method": method, "rtol": rtol, "atol": atol, "adjoint": adjoint}
        self.t0 = float(t0)

    def solve(self, z0: torch.Tensor, times: torch.Tensor, with_rate: bool | None = None):
        r"""``z(t)`` ``(..., B, N, L)`` at ``times`` from ``z0`` ``(..., B, L)`` at ``t0``, and
        :math:`\Lambda(t)` ``(..., B, N, R)`` (``None`` without the Poisson state)."""
        with_rate = self.poisson if with_rate is None else with_rate
        grid, added = prepend_t0(times, self.t0)
        if with_rate:
            state0 = torch.cat([z0, z0.new_zeros(*z0.shape[:-1], self.num_rates)], dim=-1)
            field = PoissonAugmentedField(self.func, self.log_rate, self.latent_dim)
        else:
            state0, field = z0, self.func
        # shared grid (N,): state (..., B, L) -> (..., B, N, L); per-sequence (B, N): rescaled
        traj = odeint_times(field, state0, grid, **self.solver)
        if added:
            traj = traj[..., 1:, :]
        z = traj[..., : self.latent_dim]
        return z, (traj[..., self.latent_dim:] if with_rate else None)

    def poisson_log_likelihood(self, z, cum_rate, event_mask, window_start=None):
        r""":math:`\sum e\,\log\lambda(z(t_i)) - \sum_r(\Lambda_r(t_\mathrm{end}) -
        \Lambda_r(t_\mathrm{start}))`, shape ``(..., B)``; ``window_start`` defaults to
        :math:`\Lambda(t_0) = 0`."""
        log_rate = self.log_rate(z)
        if self.poisson_rates == "shared":
            event_mask = (event_mask.sum(-1, keepdim=True) > 0).to(z.dtype)
        start = 0.0 if window_start is None else window_start
        total = (cum_rate[..., -1, :] - start).sum(-1)
        return (log_rate * event_mask).sum((-1, -2)) - total

    def forward(self, values, mask, times, obs_mask=None):
        pyro.module("latent_ode_model", self)
        obs_mask = check_batch(values, mask, times, obs_mask, self.t0)
        b = values.shape[0]
        with pyro.plate("data", b, dim=-1):
            prior = dist.Normal(values.new_zeros(b, self.latent_dim),
                                values.new_ones(b, self.latent_dim)).to_event(1)
            z0 = pyro.sample("z0", prior)
            z, cum_rate = self.solve(z0, times)
            loc = self.decoder(z)
            pyro.sample("x", dist.Normal(loc, self.obs_std).mask(mask.bool()).to_event(2),
                        obs=values)
            if self.poisson:
                events = torch.maximum(mask, obs_mask).to(values.dtype)
                pyro.factor("poisson", self.poisson_log_likelihood(z, cum_rate, events))
        return loc


class LatentODEGuide(nn.Module):
    r""":math:`q(z_0 \mid x, t)`: ODE-RNN run backwards over ``obs_mask`` entries, then a site
    guide on its final state (the state at :math:`t_0`)."""

    def __init__(self, data_dim: int, latent_dim: int = 10, hidden_dim: int = 40,
                 ode_hidden_dims: Sequence[int] = (50,), guide: str | SiteGuide = "meanfield",
                 guide_hidden_dims: Sequence[int] = (50,), num_flows: int = 4,
                 max_step_fraction: float = 1 / 50, t0: float = 0.0):
        super().__init__()
        self.cell = ODERNNCell(data_dim, hidden_dim, ode_hidden_dims)
        if isinstance(guide, SiteGuide):
            self.site = guide
        else:
            self.site = make_site_guide(guide, hidden_dim, latent_dim, guide_hidden_dims,
                                        num_flows)
        self.latent_dim = int(latent_dim)
        self.max_step_fraction = float(max_step_fraction)
        self.t0 = float(t0)

    def encode(self, values, times, obs_mask) -> torch.Tensor:
        """The encoder state at :math:`t_0`, ``(B, H)``."""
        grid, added = prepend_t0(times, self.t0)
        if added:
            pad = values.new_zeros(values.shape[0], 1, values.shape[-1])
            values, obs_mask = torch.cat([pad, values], 1), torch.cat([pad, obs_mask], 1)
        return run_odernn(self.cell, grid, values, obs_mask, backwards=True,
                          max_step_fraction=self.max_step_fraction)

    def posterior(self, values, mask, times, obs_mask=None) -> dist.Distribution:
        obs_mask = check_batch(values, mask, times, obs_mask, self.t0)
        return self.site(self.encode(values, times, obs_mask))

    def forward(self, values, mask, times, obs_mask=None):
        pyro.module("latent_ode_guide", self)
        q = self.posterior(values, mask, times, obs_mask)
        with pyro.plate("data", values.shape[0], dim=-1):
            return pyro.sample("z0", q)


def nfe_metrics(model: nn.Module, guide: nn.Module | None = None) -> dict:
    """Function evaluations of the generative ODE (and the encoder's ODE) since the last reset."""
    out = {}
    for prefix, module in (("gen", model), ("enc", guide)):
        if module is None:
            continue
        func = getattr(module, "func", None) or getattr(getattr(module, "cell", None), "func",
                                                        None)
        if func is not None:
            out.update({f"{prefix}_{k}": v for k, v in func.nfe.items()})
    return out


def reset_nfe(*modules) -> None:
    for module in modules:
        for sub in module.modules():
            if hasattr(sub, "reset_nfe"):
                sub.reset_nfe()


@torch.no_grad()
def predict(model, guide, batch: dict, num_samples: int = 8, times=None) -> torch.Tensor:
    """Posterior predictive mean of the observations, ``(B, N', D)`` at ``times`` (default the
    batch's): the mean over ``num_samples`` draws of :math:`z_0 \\sim q` of
    :math:`\\mathrm{dec}(z(t))`; deterministic baselines return their one-step predictions."""
    if hasattr(model, "predict"):
        return model.predict(**batch)
    return forecast(model, guide, batch, times=times, num_samples=num_samples)["mean"]


@torch.no_grad()
def forecast(model: LatentODEModel, guide: LatentODEGuide, batch: dict, times=None,
             num_samples: int = 20, noise: bool = False) -> dict:
    r"""Condition on the encoder-visible part of ``batch`` (``obs_mask``, e.g. an observed
    prefix) and sample trajectories at ``times`` (default the batch's; extend them to
    extrapolate). Returns ``{"times", "samples" (S, B, N', D), "mean", "lower", "upper"}``
    (5 %/95 % quantiles), with observation noise :math:`\sigma` added when ``noise``."""
    q = guide.posterior(**batch)
    z0 = q.sample((num_samples,))
    times = batch["times"] if times is None else times
    z, _ = model.solve(z0, times, with_rate=False)
    samples = model.decoder(z)
    if noise:
        samples = samples + model.obs_std * torch.randn_like(samples)
    q05, q95 = torch.quantile(samples, torch.tensor([0.05, 0.95], dtype=samples.dtype,
                                                     device=samples.device), dim=0)
    return {"times": times, "samples": samples, "mean": samples.mean(0), "lower": q05,
            "upper": q95}


@torch.no_grad()
def intensity(model: LatentODEModel, guide: LatentODEGuide, batch: dict, times,
              num_samples: int = 20) -> torch.Tensor:
    r""":math:`\lambda(z(t))` ``(S, B, N', R)`` under posterior samples of :math:`z_0`."""
    z0 = guide.posterior(**batch).sample((num_samples,))
    z, _ = model.solve(z0, times, with_rate=False)
    return model.log_rate(z).exp()


def masked_mse(pred: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """``(sum of squared errors over masked entries, number of masked entries)``."""
    err = ((pred - values) ** 2 * mask).sum()
    return float(err), float(mask.sum())
