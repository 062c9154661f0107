"""Build a stack of ``K`` flows of one kind, plain or conditional, by name (used by guides)."""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

from pyro_seqlatent.transforms._base import check_input_dim
from pyro_seqlatent.transforms.coupling import (
    conditional_nice,
    conditional_real_nvp,
    nice,
    real_nvp,
)
from pyro_seqlatent.transforms.iaf import conditional_iaf, iaf
from pyro_seqlatent.transforms.planar import conditional_planar, planar
from pyro_seqlatent.transforms.radial import conditional_radial, radial

FLOW_KINDS = ("planar", "radial", "iaf", "iaf_gated", "nice", "real_nvp")


def _check(kind, num_flows):
    if kind not in FLOW_KINDS:
        raise ValueError(f"flow must be one of {FLOW_KINDS}, got {kind!r}")
    if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
        raise ValueError(f"num_flows must be a positive int, got {num_flows!r}")


def _ordering(input_dim, k):
    """IAF orderings alternate between identity and reversed (Kingma et al. 2016)."""
    order = torch.arange(input_dim)
    return order.flip(0) if k % 2 else order


def flow_stack(kind: str, input_dim: int, num_flows: int, hidden_dims=None):
    """``num_flows`` learnable flows of ``kind`` as one :class:`ComposeTransformModule`
    (for ``nice`` / ``real_nvp``, ``num_flows`` is the number of couplings)."""
    _check(kind, num_flows)
    check_input_dim(input_dim)
    if kind == "nice":
        return nice(input_dim, num_flows, hidden_dims)
    if kind == "real_nvp":
        return real_nvp(input_dim, num_flows, hidden_dims)
    if kind == "planar":
        parts = [planar(input_dim) for _ in range(num_flows)]
    elif kind == "radial":
        parts = [radial(input_dim) for _ in range(num_flows)]
    else:
        parts = [iaf(input_dim, hidden_dims, gated=kind == "iaf_gated",
                     permutation=_ordering(input_dim, k)) for k in range(num_flows)]
    return ComposeTransformModule(parts)


def conditional_flow_stack(kind: str, input_dim: int, context_dim: int, num_flows: int,
                           hidden_dims=None) -> ConditionalComposeTransformModule:
    """The conditional version: ``.condition(h)`` gives ``num_flows`` flows conditioned on
    ``h`` (planar/radial parameters from a hypernetwork of ``h``; IAF's MADE and the coupling
    networks read ``h`` as an extra input)."""
    _check(kind, num_flows)
    check_input_dim(input_dim)
    if kind == "nice":
        return conditional_nice(input_dim, context_dim, num_flows, hidden_dims)
    if kind == "real_nvp":
        return conditional_real_nvp(input_dim, context_dim, num_flows, hidden_dims)
    if kind == "planar":
        parts = [conditional_planar(input_dim, context_dim, hidden_dims)
                 for _ in range(num_flows)]
    elif kind == "radial":
        parts = [conditional_radial(input_dim, context_dim, hidden_dims)
                 for _ in range(num_flows)]
    else:
        parts = [conditional_iaf(input_dim, context_dim, hidden_dims, gated=kind == "iaf_gated",
                                 permutation=_ordering(input_dim, k)) for k in range(num_flows)]
    return ConditionalComposeTransformModule(parts, cache_size=1)
