"""Normalizing flows as Pyro transforms: NICE, RealNVP, planar, radial and IAF; and the
discretised infinitesimal flows (Hamiltonian, annealed Langevin) driven by a target's gradient.

Each flow comes in three layers, as in Pyro: ``ConditionedX`` holds the math for given
parameters, ``X`` (a :class:`~pyro.distributions.torch_transform.TransformModule`) owns learnable
parameters, and ``ConditionalX`` (a
:class:`~pyro.distributions.conditional.ConditionalTransformModule`) produces a ``ConditionedX``
from a context with ``.condition(h)``. Lower-case constructors build them with defaults. Every
flow is invertible for any value (planar and radial included) and caches ``(x, y, log|det J|)``
safely across optimiser steps. This package knows nothing of models.
"""

from pyro_seqlatent.transforms._base import LOG_SCALE_BOUND, Flow, soft_clamp
from pyro_seqlatent.transforms.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineCoupling,
    ConditionedCoupling,
    ConditionedDiagonalScaling,
    DiagonalScaling,
    ImageAffineCoupling,
    conditional_nice,
    conditional_real_nvp,
    image_mask,
    nice,
    real_nvp,
    vector_mask,
)
from pyro_seqlatent.transforms.factory import FLOW_KINDS, conditional_flow_stack, flow_stack
from pyro_seqlatent.transforms.hamiltonian import (
    HamiltonianFlow,
    LangevinFlow,
    leapfrog,
    quadratic_tempering,
)
from pyro_seqlatent.transforms.iaf import IAF, ConditionalIAF, ConditionedIAF, conditional_iaf, iaf
from pyro_seqlatent.transforms.logistic import Logistic, standard_logistic
from pyro_seqlatent.transforms.planar import (
    ConditionalPlanar,
    ConditionedPlanar,
    Planar,
    conditional_planar,
    planar,
)
from pyro_seqlatent.transforms.radial import (
    ConditionalRadial,
    ConditionedRadial,
    Radial,
    conditional_radial,
    radial,
)

__all__ = [
    "FLOW_KINDS",
    "IAF",
    "LOG_SCALE_BOUND",
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineCoupling",
    "ConditionalIAF",
    "ConditionalPlanar",
    "ConditionalRadial",
    "ConditionedCoupling",
    "ConditionedDiagonalScaling",
    "ConditionedIAF",
    "ConditionedPlanar",
    "ConditionedRadial",
    "DiagonalScaling",
    "Flow",
    "HamiltonianFlow",
    "ImageAffineCoupling",
    "LangevinFlow",
    "Logistic",
    "Planar",
    "Radial",
    "conditional_flow_stack",
    "conditional_iaf",
    "conditional_nice",
    "conditional_planar",
    "conditional_radial",
    "conditional_real_nvp",
    "flow_stack",
    "iaf",
    "image_mask",
    "leapfrog",
    "nice",
    "planar",
    "quadratic_tempering",
    "radial",
    "real_nvp",
    "soft_clamp",
    "standard_logistic",
    "vector_mask",
]
