"""Function-evaluation counts of any model/guide pair, for the metrics of training and evaluation.

A *counter* is any submodule with a ``reset_nfe()`` method and an ``nfe`` dict
``{"nfe_forward": int, "nfe_backward": int}``, as the ODE vector fields of
:mod:`pyro_seqlatent.nn.ode` (:class:`~pyro_seqlatent.nn.ode.CountingField`). This module knows
no particular model: a pair without counters gets no NFE entries. A module whose ``nfe`` is
anything else (say an ``int``, as in torchdiffeq's examples) is not a counter.
"""

from __future__ import annotations

from collections.abc import Mapping
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
                    and _is_count(getattr(module, "nfe", None))):
                seen.add(id(module))
                found.append(module)
        if found:
            out[name] = found
    return out


def _is_count(nfe: Any) -> bool:
    """An ``nfe`` of our form; other conventions (an ``int`` attribute, as in torchdiffeq's
    examples) are not counters here and are left alone."""
    return isinstance(nfe, Mapping) and all(key in nfe for key in KEYS)


def reset_counters(counters: dict[str, list[nn.Module]]) -> None:
    for found in counters.values():
        for counter in found:
            counter.reset_nfe()


def nfe_record(counters: dict[str, list[nn.Module]]) -> dict[str, int]:
    """The counts since the last reset, summed per owner: ``{"model_nfe_forward": ...,
    "model_nfe_backward": ..., "guide_nfe_forward": ..., "guide_nfe_backward": ...}``."""
    return {f"{name}_{key}": int(sum(counter.nfe[key] for counter in found))
            for name, found in counters.items() for key in KEYS}
