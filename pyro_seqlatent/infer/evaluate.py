r"""One evaluation path for every model/guide pair: importance-sampled log-likelihoods.

For data point :math:`x_n` and :math:`K` draws :math:`z^{(k)} \sim q(z \mid x_n)`,

.. math:: \log \hat p(x_n) = \log \frac1K \sum_{k=1}^K
          \frac{p(x_n, z^{(k)})}{q(z^{(k)} \mid x_n)}
          \;\le\; \log p(x_n)\quad\text{(in expectation; the IWAE bound, Burda et al. 2015)}

and :math:`\widehat{\mathrm{ELBO}}_n = \frac1K\sum_k \log w_k`. Both tighten with :math:`K`; the
first converges to :math:`\log p(x_n)`. The particles are vectorized by an outer plate at the
leftmost batch dimension and processed in chunks, so :math:`K = 5000` fits in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.utils.data import Dataset

from pyro_seqlatent.infer.batches import batch_args, to_device
from pyro_seqlatent.infer.loader import make_loader
from pyro_seqlatent.infer.modes import eval_mode
from pyro_seqlatent.infer.nfe import nfe_counters, nfe_record, reset_counters

PARTICLE_PLATE = "_log_marginal_particles"


class MarginalEstimate(NamedTuple):
    """``log_marginal`` and ``elbo`` per data point (shape ``(B,)``), and the effective sample
    size of the importance weights per data point."""

    log_marginal: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor


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


def _probe(model, guide, args, kwargs, batch_plate: str) -> tuple[int, int, poutine.Trace]:
    """Run guide and model once to find the plate nesting, the batch plate's dim and the
    subsample indices (replayed into every chunk, so a randomly subsampled plate scores the
    same data points throughout)."""
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
    return nesting, dims[batch_plate], subsamples


@torch.no_grad()
def log_marginal(
    model: Callable,
    guide: Callable,
    batch: Any,
    num_samples: int = 1000,
    batch_plate: str = "data",
    chunk_size: int | None = None,
) -> MarginalEstimate:
    """Importance-sampled :math:`\\log p(x_n)` and ELBO for every data point of ``batch``.

    :param model, guide: a Pyro model and guide taking the batch (``model(*batch)`` for a tuple,
        ``model(**batch)`` for a dict, ``model(batch)`` otherwise). They must broadcast over an
        extra leftmost batch dimension (the particle plate).
    :param int num_samples: :math:`K`, the number of importance samples per data point.
    :param str batch_plate: name of the plate over data points.
    :param chunk_size: particles per vectorized pass (default: ``min(K, 100)``).
    :returns: :class:`MarginalEstimate` with tensors of shape ``(B,)``.

    Latent sites outside the batch plate must be point estimates: their guide site a ``Delta``
    (MAP/ML parameters); their terms are left out, giving :math:`\\log p(x\\mid\\hat\\theta)`.

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
    nesting, batch_dim, subsamples = _probe(model, guide, args, kwargs, batch_plate)
    chunks = []
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        chunks.append(_log_weights(poutine.replay(model, trace=subsamples),
                                   poutine.replay(guide, trace=subsamples), args, kwargs, k,
                                   nesting, batch_dim, batch_plate))
        done += k
    log_w = torch.cat(chunks, dim=0)  # (K, B)
    log_px = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    weights = torch.softmax(log_w, dim=0)
    ess = 1.0 / (weights**2).sum(0)
    return MarginalEstimate(log_px, log_w.mean(0), ess)


def _log_weights(model, guide, args, kwargs, k: int, nesting: int, batch_dim: int,
                 batch_plate: str) -> torch.Tensor:
    with poutine.block(), pyro.plate(PARTICLE_PLATE, k, dim=-(nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    log_w = None
    point_estimates = set()
    for name, site in guide_trace.nodes.items():
        if not _is_sample(site) or site["is_observed"]:
            continue
        if not _in_plate(site, batch_plate):
            if isinstance(_unwrap(site["fn"]), dist.Delta):
                point_estimates.add(name)
            else:
                raise ValueError(
                    f"guide site {name!r} lies outside the batch plate {batch_plate!r} and is "
                    "not a point estimate: log_marginal needs a Delta guide there (MAP weights)"
                )
    for name, site in model_trace.nodes.items():
        if not _is_sample(site) or name in point_estimates:
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            raise ValueError(
                f"model latent site {name!r} has no guide site: every latent needs a proposal"
            )
        term = _per_datum(site, name, nesting, batch_dim, batch_plate, "model")
        log_w = term if log_w is None else log_w + term
    for name, site in guide_trace.nodes.items():
        if not _is_sample(site) or site["is_observed"] or name in point_estimates:
            continue
        if name not in model_trace.nodes and not site["infer"].get("is_auxiliary"):
            raise ValueError(
                f"guide site {name!r} is not in the model: p(x, z) / q(z, {name}) is not an "
                "importance weight for p(x); remove it or mark it infer={'is_auxiliary': True} "
                "with the model sampling its transform (as Pyro's AutoContinuous does)"
            )
        term = _per_datum(site, name, nesting, batch_dim, batch_plate, "guide")
        log_w = -term if log_w is None else log_w - term
    if log_w is None:
        raise ValueError("the model has no sample sites inside the batch plate")
    return log_w


def _per_datum(site: dict, name: str, nesting: int, batch_dim: int, batch_plate: str,
               role: str) -> torch.Tensor:
    """Sum a site's log-prob over every dim but the particle and batch dims -> (K, B)."""
    if not _in_plate(site, batch_plate):
        raise ValueError(
            f"{role} site {name!r} lies outside the batch plate {batch_plate!r}; only point "
            "estimates (a Delta guide site) may"
        )
    # log p or log q of the site with its mask but without plate subsampling or annealing
    # scales: log_marginal estimates log p(x_n) itself.
    lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
    if not torch.is_tensor(lp):
        lp = torch.as_tensor(lp)
    lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))
    b = nesting + 1 + batch_dim
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
    whole pass (``model_nfe_forward``, ``guide_nfe_forward``, ...; the counters are reset first)."""
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
        "log_marginal_per_point": ll,
        "elbo_per_point": el,
        **nfe_record(counters),
    }
