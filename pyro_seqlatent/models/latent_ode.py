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

With ``obs_weighting="variable"`` the observation term of sequence :math:`b` is reweighted so
that every observed variable weighs the same, however often it was measured (within a record, the
weighting of the reference's PhysioNet loss and score, which average per variable):

.. math::
    \sum_{i,d} w_{b,i,d} \log\mathcal N\bigl(x_{b,i,d} \mid \mathrm{dec}(z(t_{b,i}))_d,
    \sigma^2\bigr),\qquad
    w_{b,i,d} = m_{b,i,d}\,\frac{N_b}{V_b\, n_{b,d}},

with :math:`n_{b,d} = \sum_i m_{b,i,d}` observations of variable :math:`d`,
:math:`N_b = \sum_d n_{b,d}` and :math:`V_b` the number of observed variables: the weights keep
the total :math:`\sum_{i,d} w_{b,i,d} = N_b` (the likelihood's balance against the KL), and equal
the mask when every observed variable has as many observations. The objective is then no
longer a bound on :math:`\log p(x)` (``"point"``, the default, is the ELBO).

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

from pyro_seqlatent.data.irregular import compact_observed, union_grid_collate
from pyro_seqlatent.guides import FlowGuide, MeanFieldGuide, SiteGuide
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.nn.init import apply_init
from pyro_seqlatent.nn.ode import (
    ODEFunc,
    ODERNNCell,
    PoissonAugmentedField,
    odeint_times,
    run_odernn,
)
from pyro_seqlatent.nn.times import validate_times

GUIDES = ("meanfield", "planar", "radial", "iaf", "iaf_gated", "nice", "real_nvp")
POISSON_RATES = ("per_feature", "shared")
OBS_WEIGHTINGS = ("point", "variable")


def variable_weights(mask: torch.Tensor) -> torch.Tensor:
    r"""The weights :math:`w_{b,i,d} = m_{b,i,d} N_b / (V_b n_{b,d})` of
    ``obs_weighting="variable"`` (module docstring), shape of ``mask`` ``(B, N, D)``; a sequence
    with no observation gets weight 0 everywhere."""
    m = (mask != 0).to(mask.dtype if mask.is_floating_point() else torch.get_default_dtype())
    per_variable = m.sum(-2, keepdim=True)  # n_{b,d}: (B, 1, D)
    total = per_variable.sum(-1, keepdim=True)  # N_b: (B, 1, 1)
    seen = (per_variable > 0).sum(-1, keepdim=True).clamp(min=1)  # V_b
    return m * total / (seen * per_variable.clamp(min=1))


class Weighted(dist.TorchDistribution):
    r"""``base_dist`` whose ``log_prob`` is multiplied elementwise by ``weight`` (broadcast to its
    batch shape; entries of weight 0 give 0 whatever the value, as a mask); samples are the base
    distribution's. For a reweighted likelihood, not a normalised density."""

    arg_constraints = {}

    def __init__(self, base_dist: dist.TorchDistribution, weight: torch.Tensor):
        batch_shape = torch.broadcast_shapes(weight.shape, base_dist.batch_shape)
        self.base_dist = base_dist.expand(batch_shape)
        self.weight = weight.expand(batch_shape)
        super().__init__(batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    @property
    def has_rsample(self):
        return self.base_dist.has_rsample

    def expand(self, batch_shape, _instance=None):
        return Weighted(self.base_dist, self.weight.expand(batch_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base_dist.rsample(sample_shape)

    def log_prob(self, value):
        log_p = self.base_dist.log_prob(value)
        return torch.where(self.weight > 0, self.weight * log_p, log_p.new_zeros(()))


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


def _check_mask_values(name: str, m: torch.Tensor) -> None:
    if m.dtype == torch.bool:
        return
    if m.is_floating_point() and not bool(torch.count_nonzero(m * (m - 1))):
        return  # 0/1 floats: the usual case in one pass
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name} must hold 0 and 1 only (1: observed, 0: missing), got other "
                         f"values; a fractional weight is no mask: use {name} = ({name} > 0)"
                         ".float(), or obs_weighting='variable' to reweight observations")


def checked_batch(values, mask, times, obs_mask=None, t0: float | None = None):
    """``(values, obs_mask)`` of a batch after :func:`check_batch` (shared by every model and
    guide of the family): masks must hold 0/1 (``ValueError`` for fractional entries); NaN or
    inf in ``values`` is allowed where ``mask`` and ``obs_mask`` are both 0 (the usual way to
    mark a missing value) and is then replaced by 0, and refused where either is 1. One sum
    over ``values`` when it holds no NaN (``values`` itself is returned)."""
    obs_mask = check_batch(values, mask, times, obs_mask, t0)
    if not values.is_floating_point():
        raise TypeError(f"values has dtype {values.dtype}; convert it with values.float()")
    for name, m in (("mask", mask), ("obs_mask", obs_mask)):
        _check_mask_values(name, m)
    if bool(torch.isfinite(values.sum())):
        return values, obs_mask
    bad = ~torch.isfinite(values)
    for name, m in (("mask", mask), ("obs_mask", obs_mask)):
        if bool((bad & (m != 0)).any()):
            raise ValueError(f"values has NaN or inf at entries where {name} is 1 (observed); "
                             f"set {name} to 0 there (NaN marks a missing value only where the "
                             "masks are 0)")
    return values.masked_fill(bad, 0.0), obs_mask


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
    :param obs_std: :math:`\sigma` (the reference: 0.01, and 1e-3 on hopper).
    :param poisson: add the Poisson-process factor ``"poisson"``.
    :param poisson_rates: ``"per_feature"`` or ``"shared"``.
    :param obs_weighting: ``"point"`` (the ELBO: every observation weighs 1) or ``"variable"``
        (every observed variable of a sequence weighs the same; module docstring).
    :param method, rtol, atol, adjoint: torchdiffeq solver settings (dopri5, 1e-3, 1e-4).
    :param t0: time at which ``z0`` lives (times must be ``>= t0``).
    """

    #: how to batch a dataset of items with their own times (``train`` uses it when given none)
    collate_fn = staticmethod(union_grid_collate)

    def __init__(self, data_dim: int, latent_dim: int = 10,
                 ode_hidden_dims: Sequence[int] = (50, 50),
                 decoder_hidden_dims: Sequence[int] = (), obs_std: float = 0.01,
                 poisson: bool = False, poisson_rates: str = "per_feature",
                 rate_hidden_dims: Sequence[int] = (50,), method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-4, adjoint: bool = False, t0: float = 0.0,
                 obs_weighting: str = "point"):
        super().__init__()
        if poisson_rates not in POISSON_RATES:
            raise ValueError(f"poisson_rates={poisson_rates!r}: use one of {POISSON_RATES}")
        if obs_weighting not in OBS_WEIGHTINGS:
            raise ValueError(f"obs_weighting={obs_weighting!r}: use one of {OBS_WEIGHTINGS}")
        self.obs_weighting = obs_weighting
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
        values, obs_mask = checked_batch(values, mask, times, obs_mask, self.t0)
        b = values.shape[0]
        with pyro.plate("data", b, dim=-1):
            prior = dist.Normal(values.new_zeros(b, self.latent_dim),
                                values.new_ones(b, self.latent_dim)).to_event(1)
            z0 = pyro.sample("z0", prior)
            z, cum_rate = self.solve(z0, times)
            loc = self.decoder(z)
            like = dist.Normal(loc, self.obs_std)
            like = (like.mask(mask.bool()) if self.obs_weighting == "point"
                    else Weighted(like, variable_weights(mask).to(loc.dtype)))
            pyro.sample("x", like.to_event(2), obs=values)
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
        """The encoder state at :math:`t_0`, ``(B, H)``: the ODE-RNN runs backwards over each
        sequence's own observed times (:func:`compact_observed`), then back to :math:`t_0`."""
        times, values, obs_mask = compact_observed(times, values, obs_mask)
        grid, added = prepend_t0(times, self.t0)
        if added:
            pad = values.new_zeros(values.shape[0], 1, values.shape[-1])
            values, obs_mask = torch.cat([pad, values], 1), torch.cat([pad, obs_mask], 1)
        return run_odernn(self.cell, grid, values, obs_mask, backwards=True,
                          max_step_fraction=self.max_step_fraction)

    def posterior(self, values, mask, times, obs_mask=None) -> dist.Distribution:
        values, obs_mask = checked_batch(values, mask, times, obs_mask, self.t0)
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
    """``(sum of squared errors over masked entries, number of masked entries)``; NaN in
    ``values`` where ``mask`` is 0 (a missing value) counts nothing."""
    err = torch.where(mask != 0, (pred - values) ** 2 * mask, 0.0).sum()
    return float(err), float(mask.sum())


# ----------------------------------------------------------------------------- registration

DATASETS = ("periodic", "physionet", "hopper")
DATA_DIMS = {"periodic": 1, "physionet": 37, "hopper": 14}
DATA_DEFAULTS = {
    "data": "",  # a user file (docs/own-data.md); replaces dataset
    "dataset": "periodic",
    "task": "interp",
    "fraction": 0.5,
    "n_series": 1000,
    "recipe": "paper",
    "quantization": 0.1,
    "n_records": 0,
    "data_seed": 0,  # draws of the series, masks and splits (not the training seed)
    "protocol": "ours",  # hopper, physionet: "ours" or "reference" (data.hopper, data.physionet)
    # extrapolation training target: "future" (the points after the split, as the reference) or
    # "all" (the observed prefix too; valid/test still score the future only)
    "extrap_train": "future",
}
EXTRAP_TRAIN = ("future", "all")
#: help text of each data option (shared by latent_ode, ode_rnn and rnn_dt)
DATA_HELP = {
    "data": "your own irregular series: a .npz or .pt file of times, values (NaN: missing) "
            "and an optional 0/1 mask (docs/own-data.md); replaces dataset ('': the "
            "built-in one); split with data_seed, task and fraction apply",
    "dataset": "periodic (toy sinusoids), physionet (PhysioNet 2012 ICU records) or hopper "
               "(MuJoCo hopper trajectories)",
    "task": "interp: observe a fraction of the points and reconstruct all; extrap: observe the "
            "first half and predict the second",
    "fraction": "fraction of the (first-half, for extrap) time points the encoder observes",
    "n_series": "number of periodic series (dataset=periodic)",
    "recipe": "periodic time grids: paper (own grid per series) or code (one shared grid, the "
              "reference code)",
    "quantization": "PhysioNet time bins in hours (1/60: the minute)",
    "n_records": "use only this many PhysioNet records (0: all 8,000)",
    "data_seed": "seed of the series, masks and splits (not the training seed)",
    "protocol": "hopper, physionet: ours or reference (the reference implementation's recipe; "
                "docs/latent_ode.md)",
    "extrap_train": "extrap training target: future (the points after the split, as the "
                    "reference) or all (the observed prefix too)",
}
#: the fixed sets of values of the data options
DATA_CHOICES = {
    "dataset": list(DATASETS),
    "task": ["interp", "extrap"],
    "recipe": ["paper", "code"],
    "protocol": ["ours", "reference"],
    "extrap_train": list(EXTRAP_TRAIN),
}


def with_prefix_targets(dataset):
    r"""A copy of an extrapolation split whose scored mask also covers the observed prefix:
    ``mask ← max(mask, obs_mask)``.

    Trained on the future alone, a Latent ODE must learn its dynamics from errors at
    :math:`t > t_{split}` only, through a solve that starts at :math:`t_0`; on the toy series it
    can settle on the constant mean (a stable fixed point of :math:`f_\theta`) and stay there.
    Scoring the prefix too trains on

    .. math::
        \mathbb E_{q(z_0 \mid x_{obs})}\big[\log p(x_{obs} \mid z_0) + \log p(x_{fut} \mid z_0)\big]
        - \mathrm{KL}\big(q(z_0 \mid x_{obs}) \,\|\, p(z_0)\big),

    a lower bound on :math:`\log p(x_{obs}, x_{fut})` (the KL β-weighted while annealing): the
    short-horizon errors near :math:`t_0` teach the dynamics first, as in interpolation.
    """
    from pyro_seqlatent.data.irregular import IrregularDataset

    return IrregularDataset([{**item, "mask": torch.maximum(item["mask"], item["obs_mask"])}
                             for item in dataset.items])


def system_datasets(options: dict, root=None) -> dict:
    """Train/valid/test datasets of the ``dataset`` option (shared by the three systems); with
    ``task="extrap"`` and ``extrap_train="all"`` the training split also scores the observed
    prefix (:func:`with_prefix_targets`)."""
    extrap_train = options.get("extrap_train", "future")
    if extrap_train not in EXTRAP_TRAIN:
        raise ValueError(f"extrap_train must be one of {EXTRAP_TRAIN}, got {extrap_train!r}")
    datasets = _system_datasets(options, root)
    if options["task"] == "extrap" and extrap_train == "all":
        datasets["train"] = with_prefix_targets(datasets["train"])
    return datasets


def user_series(options: dict):
    """The ``data`` file of ``options`` as irregular series, split with ``data_seed``
    (docs/own-data.md; :func:`pyro_seqlatent.data.user_files.load_user_data`)."""
    from pyro_seqlatent.data.user_files import load_user_data

    return load_user_data(options["data"], "irregular", seed=options.get("data_seed", 0))


def _system_datasets(options: dict, root=None) -> dict:
    if options.get("data"):
        from pyro_seqlatent.data.user_files import task_datasets

        return task_datasets(user_series(options).splits, options["task"], options["fraction"],
                             seed=options.get("data_seed", 0))
    name = options["dataset"]
    protocol = options.get("protocol", "ours")
    if protocol != "ours" and name not in ("hopper", "physionet"):
        raise ValueError(f"protocol={protocol!r} is defined for dataset='hopper' and "
                         f"'physionet' only; use protocol='ours' with dataset={name!r}")
    if name == "periodic":
        from pyro_seqlatent.data.periodic import periodic_datasets

        return periodic_datasets(options["task"], options["fraction"], options["n_series"],
                                 recipe=options["recipe"], seed=options["data_seed"])
    if name == "physionet":
        from pyro_seqlatent.data.physionet import physionet_datasets

        return physionet_datasets(root, options["task"], options["fraction"],
                                  options["quantization"], options["n_records"] or None,
                                  seed=options["data_seed"], protocol=protocol)
    if name == "hopper":
        from pyro_seqlatent.data.hopper import hopper_datasets

        return hopper_datasets(options["task"], options["fraction"], seed=options["data_seed"],
                               protocol=protocol)
    raise ValueError(f"dataset={name!r} is not one of {DATASETS}")


def data_dim(options: dict) -> int:
    if options.get("data"):
        return user_series(options).dim
    if options["dataset"] not in DATA_DIMS:
        raise ValueError(f"dataset={options['dataset']!r} is not one of {DATASETS}")
    if options["dataset"] == "physionet" and options.get("protocol", "ours") == "reference":
        return 41  # the reference's variables: descriptors too (data.physionet)
    return DATA_DIMS[options["dataset"]]


def build_latent_ode(options: dict):
    d, latent = data_dim(options), options["latent_dim"]
    ode_hidden = (options["ode_units"],) * options["ode_layers"]
    model = LatentODEModel(d, latent, ode_hidden, obs_std=options["obs_std"],
                           poisson=options["poisson"], poisson_rates=options["poisson_rates"],
                           method=options["method"], rtol=options["rtol"], atol=options["atol"],
                           adjoint=options["adjoint"],
                           obs_weighting=options.get("obs_weighting", "point"))
    guide = LatentODEGuide(d, latent, options["hidden_dim"], ode_hidden, guide=options["guide"],
                           num_flows=options["num_flows"])
    apply_init(options["init"], model, guide)
    return model, guide


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(model, guide, dataset, out_path, num_series: int = 3, feature: int = 0,
                      extend: float = 1.0, num_samples: int = 30):
    """Posterior trajectories (mean and 5–95 % band) with the encoder's observations (black),
    the scored points (red) and an extrapolation past the last time (``extend`` × span)."""
    from pyro_seqlatent.data.irregular import union_grid_collate

    plt = _pyplot()
    items = [dataset[i] for i in range(min(num_series, len(dataset)))]
    fig, axes = plt.subplots(len(items), 1, figsize=(7, 2.2 * len(items)), squeeze=False)
    for ax, item in zip(axes[:, 0], items):
        batch = union_grid_collate([item])
        t = batch["times"]
        t_end = float(t[-1]) + extend * float(t[-1] - model.t0)
        grid = torch.linspace(model.t0, t_end, 200, dtype=t.dtype, device=t.device)
        out = forecast(model, guide, batch, times=grid, num_samples=num_samples)
        g = grid.cpu()
        ax.fill_between(g, out["lower"][0, :, feature].cpu(), out["upper"][0, :, feature].cpu(),
                        color="C0", alpha=0.25, label="posterior 5–95 %")
        ax.plot(g, out["mean"][0, :, feature].cpu(), color="C0", label="posterior mean")
        for key, style in (("mask", dict(color="C3", s=8, label="scored")),
                           ("obs_mask", dict(color="k", s=10, label="observed (encoder)"))):
            seen = batch[key][0, :, feature] > 0
            ax.scatter(t[seen].cpu(), batch["values"][0, seen, feature].cpu(), **style)
        ax.axvline(float(t[-1]), color="0.6", ls=":", lw=1)
    axes[0, 0].legend(fontsize=7, ncol=4, frameon=False)
    axes[-1, 0].set_xlabel("t")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_intensity(model, guide, dataset, out_path, num_series: int = 3, num_samples: int = 30):
    r""":math:`\lambda(t)` (shared rate or the sum of per-feature rates) under the posterior,
    against the observation times (ticks)."""
    from pyro_seqlatent.data.irregular import union_grid_collate

    plt = _pyplot()
    items = [dataset[i] for i in range(min(num_series, len(dataset)))]
    fig, axes = plt.subplots(len(items), 1, figsize=(7, 1.8 * len(items)), squeeze=False)
    for ax, item in zip(axes[:, 0], items):
        batch = union_grid_collate([item])
        t = batch["times"]
        grid = torch.linspace(model.t0, float(t[-1]), 200, dtype=t.dtype, device=t.device)
        lam = intensity(model, guide, batch, grid, num_samples).sum(-1)[:, 0]  # (S, N')
        ax.plot(grid.cpu(), lam.mean(0).cpu(), color="C2", label=r"$\lambda(t)$ posterior mean")
        ax.fill_between(grid.cpu(), lam.quantile(0.05, 0).cpu(), lam.quantile(0.95, 0).cpu(),
                        color="C2", alpha=0.25)
        seen = torch.maximum(batch["mask"], batch["obs_mask"])[0].sum(-1) > 0
        ax.plot(t[seen].cpu(), torch.zeros(int(seen.sum())), "|", color="k", ms=10,
                label="observation times")
    axes[0, 0].legend(fontsize=7, frameon=False)
    axes[-1, 0].set_xlabel("t")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_latent_ode(model, guide, datasets, options, out_dir):
    from pathlib import Path

    out_dir = Path(out_dir)
    model.eval()
    paths = [plot_trajectories(model, guide, datasets["test"], out_dir / "trajectories.png")]
    if model.poisson:
        paths.append(plot_intensity(model, guide, datasets["test"], out_dir / "intensity.png"))
    return paths


def _register():
    from pyro_seqlatent.data.irregular import union_grid_collate
    from pyro_seqlatent.nn.init import INITS
    from pyro_seqlatent.nn.ode import ADAPTIVE_METHODS, FIXED_METHODS
    from pyro_seqlatent.registry import ModelSpec, register_model

    register_model(ModelSpec(
        name="latent_ode",
        build=build_latent_ode,
        datasets=system_datasets,
        defaults={
            **DATA_DEFAULTS,
            "latent_dim": 10,
            "hidden_dim": 40,
            "ode_units": 50,
            "ode_layers": 2,
            "guide": "meanfield",
            "num_flows": 4,
            "poisson": False,
            "poisson_rates": "per_feature",
            "method": "dopri5",
            "rtol": 1e-3,
            "atol": 1e-4,
            "adjoint": False,
            "obs_std": 0.01,
            "obs_weighting": "point",
            "init": "torch",
        },
        option_help={
            **DATA_HELP,
            "latent_dim": "size of z0",
            "hidden_dim": "state size of the ODE-RNN encoder",
            "ode_units": "width of each hidden layer of the ODE networks (the latent "
                         "dynamics f and the encoder's ODE)",
            "ode_layers": "hidden layers of the ODE networks",
            "guide": "site guide of z0: meanfield (diagonal Normal) or a flow",
            "num_flows": "number of flows of a flow guide",
            "poisson": "add the Poisson-process likelihood of the observation times",
            "poisson_rates": "Poisson rates: per_feature (the reference) or shared (one rate)",
            "method": "torchdiffeq solver of the decoder ODE",
            "rtol": "relative tolerance of an adaptive solver",
            "atol": "absolute tolerance of an adaptive solver",
            "adjoint": "backpropagate through the solve by the adjoint method (less memory)",
            "obs_std": "standard deviation sigma of the Gaussian observation noise",
            "obs_weighting": "point (the ELBO: every observation weighs 1) or variable (every "
                             "observed variable of a series weighs the same)",
            "init": "initialisation: torch (PyTorch's defaults) or normal (std 0.1)",
        },
        option_choices={
            **DATA_CHOICES,
            "guide": list(GUIDES),
            "poisson_rates": list(POISSON_RATES),
            "method": list(ADAPTIVE_METHODS + FIXED_METHODS),
            "obs_weighting": list(OBS_WEIGHTINGS),
            "init": list(INITS),
        },
        option_groups={
            "data": list(DATA_DEFAULTS),
            "networks and guide": ["latent_dim", "hidden_dim", "ode_units", "ode_layers", "guide",
                                   "num_flows", "init"],
            "likelihood and ODE solver": ["poisson", "poisson_rates", "obs_std", "obs_weighting",
                                          "method", "rtol", "atol", "adjoint"],
        },
        collate_fn=union_grid_collate,
        elbo="Trace_ELBO",
        batch_plate="data",
        # lr 3e-3, not 1e-2: validation curves with smaller spikes on the toy series and no
        # divergence on hopper (docs/latent_ode.md, "The default learning rate")
        train_defaults={"batch_size": 50, "lr": 3e-3, "clip_norm": 1e4, "kl_anneal_steps": 200,
                        "valid_every": 100},
        demo={
            "options": {"dataset": "periodic", "task": "extrap", "n_series": 300, "recipe": "code",
                        "latent_dim": 6, "hidden_dim": 20, "ode_units": 32, "poisson": True,
                        "poisson_rates": "shared"},
            "train": {"num_steps": 200, "batch_size": 30, "lr": 1e-2, "valid_every": 50,
                      "kl_anneal_steps": 100},
            "eval": {"num_samples": 20, "max_points": 30, "batch_size": 30},
        },
        plot=plot_latent_ode,
        description="Latent ODE (ODE-RNN encoder, dopri5 decoder, optional Poisson process) on "
                    "irregular series: toy periodic, PhysioNet 2012, MuJoCo hopper",
    ))


_register()
