r"""Is my guide good? The guide's draws against the true posterior drawn by NUTS.

:func:`posterior_check` conditions ``model`` on one batch, draws :math:`p(z \mid x)` with
Pyro's NUTS (continuous latents of moderate size only), draws :math:`q(z \mid x)` from the
guide, and reports

* the energy distance between the two sets of draws (Székely's
  :math:`2E|A-B| - E|A-A'| - E|B-B'|` as a U-statistic: 0 in expectation when the laws agree)
  with its noise floor: by default the ``floor_quantile`` quantile of the same statistic over
  random relabellings of the pooled draws (a permutation estimate: what the distance looks like
  for these sample sizes when the laws agree), widened for the autocorrelation of the NUTS
  draws by :math:`(1/S_{\mathrm{eff}} + 1/M)/(1/S + 1/M)` with :math:`S_{\mathrm{eff}}` the
  smallest effective sample size of a coordinate (Pyro's ``effective_sample_size``); or with
  ``floor="halves"`` the distance between the two halves of the NUTS draws (the first and the
  last chains, or the first and the second half of one chain), one noisy value;
* per-coordinate means and standard deviations of both;
* the evidence gap :math:`\log p(x) - \mathrm{ELBO} = \mathrm{KL}(q \,\|\, p(z \mid x))`, both
  from one :func:`~pyro_seqlatent.infer.evaluate.log_marginal` call with ``num_particles``
  draws (the ELBO is the mean log-weight of the same draws);

and draws a figure (:meth:`PosteriorCheck.plot`). NUTS draws are themselves approximate
(autocorrelated, and one chain can miss a mode): where the latent is 2-D a quadrature grid is
the exact reference (``benchmarks/vae_mnist.py``).

Plate subsampling and :func:`~pyro.poutine.scale` factors are left out, as in ``log_marginal``:
the posterior is that of the batch given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.ops.stats import effective_sample_size
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_seqlatent.infer.batches import batch_args
from pyro_seqlatent.infer.evaluate import PARTICLE_PLATE, _probe, log_marginal
from pyro_seqlatent.infer.modes import eval_mode

FLOORS = ("permutation", "halves")


@dataclass
class PosteriorCheck:
    """What :func:`posterior_check` returns. Draws are flattened per draw into ``names``
    coordinates (``"z[0]"``, ``"z[1]"``, ... in the order of the model's latent sites).

    ``log_marginal``, ``elbo`` and ``evidence_gap`` are of the whole batch (summed over its
    points where the evidence is per point); ``khat`` is the Pareto k-hat of the importance
    weights where the evidence is of the whole batch (``None`` otherwise)."""

    names: list[str]
    nuts_draws: torch.Tensor  # (S, D)
    guide_draws: torch.Tensor  # (M, D)
    nuts_mean: torch.Tensor
    nuts_std: torch.Tensor
    guide_mean: torch.Tensor
    guide_std: torch.Tensor
    energy_distance: float
    noise_floor: float
    floor_method: str
    log_marginal: float
    elbo: float
    evidence_gap: float
    ess: float  # the smallest over points where the evidence is per point
    nuts_ess: float  # the smallest effective sample size of a coordinate of the NUTS draws
    khat: float | None
    standardized: bool

    @property
    def within_floor(self) -> bool:
        """The guide's draws are as close to NUTS's as the noise floor allows."""
        return self.energy_distance <= self.noise_floor

    def summary(self) -> str:
        return (f"energy distance {self.energy_distance:.4f} (noise floor {self.noise_floor:.4f}, "
                f"{self.floor_method}); log p(x) - ELBO = {self.evidence_gap:.3f} nats "
                f"(log p(x) {self.log_marginal:.3f}, ELBO {self.elbo:.3f}, ESS {self.ess:.1f}"
                f"; NUTS ESS {self.nuts_ess:.0f} of {len(self.nuts_draws)}"
                + (f", k-hat {self.khat:.2f}" if self.khat is not None else "") + ")")

    def plot(self, path: str | Path, max_coords: int = 4) -> Path:
        """Marginal histograms of guide vs NUTS for the first ``max_coords`` coordinates and,
        where there are two or more, a scatter of the first two; written to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = min(max_coords, len(self.names))
        panels = k + (1 if len(self.names) >= 2 else 0)
        fig, axes = plt.subplots(1, panels, figsize=(2.8 * panels, 2.6), squeeze=False)
        p, q = self.nuts_draws.double(), self.guide_draws.double()
        for i in range(k):
            ax = axes[0, i]
            both = torch.cat([p[:, i], q[:, i]])
            lo, hi = float(both.quantile(0.002)), float(both.quantile(0.998))
            bins = torch.linspace(lo, hi, 41).tolist() if hi > lo else 40
            ax.hist(p[:, i].tolist(), bins=bins, density=True, alpha=0.5, label="NUTS p(z|x)")
            ax.hist(q[:, i].tolist(), bins=bins, density=True, alpha=0.5, label="guide q(z|x)")
            ax.set_title(self.names[i], fontsize=8)
            ax.tick_params(labelsize=6)
        if len(self.names) >= 2:
            ax = axes[0, k]
            ax.scatter(p[:, 0].tolist(), p[:, 1].tolist(), s=2, alpha=0.35, label="NUTS p(z|x)")
            ax.scatter(q[:, 0].tolist(), q[:, 1].tolist(), s=2, alpha=0.35, label="guide q(z|x)")
            ax.set_xlabel(self.names[0], fontsize=7)
            ax.set_ylabel(self.names[1], fontsize=7)
            ax.tick_params(labelsize=6)
        axes[0, 0].legend(frameon=False, fontsize=6)
        fig.suptitle(f"energy distance {self.energy_distance:.3f} (floor {self.noise_floor:.3f}); "
                     f"log p(x) − ELBO {self.evidence_gap:.2f} nats", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Székely's energy distance :math:`2E|A-B| - E|A-A'| - E|B-B'|` between draws ``a`` (n, D)
    and ``b`` (m, D) as an unbiased U-statistic (the within-sample means leave out the zero
    diagonal), so two samples of one law give 0 in expectation; the law's distance is 0 iff
    the laws agree."""

    def within(x):
        return torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))

    return float(2 * torch.cdist(a, b).mean() - within(a) - within(b))


def permutation_floor(a: torch.Tensor, b: torch.Tensor, num_permutations: int = 200,
                      quantile: float = 0.95, generator: torch.Generator | None = None) -> float:
    """The ``quantile`` of :func:`energy_distance` over random relabellings of the pooled draws
    into sets of ``len(a)`` and ``len(b)``: the statistic's spread when both sets come from one
    law (draws taken as independent)."""
    pooled = torch.cat([a, b]).double()
    dist_ = torch.cdist(pooled, pooled)
    n, m = len(a), len(b)
    labels = torch.zeros(num_permutations, n + m, dtype=torch.float64)
    for i in range(num_permutations):
        labels[i, torch.randperm(n + m, generator=generator)[:n]] = 1.0
    other = 1.0 - labels
    dl, do = labels @ dist_, other @ dist_
    s_aa, s_bb, s_ab = (dl * labels).sum(-1), (do * other).sum(-1), (dl * other).sum(-1)
    stats = 2 * s_ab / (n * m) - s_aa / (n * (n - 1)) - s_bb / (m * (m - 1))
    return float(stats.quantile(quantile))


class _Unscaled(Messenger):
    """Every site at scale 1 (outermost: after the plates' subsample scales)."""

    def _process_message(self, msg):
        msg["scale"] = 1.0


def _latent_sites(model, args, kwargs, max_latent_dim: int) -> dict[str, torch.Size]:
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    shapes = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        fn = site["fn"]
        if getattr(fn, "has_enumerate_support", False) or fn.support.is_discrete:
            raise ValueError(
                f"posterior_check: the model's latent site {name!r} is discrete "
                f"({type(fn).__name__}); NUTS draws continuous latents only (argument `model`)"
            )
        shapes[name] = site["value"].shape
    if not shapes:
        raise ValueError("posterior_check: the model (argument `model`) has no latent sites")
    size = sum(math.prod(s) for s in shapes.values())
    if size > max_latent_dim:
        raise ValueError(
            f"posterior_check: the model's latents have {size} coordinates "
            f"({', '.join(f'{k}: {tuple(v)}' for k, v in shapes.items())}), more than "
            f"max_latent_dim={max_latent_dim}; NUTS on this many is slow and its check weak: "
            "check fewer data points (argument `batch`) or raise max_latent_dim"
        )
    return shapes


def _nuts(model, args, kwargs, num_chains, num_draws, warmup_steps, nuts_kwargs) -> dict:
    from pyro.infer import MCMC, NUTS

    options = {"init_strategy": init_to_sample, "full_mass": True, **(nuts_kwargs or {})}
    chains = []
    for _ in range(num_chains):  # one after another: no worker processes
        mcmc = MCMC(NUTS(_Unscaled()(model), **options), num_samples=num_draws,
                    warmup_steps=warmup_steps, disable_progbar=True)
        mcmc.run(*args, **kwargs)
        chains.append(mcmc.get_samples())
    return {name: torch.cat([c[name] for c in chains]) for name in chains[0]}


def _nuts_ess(p: torch.Tensor, num_chains: int) -> float:
    """The smallest effective sample size over coordinates of the NUTS draws (S, D)."""
    chains = p.reshape(num_chains, -1, p.shape[-1])
    if chains.shape[1] < 4:
        return float(len(p))
    ess = effective_sample_size(chains, chain_dim=0, sample_dim=1)
    return float(ess.nan_to_num(float(len(p))).min().clamp(2.0, len(p)))


@torch.no_grad()
def _guide_draws(model, guide, args, kwargs, shapes, num: int, batch_plate: str) -> dict:
    nesting = _probe(model, guide, args, kwargs, batch_plate).nesting
    with poutine.block(), pyro.plate(PARTICLE_PLATE, num, dim=-(nesting + 1)):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    draws = {}
    for name, shape in shapes.items():
        if name not in trace.nodes:
            raise ValueError(f"posterior_check: the guide has no site {name!r} of the model")
        value = trace.nodes[name]["value"]
        size = math.prod(shape)
        if value.numel() == size:  # the same in every particle (a point estimate)
            value = value.reshape(shape).expand((num,) + tuple(shape))
        elif value.numel() != num * size:
            raise ValueError(
                f"posterior_check: guide site {name!r} has shape {tuple(value.shape)} under "
                f"{num} particles, not {num} draws of the model's shape {tuple(shape)}"
            )
        draws[name] = value.reshape((num,) + tuple(shape))
    return draws


def _flatten(draws: dict, shapes: dict) -> tuple[torch.Tensor, list[str]]:
    columns, names = [], []
    for name, shape in shapes.items():
        columns.append(draws[name].reshape(len(draws[name]), -1).double())
        names += [f"{name}[{', '.join(map(str, i))}]" if shape else name
                  for i in itertools.product(*[range(s) for s in shape])]
    return torch.cat(columns, dim=1), names


def posterior_check(
    model: Callable,
    guide: Callable,
    batch: Any,
    *,
    num_draws: int = 500,
    warmup_steps: int = 300,
    num_chains: int = 1,
    guide_draws: int | None = None,
    num_particles: int = 2000,
    batch_plate: str = "data",
    floor: str = "permutation",
    num_permutations: int = 200,
    floor_quantile: float = 0.95,
    standardize: bool = False,
    max_latent_dim: int = 100,
    nuts_kwargs: dict | None = None,
    chunk_size: int | None = None,
    figure: str | Path | None = None,
) -> PosteriorCheck:
    r"""Compare the guide's :math:`q(z \mid x)` with the posterior :math:`p(z \mid x)` drawn by
    NUTS on one batch (see the module's text).

    :param model, guide: a Pyro model and guide taking the batch, as for
        :func:`~pyro_seqlatent.infer.evaluate.log_marginal` (the guide must broadcast over a
        leftmost particle plate). The model's latents must be continuous, at most
        ``max_latent_dim`` coordinates in all.
    :param batch: the data the posterior is conditioned on.
    :param int num_draws, warmup_steps, num_chains: NUTS draws and warm-up steps per chain, and
        the number of chains (run one after another, each started from a prior draw).
    :param guide_draws: draws from the guide (default: as many as NUTS gives).
    :param int num_particles: importance samples for :math:`\log p(x)` and the ELBO.
    :param str floor: ``"permutation"`` or ``"halves"`` (the module's text says what each is).
    :param bool standardize: divide every coordinate by its NUTS standard deviation before the
        energy distance (for latents of very different scales).
    :param nuts_kwargs: more keyword arguments for :class:`pyro.infer.NUTS` (``step_size``,
        ``max_tree_depth``, ``init_strategy``, ...; the defaults here: ``full_mass=True``,
        a dense mass matrix for correlated posteriors, and ``init_strategy=init_to_sample``).
    :param figure: if given, :meth:`PosteriorCheck.plot` writes the figure there.
    """
    if floor not in FLOORS:
        raise ValueError(f"floor must be one of {FLOORS}, got {floor!r}")
    for label, value in (("num_draws", num_draws), ("num_chains", num_chains),
                         ("warmup_steps", warmup_steps + 1), ("num_permutations",
                                                              num_permutations)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if floor == "halves" and num_draws * num_chains < 4:
        raise ValueError("floor='halves' needs at least 4 NUTS draws (num_draws * num_chains)")
    for label, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"posterior_check: {label} must be callable, got {type(fn).__name__}")
    args, kwargs = batch_args(batch)
    with eval_mode(model, guide):
        shapes = _latent_sites(model, args, kwargs, max_latent_dim)
        p_draws = _nuts(model, args, kwargs, num_chains, num_draws, warmup_steps, nuts_kwargs)
        m = guide_draws or num_draws * num_chains
        q_draws = _guide_draws(model, guide, args, kwargs, shapes, m, batch_plate)
        est = log_marginal(model, guide, batch, num_samples=num_particles,
                           batch_plate=batch_plate, chunk_size=chunk_size)
    p, names = _flatten(p_draws, shapes)
    q, _ = _flatten(q_draws, shapes)
    scale = p.std(0).clamp_min(1e-12) if standardize else torch.ones(p.shape[1],
                                                                       dtype=p.dtype)
    ps, qs = p / scale, q / scale
    ed = energy_distance(ps, qs)
    nuts_ess = _nuts_ess(p, num_chains)
    if floor == "permutation":
        n, m = len(ps), len(qs)
        noise = (permutation_floor(ps, qs, num_permutations, floor_quantile)
                 * (1 / nuts_ess + 1 / m) / (1 / n + 1 / m))
    else:
        half = len(ps) // 2
        noise = energy_distance(ps[:half], ps[half:])
    log_px, elbo = float(est.log_marginal.sum()), float(est.elbo.sum())
    result = PosteriorCheck(
        names=names, nuts_draws=p, guide_draws=q, nuts_mean=p.mean(0), nuts_std=p.std(0),
        guide_mean=q.mean(0), guide_std=q.std(0), energy_distance=ed, noise_floor=noise,
        floor_method=floor, log_marginal=log_px, elbo=elbo, evidence_gap=log_px - elbo,
        ess=float(est.ess.min()), nuts_ess=nuts_ess, khat=est.khat, standardized=standardize,
    )
    if figure is not None:
        result.plot(figure)
    return result
