r"""Posterior-collapse diagnostics of any model/guide pair, from a guide trace and the model
trace replayed on it (no model is known here).

For every local latent site :math:`z` (a sample site of the guide inside a plate, not observed,
not a point estimate) and data point :math:`x`:

* **KL per latent dimension.** With :math:`u` the site's last event dimension (the latent
  dimension) and :math:`q(z\mid x)`, :math:`p(z\mid\cdot)` both factorizing over the elements of
  the value (``Normal(...).to_event(k)`` and the like),

  .. math:: \mathrm{KL}_u(x) = \sum_{\text{other event dims}}
            \mathrm{KL}\bigl(q(z_{\cdot u}\mid x)\,\|\,p(z_{\cdot u}\mid\cdot)\bigr),

  in closed form where torch/Pyro register :math:`\mathrm{KL}(q\|p)` for the two element
  distributions, and otherwise by Monte Carlo, :math:`\log q(z_{\cdot u}) - \log p(z_{\cdot u})`
  at the guide's draw. Where :math:`q` does not factorize (a flow such as IAF, a full
  covariance), only the site's KL exists: :math:`\mathrm{KL}(q\|p)` in closed form if registered,
  else the Monte Carlo :math:`\log q(z\mid x) - \log p(z\mid\cdot)` summed over the event;
  ``kl_per_dim`` is then ``None`` for it. A prior that depends on earlier draws (the VRNN's
  :math:`p(z_t\mid h_{t-1})`) makes every term an expectation over those draws too: each of the
  ``num_samples`` guide draws gives one unbiased estimate and they are averaged.
* **KL per time step.** Sites named ``<name>_<t>`` (the VRNN's ``z_0, z_1, ...``) form the group
  ``<name>``, one site a step; a group's ``kl_per_step[t]`` is the mean of the site's KL over the
  data points observed at step :math:`t` (masks of the site count), its ``kl_per_dim[u]`` the
  mean over data points of :math:`\sum_t \mathrm{KL}_{tu}(x)` (per data point: per sequence for
  a sequence model), and ``kl`` is the sum over groups, the KL term of the negative ELBO per
  data point.
* **Active units** (Burda et al. 2015, §5.2): unit :math:`u` is active when
  :math:`A_u = \mathrm{Cov}_x\bigl(\mathbb E_{q(z\mid x)}[z_u]\bigr) > 0.01`, with
  :math:`\mathbb E_q` the guide's mean (``fn.mean``) where it has one; otherwise the mean of
  ``mean_samples`` draws of the site, whose covariance over :math:`x` is corrected for their
  noise by subtracting :math:`\frac1S\mathbb E_x[\widehat{\mathrm{Var}}_q(z_u)]`. A step of a
  group counts its data points observed there; a unit of a group is active when it is active at
  any step.

:func:`collapse_diagnostics` runs them over a data set, :class:`CollapseDiagnostics` holds the
result, says whether the latent is unused (:meth:`~CollapseDiagnostics.collapsed`: no active
unit, or every dimension's KL below ``kl_threshold`` nats per observed step) and gives the record
:func:`~pyro_seqlatent.infer.train` logs to ``metrics.jsonl`` (``collapse_every``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import Independent, kl_divergence

from pyro_seqlatent.infer.batches import batch_args, to_device
from pyro_seqlatent.infer.modes import eval_mode

__all__ = ["ACTIVE_THRESHOLD", "KL_THRESHOLD", "CollapseDiagnostics", "CollapseWatch",
           "collapse_diagnostics", "site_kl"]

#: Burda et al.'s threshold on :math:`\mathrm{Cov}_x(\mathbb E_q[z_u])`
ACTIVE_THRESHOLD = 0.01
#: a latent dimension whose KL (nats per data point) stays below this carries no information
KL_THRESHOLD = 0.01
_STEP = re.compile(r"^(.*)_(\d+)$")


@dataclass(frozen=True)
class SiteKL:
    """The KL of one site at one draw: ``per_dim`` ``(*batch, D)`` (``None`` where :math:`q`
    does not factorize), ``total`` ``(*batch)``, ``mask`` ``(*batch)`` (1 where the data point is
    observed at the site), ``analytic`` (closed form or Monte Carlo)."""

    per_dim: torch.Tensor | None
    total: torch.Tensor
    mask: torch.Tensor
    analytic: bool


def _unwrap(fn: dist.Distribution, shape: torch.Size):
    """``(leaf, mask)``: the distribution under its ``Independent`` and ``MaskedDistribution``
    wrappers, and the product of the wrappers' masks broadcast to the value's ``shape``."""
    mask = torch.ones(shape, dtype=torch.bool)
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            m = fn._mask
            if torch.is_tensor(m):
                m = m.reshape(m.shape + (1,) * fn.event_dim)
                mask = mask & m.to(mask.device).bool()
            elif not m:
                mask = torch.zeros_like(mask)
            fn = fn.base_dist
        elif isinstance(fn, Independent):
            fn = fn.base_dist
        else:
            return fn, mask


def _elementwise_kl(q_leaf, p_leaf, z) -> tuple[torch.Tensor, bool]:
    """KL of every element of the value: closed form where registered, else the one-draw Monte
    Carlo :math:`\\log q(z) - \\log p(z)`."""
    try:
        return kl_divergence(q_leaf, p_leaf).expand(z.shape), True
    except NotImplementedError:
        return (q_leaf.log_prob(z) - p_leaf.log_prob(z)).expand(z.shape), False


def _joint_kl(q_fn, p_fn, z) -> tuple[torch.Tensor, bool]:
    try:
        return kl_divergence(q_fn, p_fn), True
    except NotImplementedError:
        return q_fn.log_prob(z) - p_fn.log_prob(z), False


def site_kl(guide_site: dict, model_site: dict) -> SiteKL:
    """The KL of one latent site at the guide's draw (see the module docstring): the guide's
    site and the model's site replayed on it, as in two ``poutine.trace`` traces."""
    q_fn, p_fn, z = guide_site["fn"], model_site["fn"], guide_site["value"]
    event_dim = q_fn.event_dim
    q_leaf, q_mask = _unwrap(q_fn, z.shape)
    p_leaf, p_mask = _unwrap(p_fn, z.shape)
    mask = q_mask & p_mask.to(q_mask.device)
    for site in (guide_site, model_site):
        if site.get("mask") is not None:
            m = torch.as_tensor(site["mask"], device=mask.device).bool()
            mask = mask & m.reshape(m.shape + (1,) * event_dim)
    batch_mask = mask.reshape(mask.shape[:mask.dim() - event_dim] + (-1,)).any(-1) \
        if event_dim else mask
    if q_leaf.event_shape == () and p_leaf.event_shape == ():
        kl, analytic = _elementwise_kl(q_leaf, p_leaf, z)
        kl = kl * mask.to(kl.dtype)
        if event_dim == 0:
            per_dim = kl.unsqueeze(-1)
        else:
            per_dim = kl.sum(tuple(range(-event_dim, -1))) if event_dim > 1 else kl
        return SiteKL(per_dim, per_dim.sum(-1), batch_mask, analytic)
    total, analytic = _joint_kl(q_fn, p_fn, z)
    total = total.expand(batch_mask.shape) * batch_mask.to(total.dtype)
    return SiteKL(None, total, batch_mask, analytic)


def _guide_mean(site: dict, mean_samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(E_q[z], noise)``: the guide's mean where the distribution has one (``noise`` None),
    else the mean of ``mean_samples`` draws and the variance of that mean (its noise)."""
    fn = site["fn"]
    try:
        mean = fn.mean
        if torch.isfinite(mean).all():
            return mean.expand(site["value"].shape), None
    except NotImplementedError:
        pass
    draws = fn.sample((mean_samples,))
    return draws.mean(0), draws.var(0) / mean_samples


def _units(x: torch.Tensor, event_dim: int, batch_dims: int) -> torch.Tensor:
    """``(N, D)``: data points (and any event dims but the last, pooled) by latent unit."""
    if event_dim == 0:
        x = x.unsqueeze(-1)
    return x.reshape(-1, x.shape[-1]) if batch_dims or event_dim else x.reshape(1, -1)


@dataclass
class _SiteSums:
    """Running sums over data points of one site (float64)."""

    kl_dim: torch.Tensor | None = None
    kl: float = 0.0
    observed: float = 0.0
    mean_sum: torch.Tensor | None = None
    mean_sq: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    count: torch.Tensor | None = None
    analytic: bool = True

    def add_kl(self, s: SiteKL, weight: float) -> None:
        self.kl += weight * float(s.total.sum())
        self.observed += weight * float(s.mask.sum())
        self.analytic = self.analytic and s.analytic
        if s.per_dim is not None:
            d = s.per_dim.reshape(-1, s.per_dim.shape[-1]).sum(0).double() * weight
            self.kl_dim = d if self.kl_dim is None else self.kl_dim + d

    def add_mean(self, mean, noise, obs) -> None:
        mean = mean.double() * obs
        zero = torch.zeros(mean.shape[-1], dtype=torch.float64)
        self.mean_sum = (self.mean_sum if self.mean_sum is not None else zero) + mean.sum(0)
        self.mean_sq = (self.mean_sq if self.mean_sq is not None else zero) + (mean ** 2).sum(0)
        self.count = (self.count if self.count is not None else zero) + obs.sum(0)
        if noise is not None:
            self.noise = (self.noise if self.noise is not None else zero) \
                + (noise.double() * obs).sum(0)

    def activity(self) -> torch.Tensor:
        """:math:`A_u`, the covariance over data points of the guide's mean of each unit."""
        n = self.count.clamp_min(1.0)
        var = (self.mean_sq - self.mean_sum ** 2 / n) / (n - 1.0).clamp_min(1.0)
        if self.noise is not None:
            var = var - self.noise / n
        return torch.where(self.count > 1, var, torch.full_like(var, float("nan")))


@dataclass
class CollapseDiagnostics:
    """What :func:`collapse_diagnostics` returns (nats; per data point: per sequence for a
    sequence model). Groups are the latent sites, ``z_0, z_1, ...`` counted as one group ``z``
    with a step per site."""

    #: the KL term of the negative ELBO per data point, all groups
    kl: float
    #: group -> mean over data points of the KL of each latent dimension summed over steps
    #: (``None`` where the guide does not factorize over the dimensions)
    kl_per_dim: dict[str, list[float] | None]
    #: group -> mean KL of each step over the data points observed there
    kl_per_step: dict[str, list[float]]
    #: group -> :math:`A_u` of each unit (the largest over the group's steps)
    activity: dict[str, list[float]]
    #: group -> whether every KL of the group was in closed form
    analytic: dict[str, bool]
    #: group -> mean number of observed steps per data point (1 for a site without steps)
    steps_per_point: dict[str, float]
    num_points: int
    num_samples: int
    kl_threshold: float = KL_THRESHOLD
    active_threshold: float = ACTIVE_THRESHOLD
    extra: dict = field(default_factory=dict)

    @property
    def active_units(self) -> dict[str, int]:
        """group -> number of units with :math:`A_u` above ``active_threshold``."""
        return {g: int(sum(a > self.active_threshold for a in acts))
                for g, acts in self.activity.items()}

    @property
    def num_units(self) -> dict[str, int]:
        return {g: len(acts) for g, acts in self.activity.items()}

    def kl_per_dim_and_step(self) -> dict[str, list[float]]:
        """group -> the KL of each latent dimension per observed step (``kl_per_dim`` over
        ``steps_per_point``: per data point for a site without steps); a group without a
        per-dimension figure gives its KL per step as one entry."""
        out = {}
        for g, dims in self.kl_per_dim.items():
            steps = max(self.steps_per_point[g], 1e-12)
            total = [self.kl_group(g)] if dims is None else dims
            out[g] = [k / steps for k in total]
        return out

    def kl_group(self, group: str) -> float:
        """The KL of ``group`` per data point (summed over its steps)."""
        dims = self.kl_per_dim[group]
        return sum(dims) if dims is not None else self.extra["kl_group"][group]

    def collapsed(self) -> bool:
        """The latent is unused: it has sites, and no unit is active or the KL of every latent
        dimension per observed step (:meth:`kl_per_dim_and_step`; a group's KL per step where
        it has no per-dimension figure) is below ``kl_threshold``. Per step, so that a long
        sequence's many near-zero terms do not add up to a used latent."""
        if not self.activity:
            return False
        if sum(self.active_units.values()) == 0:
            return True
        kls = [k for dims in self.kl_per_dim_and_step().values() for k in dims]
        return max(kls) < self.kl_threshold

    def warning(self) -> str | None:
        """One line saying the latent is unused, or ``None``."""
        if not self.collapsed():
            return None
        active = sum(self.active_units.values())
        units = sum(self.num_units.values())
        return (f"posterior collapse: the latent is unused ({active} of {units} units active, "
                f"Cov_x(E_q[z_u]) > {self.active_threshold}; KL {self.kl:.4g} nats per data "
                f"point, every dimension below {self.kl_threshold} nats per step): the guide "
                "matches the prior; try KL annealing (kl_anneal_steps), a smaller decoder or "
                "free bits")

    def record(self) -> dict:
        """The JSON-ready record logged under ``"collapse"`` in ``metrics.jsonl``."""
        return {"kl": self.kl, "kl_per_dim": self.kl_per_dim, "kl_per_step": self.kl_per_step,
                "kl_per_dim_step": self.kl_per_dim_and_step(),
                "active_units": self.active_units, "num_units": self.num_units,
                "analytic": self.analytic, "steps_per_point": self.steps_per_point,
                "kl_threshold": self.kl_threshold, "collapsed": self.collapsed(),
                "num_points": self.num_points}


def _group(name: str) -> tuple[str, int]:
    m = _STEP.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def _local_latents(guide_tr, model_tr) -> list[str]:
    out = []
    for name, site in guide_tr.nodes.items():
        if (site["type"] != "sample" or site["is_observed"] or name not in model_tr.nodes
                or not site["cond_indep_stack"]):
            continue
        fn = site["fn"]
        while isinstance(fn, (dist.MaskedDistribution, Independent)):
            fn = fn.base_dist
        if isinstance(fn, dist.Delta):  # a point estimate: no KL
            continue
        out.append(name)
    return out


def _accumulate(sums: dict, guide_tr, model_tr, weight: float, mean_samples: int,
                first: bool) -> None:
    names = _local_latents(guide_tr, model_tr)
    # every site's KL before any extra draw: a flow shared by the sites (the VRNN's IAF over
    # time) keeps its cache of the trace's values until the means below draw from it
    kls = {name: site_kl(guide_tr.nodes[name], model_tr.nodes[name]) for name in names}
    for name in names:
        acc = sums.setdefault(name, _SiteSums())
        acc.add_kl(kls[name], weight)
        if first:  # the guide's mean once per batch (at the first draw)
            _add_mean(acc, guide_tr.nodes[name], kls[name].mask, mean_samples)


def _add_mean(acc: _SiteSums, site: dict, mask: torch.Tensor, mean_samples: int) -> None:
    mean, noise = _guide_mean(site, mean_samples)
    event_dim = site["fn"].event_dim
    batch_dims = mean.dim() - event_dim
    obs_full = mask.reshape(mask.shape + (1,) * event_dim).expand(mean.shape)
    obs = _units(obs_full.double(), event_dim, batch_dims)
    acc.add_mean(_units(mean, event_dim, batch_dims),
                 None if noise is None else _units(noise, event_dim, batch_dims), obs)


def _summarise(sums: dict, num_points: int, num_samples: int, kl_threshold: float,
               active_threshold: float) -> CollapseDiagnostics:
    groups: dict[str, list] = {}
    for name, acc in sums.items():
        g, t = _group(name)
        groups.setdefault(g, []).append((t, acc))
    kl_dim, kl_step, activity, analytic, per_point, kl_group = {}, {}, {}, {}, {}, {}
    n = max(num_points, 1)
    for g, steps in groups.items():
        steps.sort(key=lambda item: item[0])
        accs = [a for _, a in steps]
        kl_step[g] = [a.kl / max(a.observed, 1e-12) for a in accs]
        if all(a.kl_dim is not None for a in accs):
            kl_dim[g] = (sum(a.kl_dim for a in accs) / n).tolist()
        else:
            kl_dim[g] = None
        acts = torch.stack([a.activity() for a in accs]).nan_to_num(float("-inf")).amax(0)
        activity[g] = acts.tolist()
        analytic[g] = all(a.analytic for a in accs)
        per_point[g] = sum(a.observed for a in accs) / n
        kl_group[g] = sum(a.kl for a in accs) / n
    kl = sum(a.kl for a in sums.values()) / n
    return CollapseDiagnostics(kl=kl, kl_per_dim=kl_dim, kl_per_step=kl_step,
                               activity=activity, analytic=analytic, steps_per_point=per_point,
                               num_points=num_points, num_samples=num_samples,
                               kl_threshold=kl_threshold, active_threshold=active_threshold,
                               extra={"kl_group": kl_group})


@torch.no_grad()
def collapse_diagnostics(
    model: Callable,
    guide: Callable,
    batches: Iterable,
    *,
    num_samples: int = 1,
    mean_samples: int = 32,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    kl_threshold: float = KL_THRESHOLD,
    active_threshold: float = ACTIVE_THRESHOLD,
) -> CollapseDiagnostics:
    """KL per latent dimension and per step and the active units of ``model``/``guide`` over
    ``batches`` (see the module docstring).

    :param batches: an iterable of collated batches (a ``DataLoader``; a batch is passed as the
        trainer passes it: ``model(*batch)``, ``model(**batch)`` or ``model(batch)``).
    :param num_samples: guide draws per batch averaged in the KL (Monte Carlo terms, and the
        dependence of a prior on earlier draws).
    :param mean_samples: draws of a site whose guide distribution has no ``mean`` (flows), for
        :math:`\\mathbb E_q[z]` in the active units.
    :param max_batches: use at most this many batches.
    :param seed: fixed noise (the global RNG is left as it was); model and guide run in eval
        mode.
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not (isinstance(mean_samples, int) and mean_samples >= 2):
        raise ValueError(f"mean_samples must be an integer >= 2, got {mean_samples!r}")
    sums: dict[str, _SiteSums] = {}
    points = 0
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model, guide):
        torch.manual_seed(seed)
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            args, kwargs = batch_args(to_device(batch, device))
            for k in range(num_samples):
                guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
                model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                    *args, **kwargs)
                _accumulate(sums, guide_tr, model_tr, 1.0 / num_samples, mean_samples,
                            first=k == 0)
                if k == 0:
                    points += _data_points(guide_tr, model_tr)
    return _summarise(sums, points, num_samples, kl_threshold, active_threshold)


def _data_points(guide_tr, model_tr) -> int:
    """Data points of a batch: the size of the first local latent's batch (its plates)."""
    names = _local_latents(guide_tr, model_tr)
    if not names:
        return 0
    site = guide_tr.nodes[names[0]]
    shape = site["fn"].batch_shape
    return int(math.prod(shape)) if len(shape) else 1


class CollapseWatch:
    """The trainer's hook (setting ``collapse_every``): at every ``collapse_every``-th
    validation and at the last one, :func:`collapse_diagnostics` on the validation batches goes
    into the step's record under ``"collapse"``; at the last one a collapsed latent warns."""

    def __init__(self, validator, every: int | None):
        if every is not None and validator is None:
            raise ValueError("collapse_every needs valid_data=... and valid_every=... (the "
                             "diagnostics run on the validation data at validation steps)")
        self.validator = validator
        self.every = every

    def update(self, record: dict, step: int, final: bool, model, guide) -> None:
        if not self.every:
            return
        index = step // self.validator.settings.valid_every
        if not (final or index % self.every == 0):
            return
        v = self.validator
        diag = collapse_diagnostics(model, guide, v.loader, device=v.device, seed=v.seed,
                                    max_batches=v.settings.valid_max_batches)
        record["collapse"] = diag.record()
        message = diag.warning()
        if final and message:
            warnings.warn(f"step {step}: {message}", UserWarning, stacklevel=4)
