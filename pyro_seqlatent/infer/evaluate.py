r"""One evaluation path for every model/guide pair: importance-sampled log-likelihoods.

For data point :math:`x_n` and :math:`K` draws :math:`z^{(k)} \sim q(z \mid x_n)`,

.. math:: \log \hat p(x_n) = \log \frac1K \sum_{k=1}^K
          \frac{p(x_n, z^{(k)})}{q(z^{(k)} \mid x_n)}
          \;\le\; \log p(x_n)\quad\text{(in expectation; the IWAE bound, Burda et al. 2015)}

and :math:`\widehat{\mathrm{ELBO}}_n = \frac1K\sum_k \log w_k`. Both tighten with :math:`K`; the
first converges to :math:`\log p(x_n)`. The particles are vectorized by an outer plate at the
leftmost batch dimension and processed in chunks, so :math:`K = 5000` fits in memory.

A model with a latent outside the batch plate that the guide does not fix to a point (global
weights with a distribution, or global and local latents together) has no per-point evidence:
then :math:`z_k` is the joint draw of every latent and the estimate is the evidence of the
whole batch, :math:`\log \hat p(x_{1:B}) = \log\frac1K\sum_k p(x_{1:B}, z_k)/q(z_k\mid x_{1:B})`,
one value, reported with the effective sample size of its weights and their Pareto
:math:`\hat k` (Vehtari et al.; above 0.7 the estimate is unreliable and a warning says so).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops.stats import fit_generalized_pareto
from pyro.poutine.util import site_is_subsample
from torch.utils.data import Dataset

from pyro_seqlatent.infer.batches import batch_args, to_device
from pyro_seqlatent.infer.loader import make_loader
from pyro_seqlatent.infer.modes import eval_mode
from pyro_seqlatent.infer.nfe import nfe_counters, nfe_record, reset_counters

PARTICLE_PLATE = "_log_marginal_particles"


PER_POINT = "per_point"
WHOLE_BATCH = "whole_batch"
KHAT_WARN = 0.7


@dataclass(frozen=True)
class MarginalEstimate:
    r"""What :func:`log_marginal` returns.

    ``kind`` is ``"per_point"`` (every latent inside the batch plate, or fixed to a point
    outside it): ``log_marginal``, ``elbo`` and ``ess`` have shape ``(B,)``, one value per data
    point, and ``khat`` is ``None``. It is ``"whole_batch"`` when a latent outside the batch
    plate has a distribution: the three are 0-d tensors, the evidence of the whole batch and
    the effective sample size :math:`(\sum w)^2/\sum w^2` of its weights, and ``khat`` is the
    Pareto :math:`\hat k` of the log-weights (``nan`` with fewer than 50 particles, too few
    for a tail fit; ``-inf`` when every weight is the same, as with the exact posterior).

    It unpacks as ``log_marginal, elbo, ess = est`` (its former tuple form)."""

    log_marginal: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor
    kind: str = PER_POINT
    khat: float | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.log_marginal, self.elbo, self.ess))


def _unwrap(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _is_sample(site: dict) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)


def _plate_dims(trace: poutine.Trace) -> dict[str, int]:
    dims: dict[str, int] = {}
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                dims[frame.name] = frame.dim
    return dims


def _in_plate(site: dict, name: str) -> bool:
    return any(frame.name == name for frame in site["cond_indep_stack"])


def _is_point_estimate(site: dict, has_auxiliary: bool) -> bool:
    """A ``Delta`` guide site is a point estimate (MAP/ML weights) unless the guide draws
    auxiliary latents: in Pyro's ``AutoContinuous`` family the ``Delta`` sites are
    deterministic transforms of the auxiliary draw and their ``log_density`` is part of
    :math:`\\log q`."""
    return isinstance(_unwrap(site["fn"]), dist.Delta) and not has_auxiliary


class _Layout(NamedTuple):
    nesting: int  # plate nesting of model and guide
    batch_dim: int  # the batch plate's dim
    subsamples: poutine.Trace  # subsample sites, replayed into every chunk
    joint: bool  # a latent outside the batch plate has a distribution: whole-batch evidence
    point_estimates: frozenset  # guide sites whose terms are left out


def _probe(model, guide, args, kwargs, batch_plate: str) -> _Layout:
    """Run guide and model once to find the plate nesting, the batch plate's dim, the
    subsample indices (replayed into every chunk, so a randomly subsampled plate scores the
    same data points throughout), and whether the evidence is per point or of the whole
    batch."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = {**_plate_dims(guide_trace), **_plate_dims(model_trace)}
    if batch_plate not in dims:
        raise ValueError(
            f"no vectorized plate named {batch_plate!r} in the model or guide (plates found: "
            f"{sorted(dims)}); pass batch_plate=<the name of the plate over data points>"
        )
    nesting = max(-d for d in dims.values())
    subsamples = guide_trace.copy()
    for name, site in list(subsamples.nodes.items()):
        if not (site["type"] == "sample" and site_is_subsample(site)):
            subsamples.remove_node(name)
    latents = {name: site for name, site in guide_trace.nodes.items()
               if _is_sample(site) and not site["is_observed"]}
    has_auxiliary = any(site["infer"].get("is_auxiliary") for site in latents.values())
    outside = {name for name, site in latents.items() if not _in_plate(site, batch_plate)}
    points = frozenset(name for name in outside
                       if _is_point_estimate(latents[name], has_auxiliary))
    return _Layout(nesting, dims[batch_plate], subsamples, bool(outside - points), points)


@torch.no_grad()
def log_marginal(
    model: Callable,
    guide: Callable,
    batch: Any,
    num_samples: int = 1000,
    batch_plate: str = "data",
    chunk_size: int | None = None,
) -> MarginalEstimate:
    """Importance-sampled :math:`\\log p(x_n)` and ELBO for every data point of ``batch``, or
    the evidence :math:`\\log p(x_{1:B})` of the whole batch where the model has latents
    outside the batch plate.

    :param model, guide: a Pyro model and guide taking the batch (``model(*batch)`` for a tuple,
        ``model(**batch)`` for a dict, ``model(batch)`` otherwise). They must broadcast over an
        extra leftmost batch dimension (the particle plate).
    :param int num_samples: :math:`K`, the number of importance samples per data point (per
        batch in the whole-batch case).
    :param str batch_plate: name of the plate over data points.
    :param chunk_size: particles per vectorized pass (default: ``min(K, 100)``).
    :returns: :class:`MarginalEstimate`: tensors of shape ``(B,)`` (``kind="per_point"``) or
        0-d tensors with the Pareto :math:`\\hat k` (``kind="whole_batch"``).

    Latent sites outside the batch plate whose guide site is a ``Delta`` (MAP/ML parameters)
    are point estimates: their terms are left out, giving :math:`\\log p(x\\mid\\hat\\theta)`.
    Any other latent outside the plate makes the estimate joint: :math:`z_k` holds every
    latent (global and local) and the value is :math:`\\log\\frac1K\\sum_k
    p(x_{1:B}, z_k)/q(z_k\\mid x_{1:B})` for the whole batch, with a warning where
    :math:`\\hat k > 0.7`.

    ``nn.Module`` models and guides are scored in eval mode (dropout off), see
    :func:`~pyro_seqlatent.infer.modes.eval_mode`.
    """
    with eval_mode(model, guide):
        return _log_marginal(model, guide, batch, num_samples, batch_plate, chunk_size)


def _log_marginal(model, guide, batch, num_samples, batch_plate, chunk_size) -> MarginalEstimate:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    chunk = min(num_samples, chunk_size or 100)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
    args, kwargs = batch_args(batch)
    layout = _probe(model, guide, args, kwargs, batch_plate)
    chunks = []
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        chunks.append(_log_weights(poutine.replay(model, trace=layout.subsamples),
                                   poutine.replay(guide, trace=layout.subsamples), args, kwargs,
                                   k, layout, batch_plate))
        done += k
    log_w = torch.cat(chunks, dim=0)  # (K, B), or (K,) for the whole batch
    log_px = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    weights = torch.softmax(log_w, dim=0)
    ess = 1.0 / (weights**2).sum(0)
    if not layout.joint:
        return MarginalEstimate(log_px, log_w.mean(0), ess)
    khat = pareto_khat(log_w)
    if khat > KHAT_WARN:
        warnings.warn(
            f"log_marginal: the Pareto k-hat of the importance weights is {khat:.2f} > "
            f"{KHAT_WARN} (effective sample size {float(ess):.1f} of K = {num_samples}): the "
            "guide is too far from the posterior for importance sampling and the evidence "
            "estimate is unreliable (likely far too low); use a better guide or check it with "
            "posterior_check",
            stacklevel=3,
        )
    return MarginalEstimate(log_px, log_w.mean(0), ess, WHOLE_BATCH, khat)


def pareto_khat(log_weights: torch.Tensor) -> float:
    """Pareto :math:`\\hat k` of a vector of log importance weights, with the tail cut of
    Pyro's :func:`~pyro.infer.importance.psis_diagnostic` (the largest
    :math:`\\min(0.2K, 3\\sqrt K)` weights) and Pyro's
    :func:`~pyro.ops.stats.fit_generalized_pareto`, on weights already drawn (the diagnostic
    itself draws its own). ``nan`` when the tail has fewer than 10 weights (:math:`K < 50`),
    ``-inf`` when every weight is the same."""
    lw = log_weights.detach().flatten()
    # equal up to the rounding of their dtype: bounded weights (the exact posterior)
    tol = 64 * torch.finfo(lw.dtype).eps * max(1.0, float(lw.abs().max()))
    lw = lw.double()
    lw = torch.sort(lw - lw.max())[0]
    if float(lw[0]) > -tol:
        return float("-inf")
    cut = -int(math.ceil(min(0.2 * lw.numel(), 3.0 * math.sqrt(lw.numel())))) - 1
    if -cut > lw.numel():
        return float("nan")
    cutoff = max(math.log(1e-15), float(lw[cut]))
    tail = lw[lw > cutoff]
    if tail.numel() < 10:
        return float("nan")
    return float(fit_generalized_pareto(tail.exp() - math.exp(cutoff))[0])


def _log_weights(model, guide, args, kwargs, k: int, layout: _Layout,
                 batch_plate: str) -> torch.Tensor:
    with poutine.block(), pyro.plate(PARTICLE_PLATE, k, dim=-(layout.nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    log_w = None
    points = layout.point_estimates
    for name, site in model_trace.nodes.items():
        if not _is_sample(site) or name in points:
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            raise ValueError(
                f"model latent site {name!r} has no guide site: every latent needs a proposal"
            )
        term = _reduce(site, name, layout, batch_plate, "model")
        log_w = term if log_w is None else log_w + term
    for name, site in guide_trace.nodes.items():
        if not _is_sample(site) or site["is_observed"] or name in points:
            continue
        if name not in model_trace.nodes and not site["infer"].get("is_auxiliary"):
            raise ValueError(
                f"guide site {name!r} is not in the model: p(x, z) / q(z, {name}) is not an "
                "importance weight for p(x); remove it or mark it infer={'is_auxiliary': True} "
                "with the model sampling its transform (as Pyro's AutoContinuous does)"
            )
        term = _reduce(site, name, layout, batch_plate, "guide")
        log_w = -term if log_w is None else log_w - term
    if log_w is None:
        raise ValueError("the model has no sample sites inside the batch plate")
    return log_w


def _reduce(site: dict, name: str, layout: _Layout, batch_plate: str,
            role: str) -> torch.Tensor:
    """Sum a site's log-prob over every dim but the particle and batch dims -> (K, B); in the
    whole-batch case over every dim but the particle dim -> (K,)."""
    if not layout.joint and not _in_plate(site, batch_plate):
        raise ValueError(
            f"{role} site {name!r} lies outside the batch plate {batch_plate!r}; only point "
            "estimates (a Delta guide site) may"
        )
    # log p or log q of the site with its mask but without plate subsampling or annealing
    # scales: log_marginal estimates log p(x_n) itself.
    lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
    if not torch.is_tensor(lp):
        lp = torch.as_tensor(lp)
    nesting = layout.nesting
    if lp.dim() > nesting + 1:
        raise ValueError(
            f"{role} site {name!r} has a log-density of shape {tuple(lp.shape)}, more dimensions "
            f"than its plates ({nesting + 1}, the particle plate included): the {role} does not "
            "broadcast over the extra leftmost (particle) dimension that log_marginal adds; take "
            "sizes from the right (e.g. (X * w).sum(-1) or torch.einsum('...d,nd->...n', w, X), "
            "not w.unsqueeze(0) or X @ w)")
    lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))
    if layout.joint:
        return lp.reshape(lp.shape[0], -1).sum(-1)
    b = nesting + 1 + layout.batch_dim
    other = [d for d in range(lp.dim()) if d not in (0, b)]
    if other:
        lp = lp.sum(dim=other, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[b])


def evaluate(
    model: Callable,
    guide: Callable,
    data: Dataset,
    *,
    num_samples: int = 1000,
    batch_size: int = 100,
    collate_fn: Callable | None = None,
    batch_plate: str = "data",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`log_marginal` over a whole dataset: mean and standard error of
    :math:`\\log\\hat p(x)` and of the ELBO per data point, plus the per-point values; for a pair
    with function-evaluation counters (:mod:`pyro_seqlatent.infer.nfe`), the evaluations of the
    whole pass (``model_nfe_forward``, ``guide_nfe_forward``, ...; the counters are reset first).
    ``log_marginal_minus_elbo`` is the mean gap :math:`\\log\\hat p(x_n) - \\mathrm{ELBO}_n` with
    its paired standard error. Without ``collate_fn`` the model's own (``model.collate_fn``,
    as :func:`~pyro_seqlatent.infer.train` does) batches the data."""
    if collate_fn is None:
        collate_fn = getattr(model, "collate_fn", None)
    loader = make_loader(data, batch_size=batch_size, collate_fn=collate_fn)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    lls, elbos = [], []
    counters = nfe_counters(model, guide)
    reset_counters(counters)
    with torch.random.fork_rng(devices=devices):
        iterator = iter(loader)  # the loader draws its base seed here: before the seed below
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(loader), desc=f"log p(x), K={num_samples}",
                            dynamic_ncols=True)
        torch.manual_seed(seed)  # Pyro draws from torch's RNG only; python/numpy untouched
        for batch in iterator:
            est = log_marginal(model, guide, to_device(batch, device), num_samples=num_samples,
                               batch_plate=batch_plate, chunk_size=chunk_size)
            if est.kind == WHOLE_BATCH:
                raise ValueError(
                    "evaluate: the model has latents outside the batch plate with a "
                    "distribution (global latents), so its evidence is of the whole data set, "
                    "not a sum over batches; call log_marginal(model, guide, batch) on one "
                    "batch holding every data point (or give those latents a Delta guide)"
                )
            lls.append(est.log_marginal.cpu())
            elbos.append(est.elbo.cpu())
    ll = torch.cat(lls).double()
    el = torch.cat(elbos).double()
    n = ll.numel()

    def sem(v: torch.Tensor) -> float:
        return float(v.std() / math.sqrt(n)) if n > 1 else float("nan")

    return {
        "num_points": n,
        "num_samples": num_samples,
        "log_marginal": float(ll.mean()),
        "log_marginal_sem": sem(ll),
        "elbo": float(el.mean()),
        "elbo_sem": sem(el),
        # what the guide loses against the posterior (≈ 0 also where the latent is unused:
        # read it with infer.collapse's KL per dimension and active units)
        "log_marginal_minus_elbo": float((ll - el).mean()),
        "log_marginal_minus_elbo_sem": sem(ll - el),
        "log_marginal_per_point": ll,
        "elbo_per_point": el,
        **nfe_record(counters),
    }
