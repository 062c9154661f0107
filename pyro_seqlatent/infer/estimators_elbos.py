r"""ELBO gradient estimators over an unchanged model/guide pair, each a ``pyro.infer.ELBO``.

Notation: :math:`\log w = \log p_\theta(x, z) - \log q_\phi(z \mid x)` with
:math:`z = g_\phi(\varepsilon)`. The total derivative of :math:`\log w` splits into a *path*
part and a *score* part,

.. math:: \frac{d \log w}{d\phi} = \underbrace{\frac{\partial \log w}{\partial z}
          \frac{d z}{d\phi}}_{\text{path}} - \underbrace{\frac{\partial \log q_\phi(z)}
          {\partial \phi}\Big|_{z}}_{\text{score}},
          \qquad \mathbb E_q[\text{score}] = 0.

The score part is computed by running the guide again with every latent value fixed to its
detached draw (so parent latents are constants too) and scoring it with
:func:`~pyro_seqlatent.infer.estimators_sites.cache_free_log_prob`; adding
``score - score.detach()`` to a surrogate removes it from the gradient without changing the
loss value.

* :class:`ScoreFunctionELBO`: ``Trace_ELBO`` on the guide wrapped by
  :func:`~pyro_seqlatent.infer.estimators_sites.score_function` (BBVI, Ranganath et al. 2014,
  eq. 3; Rao-Blackwellised across plates only).
* :class:`BaselineScoreFunctionELBO`: ``TraceGraph_ELBO`` on the same guide with a decaying
  average or a neural baseline per site (Ranganath et al. 2014 §3; Mnih & Gregor 2014).
* :class:`StickingTheLandingELBO` (Roeder et al. 2017): the gradient of
  :math:`\log p_\theta(x, z) - \log q_{\bar\phi}(z)`, i.e. the total gradient minus the score.
* :class:`DReGELBO` (Tucker et al. 2018, eq. 5) for the IWAE bound
  :math:`\mathcal L_K = \mathbb E\bigl[\log \tfrac1K \sum_k w_k\bigr]` with normalised weights
  :math:`\tilde w_k = w_k / \sum_j w_j`:

  .. math:: \nabla_\theta \mathcal L_K \approx \sum_k \tilde w_k\, \nabla_\theta \log p_\theta(x,
            z_k),\qquad
            \nabla_\phi \mathcal L_K \approx \sum_k \tilde w_k^2\, \frac{\partial \log w_k}
            {\partial z_k} \frac{d z_k}{d\phi}.

  The surrogate is :math:`\sum_k \tilde w_k^2 (\log w_k - \text{score}_k) + (\tilde w_k -
  \tilde w_k^2) \log p_\theta(x, \bar z_k)` (weights and :math:`\bar z` detached), so a
  parameter shared by model and guide gets both parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from torch import nn

from pyro_seqlatent.infer.estimators_sites import (
    _is_point_estimate,
    cache_free_log_prob,
    score_function,
)
from pyro_seqlatent.nn import MLP


def _latent_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            yield name, site


class ScoreFunctionELBO(Trace_ELBO):
    """``Trace_ELBO`` with every reparameterizable guide site scored by the score function."""

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(model, score_function(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(model, score_function(guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(model, score_function(guide), *args, **kwargs)


_AVG_BASELINE_PREFIX = "__baseline_avg_downstream_cost_"


def clear_average_baselines() -> None:
    """Forget the decaying-average baselines ``TraceGraph_ELBO`` keeps in the param store."""
    store = pyro.get_param_store()
    for name in [k for k in store.keys() if k.startswith(_AVG_BASELINE_PREFIX)]:
        del store[name]


def default_baseline_input(args: tuple, kwargs: dict, batch_shape: torch.Size) -> torch.Tensor:
    """The first tensor argument of the guide, flattened per data point:
    shape ``batch_shape + (features,)``."""
    tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
    if not tensors:
        raise ValueError("the neural baseline needs a tensor argument of the guide; pass "
                         "baseline_input=lambda args, kwargs, batch_shape: <tensor>")
    x = tensors[0].detach()
    n = len(batch_shape)
    if tuple(x.shape[:n]) != tuple(batch_shape):
        if n == 1 and x.dim() >= 1 and x.shape[-1] == batch_shape[0]:
            x = x.reshape(-1, batch_shape[0]).transpose(0, 1)  # data along the last dim
        else:
            raise ValueError(
                f"cannot build a per-site baseline input of batch shape {tuple(batch_shape)} "
                f"from a guide argument of shape {tuple(x.shape)}; pass baseline_input=..."
            )
    return x.reshape(*batch_shape, -1).to(torch.get_default_dtype())


def _leading_ones_squeezed(value: torch.Tensor) -> torch.Tensor:
    """``value`` without its leading size-1 dims: the shape ``TraceGraph_ELBO`` gives the
    downstream cost it compares a baseline with (``MultiFrameTensor.sum_to`` squeezes them,
    so a plate of one data point has a cost of shape ``()``)."""
    while value.dim() and value.shape[0] == 1:
        value = value.squeeze(0)
    return value


class BaselineScoreFunctionELBO(TraceGraph_ELBO):
    """Score-function estimator with a per-site baseline (``TraceGraph_ELBO``).

    :param baseline: ``"average"`` (decaying average of the downstream cost, ``beta``) or
        ``"nn"`` (an MLP of the guide's input per site, trained by its own Adam on the squared
        error to the downstream cost after every ``loss_and_grads``).
    """

    def __init__(self, baseline: str = "average", beta: float = 0.9, hidden: int = 64,
                 baseline_lr: float = 1e-2, baseline_input: Callable | None = None,
                 **kwargs):
        if baseline not in ("average", "nn"):
            raise ValueError(f"baseline={baseline!r}: use 'average' or 'nn'")
        if baseline == "nn" and kwargs.get("vectorize_particles"):
            raise ValueError("the neural baseline needs vectorize_particles=False (TraceGraph "
                             "compares the baseline's shape with the per-particle cost)")
        super().__init__(**kwargs)
        self.kind, self.beta, self.hidden, self.baseline_lr = baseline, beta, hidden, baseline_lr
        self.baseline_input = baseline_input or default_baseline_input
        self.baselines = nn.ModuleDict()
        self._optimizer: torch.optim.Optimizer | None = None
        self._call: tuple[tuple, dict] = ((), {})
        self._signature = None

    def _options(self, msg: dict) -> dict:
        if self.kind == "average":
            return {"use_decaying_avg_baseline": True, "baseline_beta": self.beta}
        args, kwargs = self._call
        x = self.baseline_input(args, kwargs, msg["fn"].batch_shape)
        key = msg["name"].replace(".", "_")
        if key not in self.baselines:
            net = MLP(x.shape[-1], (self.hidden,), 1).to(x.device)
            self.baselines[key] = net
            if self._optimizer is None:
                self._optimizer = torch.optim.Adam(net.parameters(), lr=self.baseline_lr)
            else:
                self._optimizer.add_param_group({"params": list(net.parameters())})
        net = self.baselines[key]
        return {"nn_baseline": lambda inp: _leading_ones_squeezed(net(inp).squeeze(-1)),
                "nn_baseline_input": x}

    def _wrap(self, guide, args, kwargs):
        self._call = (args, kwargs)
        signature = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        if self.kind == "average" and signature != self._signature:
            clear_average_baselines()  # a decaying average per data slot needs a fixed shape
        self._signature = signature
        return score_function(guide, baseline=self._options)

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(model, self._wrap(guide, args, kwargs), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = super().loss_and_grads(model, self._wrap(guide, args, kwargs), *args, **kwargs)
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        return loss


class _PathwiseELBO(ELBO):
    """Shared trace machinery of STL and DReG (vectorized particles by default)."""

    def __init__(self, num_particles: int = 1, vectorize_particles: bool = True, **kwargs):
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles,
                         **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _particles(self, fn):
        return self._vectorized_num_particles(fn) if self.vectorize_particles else fn

    def _check_reparameterized(self, guide_trace) -> None:
        for name, site in _latent_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"{type(self).__name__} needs reparameterizable guide sites, but site "
                    f"{name!r} ({type(site['fn']).__name__}) has no rsample; use a "
                    "score-function estimator ('score', 'score_avg_baseline') instead"
                )

    def _detached_values(self, guide_trace) -> dict[str, torch.Tensor]:
        """Latent draws with gradients cut, except point estimates (Delta sites), which are
        parameters, not random variables."""
        return {name: site["value"] if _is_point_estimate(site["fn"]) else site["value"].detach()
                for name, site in _latent_sites(guide_trace)}

    def _score_terms(self, guide, values, args, kwargs) -> list[tuple[torch.Tensor, dict]]:
        r"""``log q_φ(z̄)`` per random guide site at the detached draws ``z̄`` (scaled and
        masked like the site): its gradient is the score :math:`\partial_\phi \log q|_z`."""
        trace = poutine.trace(self._particles(poutine.condition(guide, data=values))).get_trace(
            *args, **kwargs)
        out = []
        for name, value in values.items():
            site = trace.nodes[name]
            if _is_point_estimate(site["fn"]):
                continue
            lq = cache_free_log_prob(site["fn"], value)
            out.append((scale_and_mask(lq, site["scale"], site["mask"]), site))
        return out

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())


class StickingTheLandingELBO(_PathwiseELBO):
    r"""Sticking the landing (Roeder et al. 2017): the gradient of
    :math:`\frac1K\sum_k \log p_\theta(x, z_k) - \log q_{\bar\phi}(z_k)` (score term dropped);
    the loss value is the usual negative ELBO. Zero variance in :math:`\phi` when
    :math:`q = p(z\mid x)`."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            self._check_reparameterized(guide_trace)
            elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            values = self._detached_values(guide_trace)
            score = sum((lq.sum() for lq, _ in self._score_terms(guide, values, args, kwargs)),
                        torch.zeros((), device=elbo.device))
            surrogate = surrogate + elbo + score - score.detach()
        return -surrogate / self.num_particles


class DReGELBO(_PathwiseELBO):
    r"""Doubly-reparameterized gradient of the IWAE bound (Tucker et al. 2018); the loss value is
    :math:`-\log \frac1K \sum_k w_k` with the same per-plate weights as
    ``RenyiELBO(alpha=0)`` (plates shared by all sites, e.g. data points, keep their own
    weights)."""

    def __init__(self, num_particles: int = 5, vectorize_particles: bool = True, **kwargs):
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles,
                         **kwargs)

    def _particle_terms(self, model, guide, model_trace, guide_trace, args, kwargs):
        self._check_reparameterized(guide_trace)
        sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_w = 0.0
        for _, site in model_trace.nodes.items():
            if site["type"] == "sample":
                log_w = log_w + torch_sum(site["log_prob"], sum_dims)
        for _, site in _latent_sites(guide_trace):
            log_w = log_w - torch_sum(site["log_prob"], sum_dims)
        values = self._detached_values(guide_trace)
        score = 0.0
        for lq, _ in self._score_terms(guide, values, args, kwargs):
            score = score + torch_sum(lq, sum_dims)
        fixed = poutine.trace(self._particles(poutine.condition(model, data=values))).get_trace(
            *args, **kwargs)
        fixed.compute_log_prob()
        log_p_fixed = 0.0
        for _, site in fixed.nodes.items():
            if site["type"] == "sample":
                log_p_fixed = log_p_fixed + torch_sum(site["log_prob"], sum_dims)
        path_log_w = log_w + score - score.detach() if torch.is_tensor(score) else log_w
        return log_w, path_log_w, log_p_fixed

    def differentiable_loss(self, model, guide, *args, **kwargs):
        terms = [self._particle_terms(model, guide, mt, gt, args, kwargs)
                 for mt, gt in self._get_traces(model, guide, args, kwargs)]
        if self.vectorize_particles and self.num_particles > 1:
            log_w, path_log_w, log_p_fixed = terms[0]
        else:
            log_w, path_log_w, log_p_fixed = (torch.stack(torch.broadcast_tensors(*t))
                                              for t in zip(*terms))
        log_w, path_log_w, log_p_fixed = torch.broadcast_tensors(log_w, path_log_w, log_p_fixed)
        k = self.num_particles
        log_mean = torch.logsumexp(log_w.detach(), dim=0) - math.log(k)
        weights = torch.softmax(log_w.detach(), dim=0)
        surrogate = (weights**2 * path_log_w + (weights - weights**2) * log_p_fixed).sum()
        bound = log_mean.sum()
        return -(bound + surrogate - surrogate.detach())
