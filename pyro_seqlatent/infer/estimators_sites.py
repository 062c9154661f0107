r"""Site-level pieces of the gradient-estimator lab: cache-free ``log q`` and the score-function
handler.

**Cache-free log-density.** A flow guide site :math:`z = f_\phi(z_0)`, :math:`z_0 \sim q_0` has

.. math:: \log q_\phi(z) = \log q_0\bigl(f_\phi^{-1}(z)\bigr)
          - \log\Bigl|\det \frac{\partial f_\phi}{\partial z_0}\Bigr|_{z_0 = f_\phi^{-1}(z)}.

A ``TransformedDistribution`` whose transforms cache ``(z_0, z)`` scores the value it sampled at
the cached base point :math:`z_0`; for a value drawn *without* gradients that point is a detached
constant, so :math:`\nabla_\phi \log q` misses the dependence of :math:`f_\phi^{-1}(z)` on
:math:`\phi` and the score-function gradient is biased. :func:`cache_free_log_prob` recomputes
:math:`f_\phi^{-1}(z)` through each transform's own (differentiable) inverse and never reads a
cache.

**Score-function handler.** :func:`score_function` (a ``Messenger``) replaces every continuous,
reparameterizable guide site by a :class:`ScoreFunctionSite`: same density, same draw (the
reparameterized draw, detached, so the random numbers used are the same as the pathwise
estimator's), ``has_rsample = False``. Pyro's ELBOs then form the score-function (REINFORCE)
estimator of Ranganath et al. 2014, eq. 3,

.. math:: \nabla_\phi \mathcal L = \mathbb E_{q}\bigl[\nabla_\phi \log q_\phi(z)\,
          (\log p(x, z) - \log q_\phi(z))\bigr],

at that site. ``Independent``, ``MaskedDistribution`` and ``ExpandedDistribution`` wrappers are
unwrapped and rebuilt around the leaf (``has_rsample_(False)`` would raise on them). ``Delta``
point-estimate sites and sites that already lack ``rsample`` are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.contrib.zuko import ZukoToPyro
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import ComposeTransform, Independent, TransformedDistribution
from torch.distributions.transforms import _InverseTransform

from pyro_seqlatent.transforms import Flow


def _flat_parts(transforms) -> list:
    parts = []
    for t in transforms:
        if isinstance(t, ComposeTransform):
            parts += _flat_parts(t.parts)
        else:
            parts.append(t)
    return parts


def _inverse_and_ldj(transform, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = f^{-1}(y)`` and ``log|det ∂f/∂x|`` at ``x``, never from a cache."""
    if isinstance(transform, Flow):
        return transform._inverse_and_ldj(y)
    if isinstance(transform, _InverseTransform):  # f = g^{-1}: x = g(y), log|det f'| = -log|g'|
        inner = transform._inv
        x = _forward_no_cache(inner, y)
        return x, -inner.log_abs_det_jacobian(y, x)
    fresh = _without_cache(transform)
    try:
        x = fresh._inverse(y)
    except (NotImplementedError, KeyError) as err:
        raise ValueError(
            f"{type(transform).__name__} has no inverse, so log q(z) cannot be recomputed at a "
            "value it did not sample (needed by the score-function, STL and DReG estimators); "
            "pass the guide's flow= an invertible flow such as those of "
            "pyro_seqlatent.transforms, 'spline' or a zuko flow"
        ) from err
    return x, fresh.log_abs_det_jacobian(x, y)


def _forward_no_cache(transform, x: torch.Tensor) -> torch.Tensor:
    if isinstance(transform, Flow):
        return transform._forward(x)[0]
    return _without_cache(transform)._call(x)


def _without_cache(transform):
    try:
        return transform.with_cache(0)
    except NotImplementedError:
        return transform


def cache_free_log_prob(fn: dist.Distribution, value: torch.Tensor) -> torch.Tensor:
    r"""``fn.log_prob(value)`` recomputed without any transform cache (equation in the module
    docstring); differentiable in the parameters of ``fn`` through the flows' inverses.

    Unwraps ``Independent``, ``MaskedDistribution``, ``ExpandedDistribution`` and
    :class:`ScoreFunctionSite`; other distributions use their own ``log_prob``.
    """
    if isinstance(fn, ScoreFunctionSite):
        return cache_free_log_prob(fn.fn, value)
    if isinstance(fn, Independent):
        return sum_rightmost(cache_free_log_prob(fn.base_dist, value),
                             fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        lp = cache_free_log_prob(fn.base_dist, value)
        if fn._mask is False:
            return torch.zeros_like(lp)
        return lp if fn._mask is True else scale_and_mask(lp, mask=fn._mask)
    if isinstance(fn, ExpandedDistribution):
        lp = cache_free_log_prob(fn.base_dist, value)
        shape = torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])
        return lp.expand(shape)
    if isinstance(fn, TransformedDistribution):
        event_dim = len(fn.event_shape)
        log_prob = 0.0
        y = value
        for transform in reversed(_flat_parts(fn.transforms)):
            x, ldj = _inverse_and_ldj(transform, y)
            event_dim += transform.domain.event_dim - transform.codomain.event_dim
            log_prob = log_prob - sum_rightmost(ldj, event_dim - transform.domain.event_dim)
            y = x
        base_lp = cache_free_log_prob(fn.base_dist, y)
        return log_prob + sum_rightmost(base_lp, event_dim - len(fn.base_dist.event_shape))
    return fn.log_prob(value)


class ScoreFunctionSite(dist.TorchDistribution):
    """``fn`` with ``has_rsample = False``: draws ``fn.rsample()`` without gradients (the same
    random numbers as the pathwise estimator) and scores them with :func:`cache_free_log_prob`.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, fn: dist.Distribution):
        if not fn.has_rsample:
            raise ValueError(f"{type(fn).__name__} has no rsample: it is already score-function")
        self.fn = fn
        super().__init__(fn.batch_shape, fn.event_shape, validate_args=False)

    @property
    def support(self):
        return self.fn.support

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            # a zuko flow (pyro.contrib.zuko.ZukoToPyro) draws through __call__, not rsample
            draw = self.fn if isinstance(self.fn, ZukoToPyro) else self.fn.rsample
            return draw(sample_shape).detach()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return cache_free_log_prob(self.fn, value)

    def expand(self, batch_shape, _instance=None) -> ScoreFunctionSite:
        return ScoreFunctionSite(self.fn.expand(torch.Size(batch_shape)))

    def __repr__(self) -> str:
        return f"ScoreFunctionSite({self.fn!r})"


def _is_point_estimate(fn: dist.Distribution) -> bool:
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def as_score_function(fn: dist.Distribution) -> dist.Distribution:
    """The same distribution with every reparameterizable leaf turned score-function;
    wrappers (``Independent``, ``MaskedDistribution``, ``ExpandedDistribution``) are rebuilt
    around the new leaf. ``Delta`` and non-reparameterizable distributions are returned as is."""
    if not fn.has_rsample or _is_point_estimate(fn) or isinstance(fn, ScoreFunctionSite):
        return fn
    if isinstance(fn, Independent):
        return dist.Independent(as_score_function(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        return MaskedDistribution(as_score_function(fn.base_dist), fn._mask)
    if isinstance(fn, ExpandedDistribution):
        return ExpandedDistribution(as_score_function(fn.base_dist), fn.batch_shape)
    return ScoreFunctionSite(fn)


class ScoreFunctionMessenger(Messenger):
    """Turn every latent guide site into a score-function site (see the module docstring).

    :param baseline: ``None``, or a function ``baseline(msg) -> dict`` giving the
        ``infer["baseline"]`` options of the site (read by ``TraceGraph_ELBO``).
    """

    def __init__(self, baseline: Callable[[dict], dict[str, Any]] | None = None):
        super().__init__()
        self.baseline = baseline

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if site_is_subsample(msg):
            return
        msg["fn"] = as_score_function(msg["fn"])
        # the baseline goes to every site scored by the score function: the continuous ones
        # just made so and those that were discrete to begin with (Bernoulli, Categorical)
        if self.baseline is not None and not msg["fn"].has_rsample:
            options = self.baseline(msg)
            if options:
                msg["infer"] = {**msg.get("infer", {}), "baseline": options}


def score_function(guide: Callable | None = None, baseline=None):
    """``score_function(guide)``: the guide with every continuous latent site scored by the
    score-function estimator (usable as a decorator or a context manager, like any handler)."""
    messenger = ScoreFunctionMessenger(baseline)
    return messenger(guide) if guide is not None else messenger
