"""Function-evaluation counts of any model/guide pair, for the metrics of training and evaluation.

A *counter* is any submodule with a ``reset_nfe()`` method and an ``nfe`` dict
``{"nfe_forward": int, "nfe_backward": int}``, as the ODE vector fields of
:mod:`pyro_seqlatent.nn.ode` (:class:`~pyro_seqlatent.nn.ode.CountingField`). This module knows
no particular model: a pair without counters gets no NFE entries.
"""

from __future__ import annotations

from typing import Any

from torch import nn

KEYS = ("nfe_forward", "nfe_backward")


def nfe_counters(model: Any, guide: Any) -> dict[str, list[nn.Module]]:
    """The counters of the model and of the guide, ``{"model": [...], "guide": [...]}`` (owners
    without any are left out; a counter the two share counts once, for the model)."""
    seen: set[int] = set()
    out: dict[str, list[nn.Module]] = {}
    for name, owner in (("model", model), ("guide", guide)):
        found = []
        for module in owner.modules() if isinstance(owner, nn.Module) else ():
            if (id(module) not in seen and callable(getattr(module, "reset_nfe", None))
                    and hasattr(module, "nfe")):
                seen.add(id(module))
                found.append(module)
        if found:
            out[name] = found
    return out


def reset_counters(counters: dict[str, list[nn.Module]]) -> None:
    for found in counters.values():
        for counter in found:
            counter.reset_nfe()


def nfe_record(counters: dict[str, list[nn.Module]]) -> dict[str, int]:
    """The counts since the last reset, summed per owner: ``{"model_nfe_forward": ...,
    "model_nfe_backward": ..., "guide_nfe_forward": ..., "guide_nfe_backward": ...}``."""
    return {f"{name}_{key}": int(sum(counter.nfe[key] for counter in found))
            for name, found in counters.items() for key in KEYS}
