"""Which parameters a run trains: those of the model and guide modules, plus the ``pyro.param``
entries their traces touch (so entries other models left in the param store are neither trained
nor checkpointed)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from pyro_seqlatent.infer.batches import batch_args
from pyro_seqlatent.infer.elbos import has_differentiable_loss


def traced_param_names(model: Callable, guide: Callable, batch: Any) -> set[str]:
    """Names of the ``param`` sites of one guide trace and the model replayed on it; calling
    them also creates lazily built parameters (autoguides, ``pyro.param``). The global RNG is
    left untouched and nothing is recorded by outer handlers."""
    with torch.random.fork_rng(devices=[]), poutine.block():
        args, kwargs = batch_args(batch)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
    return {name for trace in (guide_trace, model_trace)
            for name, site in trace.nodes.items() if site["type"] == "param"}


def modules_among(*objects: object) -> list[nn.Module]:
    """The ``nn.Module``\\ s among ``objects`` (a model or guide may be a plain function whose
    parameters live in Pyro's param store, through ``pyro.module`` / ``pyro.param``)."""
    return [obj for obj in objects if isinstance(obj, nn.Module)]


def state_of(obj: object) -> dict[str, torch.Tensor]:
    """``obj.state_dict()`` for a module, ``{}`` for a function (its parameters are param-store
    entries, checkpointed as such)."""
    return obj.state_dict() if isinstance(obj, nn.Module) else {}


def load_state(obj: object, state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`state_of`."""
    if isinstance(obj, nn.Module):
        obj.load_state_dict(state)
    elif state:
        raise ValueError(f"the checkpoint holds a module state for {obj!r}, which is not an "
                         "nn.Module: load it into the module it was trained as")


def collect_parameters(*modules: object, param_names: set[str] | None = None
                       ) -> list[nn.Parameter]:
    """Unique trainable parameters of ``modules`` plus Pyro's param-store entries (only those
    named in ``param_names`` when given: the ``param`` sites a run's model and guide touch, so
    entries left by other models in the same process are not trained or checkpointed)."""
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    for module in modules_among(*modules):
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for name, p in pyro.get_param_store().named_parameters():
        if param_names is not None and name not in param_names:
            continue
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def extra_store_params(modules: Sequence[object], param_names: set[str] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Param-store entries that are not parameters of ``modules`` (``pyro.param`` in user code,
    and everything a plain-function model or guide registers), restricted to ``param_names``
    when given."""
    module_ids = {id(p) for m in modules_among(*modules) for p in m.parameters()}
    return {
        name: p
        for name, p in pyro.get_param_store().named_parameters()
        if id(p) not in module_ids and (param_names is None or name in param_names)
    }


def flow_caches(*modules: object) -> list[Any]:
    """Submodules with a transform cache (``clear_cache``), cleared after every step."""
    return [m for module in modules_among(*modules) for m in module.modules()
            if hasattr(m, "clear_cache")]


_REGISTRATIONS = itertools.count()


def needs_param_sites(elbo) -> bool:
    """JIT ELBOs pass only ``param`` sites into the compiled function, and ``RenyiELBO``
    back-propagates only when a trace has one: the modules' parameters must appear as sites."""
    return type(elbo).__name__.startswith("Jit") or not has_differentiable_loss(elbo)


def registering(fn: Callable, name: str, module: nn.Module) -> Callable:
    """``fn`` preceded by ``pyro.module(name, module)`` so the parameters are ``param`` sites.

    Model and guide are registered together, once, as one module: networks they share (a VRNN's
    guide and model share theirs) then appear under a single name.
    """

    def wrapped(*args, **kwargs):
        pyro.module(name, module)
        return fn(*args, **kwargs)

    return wrapped


def registration_prefix() -> str:
    """A fresh param-store prefix for one run's :func:`registering`."""
    return f"_seqlatent_train{next(_REGISTRATIONS)}"


def forget_registrations(prefix: str | None) -> None:
    """Remove the param-store entries a run registered under ``prefix``."""
    if prefix is None:
        return
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(prefix)]:
        del store[name]
