"""The ELBOs the trainer accepts, by name or as instances."""

from __future__ import annotations

from typing import Any

import pyro.infer

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
)


def make_elbo(elbo: str | pyro.infer.ELBO = "Trace_ELBO", **kwargs: Any) -> pyro.infer.ELBO:
    """An ELBO instance from a name in :data:`ELBOS` (``kwargs`` go to its constructor), or
    ``elbo`` itself when it already is one."""
    if isinstance(elbo, pyro.infer.ELBO):
        if kwargs:
            raise ValueError(
                f"elbo_kwargs {sorted(kwargs)} given together with an ELBO instance; "
                "pass them to the instance's constructor instead"
            )
        return elbo
    if not isinstance(elbo, str) or elbo not in ELBOS:
        raise ValueError(f"elbo={elbo!r} is not one of {list(ELBOS)} nor a pyro.infer.ELBO")
    return getattr(pyro.infer, elbo)(**kwargs)


def has_differentiable_loss(elbo: pyro.infer.ELBO) -> bool:
    """Whether ``elbo`` gives a differentiable surrogate loss (TraceGraph/Renyi do not)."""
    return callable(getattr(elbo, "differentiable_loss", None))
