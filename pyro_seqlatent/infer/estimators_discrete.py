r"""Gradient estimators for discrete (non-reparameterizable) latents, each a ``pyro.infer.ELBO``,
and the exact bounds they estimate, by summing over every latent configuration.

Notation: :math:`\log w_k = \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)` for
:math:`k = 1..K` independent guide draws. Sites the guide can reparameterize keep their pathwise
gradient (through :math:`\log w_k`); at every other latent guide site the draw is a constant and
its score :math:`\nabla_\phi \log q_\phi(z_k)` is multiplied by a *learning signal*. Like
``RenyiELBO``, plates shared by every site (e.g. the data plate of a per-data-point latent) keep
one weight per element; other plate dims are summed into :math:`\log w_k`.

* :class:`VIMCOELBO` (Mnih & Rezende 2016, eqs. 3, 8-10): the K-sample bound
  :math:`\mathcal L_K = \mathbb E \log \hat L`, :math:`\hat L = \frac1K\sum_k w_k`, with

  .. math:: \nabla \mathcal L_K = \mathbb E\Bigl[\sum_k \tilde w_k \nabla \log w_k
            + \sum_k \bigl(\log \hat L - \log \hat L_{-k}\bigr) \nabla_\phi \log q_\phi(z_k)\Bigr],
            \quad \hat L_{-k} = \tfrac1K\Bigl(\sum_{j \ne k} w_j + \exp\bigl(\tfrac1{K-1}
            \sum_{j\ne k} \log w_j\bigr)\Bigr),

  :math:`\tilde w_k = w_k / \sum_j w_j`: the held-out weight is replaced by the geometric mean
  of the others, a baseline that does not depend on :math:`z_k`. ``leave_one_out=False`` uses the
  plain signal :math:`\log \hat L` (the unbaselined, still unbiased, estimator).
* :class:`LeaveOneOutELBO` (REINFORCE leave-one-out, Kool, van Hoof & Welling 2019): the ELBO
  from K draws,

  .. math:: \nabla \mathcal L \approx \frac1K \sum_k \Bigl[\nabla \log w_k + \Bigl(\log w_k
            - \frac1{K-1}\sum_{j\ne k} \log w_j\Bigr) \nabla_\phi \log q_\phi(z_k)\Bigr].

* :class:`ConcreteELBO` (Maddison, Mnih & Teh 2017; Jang, Gu & Poole 2017): every latent
  ``Bernoulli`` of guide *and* model becomes a binary Concrete ``RelaxedBernoulli`` and every
  ``OneHotCategorical`` a ``RelaxedOneHotCategorical`` at ``temperature``; the pathwise gradient
  of that relaxed ELBO is **biased** for the discrete ELBO (the bias vanishes as the
  temperature goes to 0 while the variance grows). An integer ``Categorical`` cannot carry a
  relaxed one-hot value and is refused.
* :class:`EnumELBO`: ``TraceEnum_ELBO`` with ``config_enumerate(guide, "parallel")`` applied by
  the estimator: the discrete sites are summed exactly (zero variance there; continuous sites
  stay Monte Carlo). Refuses a non-reparameterizable site without enumerable support.
* :class:`IWAEELBO`: ``RenyiELBO(alpha=0)`` that refuses non-reparameterizable guide sites,
  where Pyro's estimator gives an identically zero guide gradient (use :class:`VIMCOELBO`).

Exact references: :func:`enumerate_configurations` lists every joint value of the (all discrete)
guide sites; :func:`exact_bound` is :math:`\sum_z q(z)\,(\log p(x, z) - \log q(z))` (K = 1) or
:math:`\sum_{z_1..z_K} \prod_k q(z_k) \log \frac1K \sum_k w_k` (K > 1), differentiable in every
parameter, so autograd gives the exact gradient the estimators are tested against.
"""

from __future__ import annotations

import itertools
import math

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent

from pyro_seqlatent.infer.estimators_elbos import _latent_sites, _PathwiseELBO
from pyro_seqlatent.infer.estimators_sites import _is_point_estimate

__all__ = [
    "ConcreteELBO",
    "EnumELBO",
    "IWAEELBO",
    "LeaveOneOutELBO",
    "RelaxMessenger",
    "VIMCOELBO",
    "enumerate_configurations",
    "exact_bound",
    "is_reparameterized",
    "latent_sites",
    "leaf_distribution",
    "relax",
]


def leaf_distribution(fn: dist.Distribution) -> dist.Distribution:
    """``fn`` without its ``Independent``, ``MaskedDistribution`` and ``ExpandedDistribution``
    wrappers."""
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def is_reparameterized(fn: dist.Distribution) -> bool:
    """Whether a guide site keeps a pathwise gradient (``rsample``, or a ``Delta`` point
    estimate)."""
    return bool(fn.has_rsample) or _is_point_estimate(fn)


def latent_sites(trace) -> list[tuple[str, dict]]:
    """``(name, site)`` of the latent (not observed, not plate-subsample) sample sites."""
    return [(n, s) for n, s in _latent_sites(trace) if not site_is_subsample(s)]


def _non_reparameterized(trace) -> list[tuple[str, dict]]:
    return [(n, s) for n, s in latent_sites(trace) if not is_reparameterized(s["fn"])]


# --------------------------------------------------------------------- multi-sample, score
class _MultiSampleScoreELBO(_PathwiseELBO):
    """K vectorized particles: per-particle ``log w_k`` and the summed ``log q`` of the
    non-reparameterizable guide sites (whose gradient is the score), shape ``(K, *plates)``."""

    def __init__(self, num_particles: int = 5, **kwargs):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) \
                or num_particles < 2:
            raise ValueError(f"{type(self).__name__} needs num_particles >= 2 (a leave-one-out "
                             f"baseline needs other draws), got {num_particles!r}")
        if kwargs.pop("vectorize_particles", True) is not True:
            raise ValueError(f"{type(self).__name__} always vectorizes its particles; drop "
                             "vectorize_particles=False")
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)

    def _weights(self, model, guide, args, kwargs):
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_w = torch.zeros(())
        for _, site in model_trace.nodes.items():
            if site["type"] == "sample":
                log_w = log_w + torch_sum(site["log_prob"], sum_dims)
        log_q_score = torch.zeros(())
        for _, site in _latent_sites(guide_trace):
            lq = torch_sum(site["log_prob"], sum_dims)
            log_w = log_w - lq
            if not is_reparameterized(site["fn"]):
                log_q_score = log_q_score + lq
        log_w, log_q_score = torch.broadcast_tensors(log_w, log_q_score)
        if log_w.dim() == 0 or log_w.shape[0] != self.num_particles:
            raise ValueError(f"{type(self).__name__}: the particle dimension is not the "
                             "leftmost one; set max_plate_nesting= to the model's plate depth")
        return log_w, log_q_score

    def differentiable_loss(self, model, guide, *args, **kwargs):
        log_w, log_q_score = self._weights(model, guide, args, kwargs)
        value, signal = self._objective(log_w)
        score = (signal.detach() * log_q_score).sum(0)
        surrogate = value + score - score.detach()
        return -surrogate.sum()

    def _objective(self, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class VIMCOELBO(_MultiSampleScoreELBO):
    """VIMCO (module docstring); the loss value is :math:`-\\log \\frac1K\\sum_k w_k`."""

    def __init__(self, num_particles: int = 5, leave_one_out: bool = True, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)
        self.leave_one_out = leave_one_out

    def _objective(self, log_w):
        k = self.num_particles
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        if not self.leave_one_out:
            return bound, bound.detach().expand_as(log_w)
        lw = log_w.detach()
        geometric = (lw.sum(0, keepdim=True) - lw) / (k - 1)  # mean log w of the others
        eye = torch.eye(k, dtype=torch.bool, device=lw.device).reshape(k, k, *[1] * (lw.dim() - 1))
        held_out = torch.where(eye, geometric.unsqueeze(1), lw.unsqueeze(0))  # [k, j]
        bound_minus = torch.logsumexp(held_out, 1) - math.log(k)
        return bound, bound.detach() - bound_minus


class LeaveOneOutELBO(_MultiSampleScoreELBO):
    """REINFORCE leave-one-out for the ELBO (module docstring); the loss value is
    :math:`-\\frac1K\\sum_k \\log w_k`."""

    def _objective(self, log_w):
        k = self.num_particles
        lw = log_w.detach()
        others = (lw.sum(0, keepdim=True) - lw) / (k - 1)
        return log_w.mean(0), (lw - others) / k


# ------------------------------------------------------------------------------ relaxation
class _RelaxedOneHot(dist.RelaxedOneHotCategorical):
    """``RelaxedOneHotCategorical`` scoring a value with underflowed (exactly 0) coordinates at
    the value clamped to the smallest normal number and renormalised, instead of NaN (low
    temperatures, float32)."""

    def log_prob(self, value):
        value = value.clamp_min(torch.finfo(value.dtype).tiny)
        return super().log_prob(value / value.sum(-1, keepdim=True))


def relax(fn: dist.Distribution, temperature: float) -> dist.Distribution:
    """``fn`` with a ``Bernoulli`` leaf replaced by a binary Concrete ``RelaxedBernoulli`` and a
    ``OneHotCategorical`` leaf by a ``RelaxedOneHotCategorical`` (same logits), wrappers rebuilt;
    reparameterizable distributions are returned as they are."""
    if is_reparameterized(fn):
        return fn
    if isinstance(fn, Independent):
        return dist.Independent(relax(fn.base_dist, temperature), fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        return MaskedDistribution(relax(fn.base_dist, temperature), fn._mask)
    if isinstance(fn, ExpandedDistribution):
        return relax(fn.base_dist, temperature).expand(fn.batch_shape)
    t = torch.as_tensor(temperature, dtype=fn.logits.dtype if hasattr(fn, "logits")
                        else torch.get_default_dtype())
    if isinstance(fn, dist.Bernoulli):
        return dist.RelaxedBernoulli(t, logits=fn.logits)
    if isinstance(fn, dist.OneHotCategorical):
        return _RelaxedOneHot(t, logits=fn.logits)
    raise ValueError(
        f"the Concrete relaxation handles Bernoulli and OneHotCategorical sites, not "
        f"{type(fn).__name__}" + (" (an integer Categorical value cannot carry a relaxed one-hot:"
                                  " write the site as OneHotCategorical)"
                                  if isinstance(fn, dist.Categorical) else ""))


class RelaxMessenger(Messenger):
    """Relax every latent (not observed) Bernoulli / OneHotCategorical site (:func:`relax`)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["fn"] = relax(msg["fn"], self.temperature)


class ConcreteELBO(Trace_ELBO):
    """``Trace_ELBO`` of the Concrete-relaxed model and guide (module docstring); biased for the
    discrete ELBO. The loss value is the relaxed negative ELBO.

    :param float temperature: the relaxation's temperature, shared by guide and prior
        (default 0.5)."""

    def __init__(self, temperature: float = 0.5, **kwargs):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def _relaxed(self, fn):
        return RelaxMessenger(self.temperature)(fn)

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(self._relaxed(model), self._relaxed(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(self._relaxed(model), self._relaxed(guide), *args,
                                      **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(self._relaxed(model), self._relaxed(guide), *args,
                                           **kwargs)


# ----------------------------------------------------------------------------- enumeration
class EnumELBO(TraceEnum_ELBO):
    """``TraceEnum_ELBO`` on ``config_enumerate(guide, default="parallel")``: exact sums over
    the discrete guide sites (module docstring)."""

    def _enumerated(self, guide):
        return config_enumerate(guide, default="parallel")

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        for name, site in _non_reparameterized(guide_trace):
            if not site["infer"].get("enumerate"):
                raise ValueError(
                    f"enum: guide site {name!r} ({type(site['fn']).__name__}) has no enumerable "
                    "support, so it cannot be summed exactly (a Bernoulli(...).to_event(1) "
                    "vector is not enumerable: use one site per unit, or a score-function "
                    "estimator such as 'vimco')")
        return model_trace, guide_trace

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(model, self._enumerated(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(model, self._enumerated(guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(model, self._enumerated(guide), *args, **kwargs)


class IWAEELBO(RenyiELBO):
    """``RenyiELBO(alpha=0)``, the IWAE bound, refusing non-reparameterizable guide sites: there
    Pyro's estimator returns an identically zero guide gradient."""

    def __init__(self, num_particles: int = 5, vectorize_particles: bool = True, **kwargs):
        super().__init__(alpha=0.0, num_particles=num_particles,
                         vectorize_particles=vectorize_particles, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        bad = _non_reparameterized(guide_trace)
        if bad:
            raise ValueError(
                f"iwae: guide site {bad[0][0]!r} ({type(bad[0][1]['fn']).__name__}) is not "
                "reparameterizable, where RenyiELBO(alpha=0) gives an identically zero guide "
                "gradient; use 'vimco' for the same K-sample bound")
        return model_trace, guide_trace


# ----------------------------------------------------------------------- exact references
def _site_values(fn: dist.Distribution, shape: torch.Size) -> list[torch.Tensor]:
    """Every value of a site of value shape ``shape``: each element of its batch takes every
    value of the leaf distribution's support."""
    leaf = leaf_distribution(fn)
    if not leaf.has_enumerate_support:
        raise ValueError(f"{type(leaf).__name__} has no enumerable support")
    support = leaf.enumerate_support(expand=False)
    event = tuple(leaf.event_shape)
    support = support.reshape(support.shape[0], *event)
    batch = tuple(shape[: len(shape) - len(event)])
    n = math.prod(batch)
    return [support[torch.tensor(idx, dtype=torch.long)].reshape(batch + event)
            for idx in itertools.product(range(support.shape[0]), repeat=n)]


def enumerate_configurations(guide, *args, max_configurations: int = 100_000,
                             **kwargs) -> list[dict[str, torch.Tensor]]:
    """Every joint value ``{site: value}`` of the guide's latent sites, which must all be
    discrete with enumerable support (their shapes are read from one guide run)."""
    with poutine.block(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    names, choices = [], []
    for name, site in latent_sites(trace):
        if is_reparameterized(site["fn"]):
            raise ValueError(f"exact enumeration needs a discrete guide; site {name!r} is "
                             f"continuous ({type(site['fn']).__name__})")
        names.append(name)
        choices.append(_site_values(site["fn"], site["value"].shape))
    total = math.prod(len(c) for c in choices)
    if total > max_configurations:
        raise ValueError(f"{total} configurations exceed max_configurations="
                         f"{max_configurations}; use a smaller model")
    return [dict(zip(names, values)) for values in itertools.product(*choices)]


def _log_joint(fn, config, args, kwargs) -> torch.Tensor:
    trace = poutine.trace(poutine.condition(fn, data=config)).get_trace(*args, **kwargs)
    return trace.log_prob_sum()


def exact_bound(model, guide, *args, num_particles: int = 1,
                max_configurations: int = 100_000, **kwargs) -> torch.Tensor:
    """The exact ELBO (``num_particles=1``) or K-sample bound of an all-discrete guide, summed
    over every configuration (K-tuple of configurations); a differentiable scalar."""
    configs = enumerate_configurations(guide, *args, max_configurations=max_configurations,
                                       **kwargs)
    with poutine.block():
        log_q = torch.stack([_log_joint(guide, c, args, kwargs) for c in configs])
        log_p = torch.stack([_log_joint(model, c, args, kwargs) for c in configs])
    k = num_particles
    if len(configs) ** k > max_configurations:
        raise ValueError(f"{len(configs)}^{k} K-tuples exceed max_configurations")
    log_w = log_p - log_q
    grids_q = torch.meshgrid(*[log_q] * k, indexing="ij")
    grids_w = torch.meshgrid(*[log_w] * k, indexing="ij")
    log_q_tuple = sum(grids_q)
    inner = torch.logsumexp(torch.stack(grids_w), 0) - math.log(k)
    terms = torch.where(log_q_tuple > -math.inf, log_q_tuple.exp() * inner,
                        torch.zeros_like(inner))
    return terms.sum()
