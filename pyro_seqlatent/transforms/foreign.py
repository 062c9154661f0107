r"""The ``flow=`` argument of every guide and density: our flows by name, Pyro's neural spline
flow, any Pyro transform module, a factory, or a `zuko <https://zuko.readthedocs.io>`_ flow.

:func:`build_flow` (unconditional, for :class:`~pyro_seqlatent.guides.AutoFlow` and the density
flows) and :func:`build_conditional_flow` (context-conditioned, for
:class:`~pyro_seqlatent.guides.FlowGuide` and :class:`~pyro_seqlatent.guides.AutoAmortized`)
accept

* a name of :data:`FLOW_NAMES`: one of our kinds (:data:`~pyro_seqlatent.transforms.FLOW_KINDS`,
  ``num_flows`` of them) or ``"spline"``, ``num_flows`` of Pyro's monotone rational-quadratic
  neural spline autoregressive flows (Durkan et al. 2019;
  :func:`pyro.distributions.transforms.spline_autoregressive` and
  :func:`~pyro.distributions.transforms.conditional_spline_autoregressive`, linear order, 8 bins
  on ``[-3, 3]``, identity outside) with alternating orderings;
* a Pyro :class:`~pyro.distributions.TransformModule` (or any torch ``Transform``) instance, or
  for the conditional case a :class:`~pyro.distributions.ConditionalTransformModule` instance;
* a zuko flow instance (``zuko.flows.NSF(features=D)``, ``MAF``, ``NCSF``, ``CNF``, ...;
  ``context=C`` features for the conditional case); it brings its own base distribution and
  the guides use it through Pyro's adapter :class:`pyro.contrib.zuko.ZukoToPyro`. zuko is an
  optional dependency (``pip install pyro_seqlatent[zuko]``);
* a factory: any other callable, called once as ``factory(input_dim)`` (conditional:
  ``factory(input_dim, context_dim)``) and returning one of the above, e.g.
  :func:`pyro.distributions.transforms.spline_coupling`, ``zuko.flows.NSF`` or
  ``functools.partial(pyro.distributions.transforms.iterated, 3,
  pyro.distributions.transforms.spline_autoregressive)``. ``num_flows`` and ``hidden_dims``
  apply to names only.

Flows without an inverse (Pyro's ``Planar``, ``Radial``, ``Sylvester``) train by the
reparameterized ELBO but cannot score a value they did not sample; the score-function, STL and
DReG estimators refuse them (:mod:`pyro_seqlatent.infer.estimators_sites`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransform,
)
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import (
    ConditionalSplineAutoregressive,
    SplineAutoregressive,
)
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch.distributions import Transform

from pyro_seqlatent.transforms._base import check_input_dim
from pyro_seqlatent.transforms.factory import FLOW_KINDS, conditional_flow_stack, flow_stack

#: the names ``flow=`` accepts: our kinds and Pyro's neural spline flow
FLOW_NAMES = (*FLOW_KINDS, "spline")

_ACCEPTS = ("a name of {names}, a Pyro {module} instance, a zuko flow, or a factory callable "
            "returning one of these")


def is_zuko_flow(obj: Any) -> bool:
    """Whether ``obj`` is a zuko lazy distribution (a flow called as ``flow(context)``); never
    imports zuko."""
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("zuko") and cls.__name__ == "LazyDistribution":
            return True
    return False


def _check_num_flows(num_flows):
    if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
        raise ValueError(f"num_flows must be a positive int, got {num_flows!r}")


def _spline_stack(input_dim, num_flows, hidden_dims, context_dim=None):
    """Pyro's spline autoregressive flows (its helpers' defaults: linear order, 8 bins, bound
    3, hidden ``[10 D, 10 D]``) with orderings alternating identity / reversed, as our IAF."""
    _check_num_flows(num_flows)
    check_input_dim(input_dim)
    hidden = [10 * input_dim] * 2 if hidden_dims is None else list(hidden_dims)
    bins = 8
    param_dims = [bins, bins, bins - 1, bins]
    parts = []
    for k in range(num_flows):
        order = torch.arange(input_dim)
        order = order.flip(0) if k % 2 else order
        if context_dim is None:
            arn = AutoRegressiveNN(input_dim, hidden, param_dims=param_dims, permutation=order)
            parts.append(SplineAutoregressive(input_dim, arn, count_bins=bins))
        else:
            arn = ConditionalAutoRegressiveNN(input_dim, context_dim, hidden,
                                              param_dims=param_dims, permutation=order)
            parts.append(ConditionalSplineAutoregressive(input_dim, arn, count_bins=bins))
    if context_dim is None:
        return ComposeTransformModule(parts)
    return ConditionalComposeTransformModule(parts, cache_size=1)


def _describe(flow: Any) -> str:
    text = repr(flow) if isinstance(flow, str) else type(flow).__name__
    return text if len(text) < 80 else text[:77] + "..."


def build_flow(flow: Any, input_dim: int, num_flows: int = 2,
               hidden_dims: Sequence[int] | None = None):
    """An unconditional flow on vectors of size ``input_dim``: a Pyro transform module, or a
    zuko flow (see the module docstring for what ``flow`` may be).

    :raises ValueError: an unknown name, ``num_flows`` not a positive int.
    :raises TypeError: an object that is none of the accepted kinds (a conditional module
        included).
    """
    if isinstance(flow, str):
        if flow == "spline":
            return _spline_stack(input_dim, num_flows, hidden_dims)
        if flow not in FLOW_KINDS:
            raise ValueError(f"flow must be one of {FLOW_NAMES} (or a Pyro TransformModule, a "
                             f"zuko flow, a factory), got {flow!r}")
        return flow_stack(flow, input_dim, num_flows, hidden_dims)
    if is_zuko_flow(flow) or (isinstance(flow, Transform)):
        return flow
    if isinstance(flow, ConditionalTransform):
        raise TypeError(f"flow={_describe(flow)} is conditional (it needs a context); an "
                        "unconditional flow is needed here: pass a TransformModule")
    if callable(flow) and not isinstance(flow, torch.nn.Module):
        built = flow(input_dim)
        if isinstance(built, str) or callable(built) and not (
                is_zuko_flow(built) or isinstance(built, Transform)):
            raise TypeError(f"flow={_describe(flow)}: the factory returned "
                            f"{_describe(built)}, expected a TransformModule or a zuko flow")
        return build_flow(built, input_dim)
    raise TypeError(f"flow={_describe(flow)} is not a flow: pass "
                    + _ACCEPTS.format(names=FLOW_NAMES, module="TransformModule"))


def build_conditional_flow(flow: Any, input_dim: int, context_dim: int, num_flows: int = 2,
                           hidden_dims: Sequence[int] | None = None):
    """A flow on vectors of size ``input_dim`` conditioned on a context of size
    ``context_dim``: a Pyro :class:`~pyro.distributions.ConditionalTransformModule` (use
    ``.condition(c)``) or a zuko flow (``flow(c)`` is the distribution).

    :raises ValueError: an unknown name, ``num_flows`` not a positive int.
    :raises TypeError: an object that is none of the accepted kinds (an unconditional module
        included).
    """
    if isinstance(flow, str):
        if flow == "spline":
            return _spline_stack(input_dim, num_flows, hidden_dims, context_dim)
        if flow not in FLOW_KINDS:
            raise ValueError(f"flow must be one of {FLOW_NAMES} (or a Pyro "
                             "ConditionalTransformModule, a zuko flow, a factory), got "
                             f"{flow!r}")
        return conditional_flow_stack(flow, input_dim, context_dim, num_flows, hidden_dims)
    if is_zuko_flow(flow) or isinstance(flow, ConditionalTransform):
        return flow
    if isinstance(flow, Transform):
        raise TypeError(f"flow={_describe(flow)} is not conditional: a guide of a context needs "
                        "a ConditionalTransformModule (e.g. "
                        "pyro.distributions.transforms.conditional_spline_autoregressive) or a "
                        "zuko flow built with context=C")
    if callable(flow) and not isinstance(flow, torch.nn.Module):
        built = flow(input_dim, context_dim)
        if isinstance(built, str) or callable(built) and not (
                is_zuko_flow(built) or isinstance(built, (Transform, ConditionalTransform))):
            raise TypeError(f"flow={_describe(flow)}: the factory returned "
                            f"{_describe(built)}, expected a ConditionalTransformModule or a "
                            "zuko flow")
        return build_conditional_flow(built, input_dim, context_dim)
    raise TypeError(f"flow={_describe(flow)} is not a flow: pass "
                    + _ACCEPTS.format(names=FLOW_NAMES, module="ConditionalTransformModule"))


def flow_name(flow: Any) -> str:
    """A short label of a ``flow=`` argument: the name itself, else the class name."""
    if isinstance(flow, str):
        return flow
    return getattr(flow, "__name__", type(flow).__name__)
