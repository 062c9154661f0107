"""The ELBOs the trainer accepts, by name or as instances."""

from __future__ import annotations

import numbers
from typing import Any

import pyro.infer
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.trace_elbo import _compute_log_r

from pyro_seqlatent.infer.estimators_registry import ESTIMATORS, make_estimator

#: Names accepted by :func:`make_elbo` (and by ``--elbo`` on the command line).
ELBOS = (
    "Trace_ELBO",
    "TraceMeanField_ELBO",
    "TraceGraph_ELBO",
    "RenyiELBO",
    "TraceEnum_ELBO",
    "JitTrace_ELBO",
    "JitTraceMeanField_ELBO",
    "JitTraceGraph_ELBO",
    "JitTraceEnum_ELBO",
    "DeviceTrace_ELBO",
)


def lab_estimators() -> tuple[str, ...]:
    """The estimator lab's names (:data:`pyro_seqlatent.infer.estimators.ESTIMATORS`) that are
    not Pyro ELBO names: ``train`` and ``--elbo`` accept them too (``vimco``,
    ``reinforce_loo``, ``score_nn_baseline``, ...)."""
    return tuple(name for name in ESTIMATORS if name not in ELBOS)


def check_elbo_name(elbo: Any) -> None:
    """A ``ValueError`` naming both lists unless ``elbo`` is an ELBO instance or a known name."""
    if isinstance(elbo, pyro.infer.ELBO):
        return
    if not isinstance(elbo, str) or (elbo not in ELBOS and elbo not in lab_estimators()):
        raise ValueError(f"elbo={elbo!r} is not one of {list(ELBOS)}, nor an estimator of the "
                         f"lab {list(lab_estimators())}, nor a pyro.infer.ELBO")


def make_elbo(elbo: str | pyro.infer.ELBO = "Trace_ELBO", **kwargs: Any) -> pyro.infer.ELBO:
    """An ELBO instance from a name in :data:`ELBOS` (``kwargs`` go to its constructor) or of
    the estimator lab (``make_estimator(name, num_particles)``; ``num_particles`` is its only
    keyword), or ``elbo`` itself when it already is one."""
    if isinstance(elbo, pyro.infer.ELBO):
        if kwargs:
            raise ValueError(
                f"elbo_kwargs {sorted(kwargs)} given together with an ELBO instance; "
                "pass them to the instance's constructor instead"
            )
        return elbo
    check_elbo_name(elbo)
    if elbo not in ELBOS:
        extra = sorted(set(kwargs) - {"num_particles"})
        if extra:
            raise ValueError(f"elbo={elbo!r} takes only num_particles in elbo_kwargs, got "
                             f"{extra}")
        return make_estimator(elbo, kwargs.get("num_particles"))
    if elbo == "DeviceTrace_ELBO":
        return DeviceTrace_ELBO(**kwargs)
    return getattr(pyro.infer, elbo)(**kwargs)


def has_differentiable_loss(elbo: pyro.infer.ELBO) -> bool:
    """Whether ``elbo`` gives a differentiable surrogate loss (TraceGraph/Renyi do not)."""
    return callable(getattr(elbo, "differentiable_loss", None))


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class DeviceTrace_ELBO(pyro.infer.Trace_ELBO):
    r"""Pyro's :class:`~pyro.infer.Trace_ELBO`, with its estimator and gradients, summed on the
    tensors' device.

    ``Trace_ELBO.differentiable_loss`` reads every sample site's log-density sum back to the host
    (``torch_item``) to build the reported loss, and once more at the end: on a GPU each read
    waits for the device (a VRNN with T = 100 steps makes about 200 of them per SVI step). This
    subclass keeps that sum as a detached tensor:

    .. math::

        \text{loss} = -\Big[\sum_{\text{model sites}} \log p
        - \sum_{\text{guide sites}} \log q\Big]_{\text{detached}}
        + (\text{surrogate} - \text{surrogate}_{\text{detached}}),

    whose value is the ELBO estimate and whose gradient is the surrogate's (reparameterized sites
    through the entropy term, the others through Pyro's score-function term with the same
    ``log_r`` Rao-Blackwellization as ``Trace_ELBO``). It makes no NaN check of its own (Pyro's
    ``warn_if_nan`` is a host read too): :func:`~pyro_seqlatent.infer.train` checks the loss once
    per step. ``loss`` is Pyro's (a float); the inherited ``loss_and_grads`` sums through this
    class and returns a 0-dim tensor, which ``SVI.step`` reads as Pyro's float. The value is
    summed in the tensors' dtype (float32 as a rule), not in Python floats: only the reported
    value can differ from Pyro's in the last digits, never the gradients.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo, surrogate, log_r = 0.0, 0.0, None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + _detach(site["log_prob_sum"])
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            elbo = elbo - _detach(site["log_prob_sum"])
            _, score_function, entropy = site["score_parts"]
            if not is_identically_zero(entropy):
                surrogate = surrogate - entropy.sum()
            if not is_identically_zero(score_function):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                surrogate = surrogate + (log_r.sum_to(site["cond_indep_stack"])
                                         * score_function).sum()
        return -elbo, -surrogate

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            particle_loss, particle_surrogate = self._differentiable_loss_particle(
                model_trace, guide_trace)
            loss = loss + particle_loss / self.num_particles
            surrogate = surrogate + particle_surrogate / self.num_particles
        if isinstance(surrogate, numbers.Number):  # no sample site at all
            return torch.as_tensor(float(loss))
        return loss + (surrogate - surrogate.detach())
