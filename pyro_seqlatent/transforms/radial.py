r"""Radial flow (Rezende & Mohamed 2015) with a closed-form inverse.

.. math::
    f(z) = z + \beta\, h(\alpha, r)\,(z - z_0),\quad r = \lVert z - z_0\rVert,\quad
    h = \frac{1}{\alpha + r},\qquad \alpha = \operatorname{softplus}(\alpha'),\quad
    \beta = -\alpha + \operatorname{softplus}(\beta')\ (\ge -\alpha:\ \text{invertible}),

    \log|\det J| = (D-1)\log(1 + \beta h) + \log(1 + \beta h + \beta h' r)
                 = (D-1)\log(1 + \beta h) + \log(1 + \alpha\beta h^2).

Inverse: with ``ρ = ‖y − z_0‖`` the radius solves ``r + βr/(α + r) = ρ``, i.e. the quadratic
``r² + (α + β − ρ) r − αρ = 0`` whose non-negative root is taken in a cancellation-free form;
then ``z = z_0 + (y − z_0)/(1 + β/(α + r))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.nn import functional as F

from pyro_seqlatent.nn import MLP
from pyro_seqlatent.transforms._base import Flow, check_context, check_input_dim
from pyro_seqlatent.transforms.coupling import default_hidden_dims


class ConditionedRadial(Flow):
    """Radial flow for ``params_fn() -> (z0, alpha_raw, beta_raw)`` of shapes
    ``(..., D)``, ``(..., 1)``, ``(..., 1)``."""

    def __init__(self, params_fn: Callable, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.params_fn = params_fn

    def _coefficients(self):
        z0, alpha_raw, beta_raw = self.params_fn()
        alpha = F.softplus(alpha_raw)
        beta = -alpha + F.softplus(beta_raw)
        return z0, alpha, beta

    @staticmethod
    def _ldj(r, alpha, beta, dim):
        h = 1.0 / (alpha + r)
        return ((dim - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h)).squeeze(-1)

    def _forward(self, x):
        z0, alpha, beta = self._coefficients()
        d = x - z0
        r = d.norm(dim=-1, keepdim=True)
        y = x + beta / (alpha + r) * d
        return y, self._ldj(r, alpha, beta, x.shape[-1])

    def _inverse_and_ldj(self, y):
        z0, alpha, beta = self._coefficients()
        d = y - z0
        rho = d.norm(dim=-1, keepdim=True)
        B = alpha + beta - rho
        C = alpha * rho
        disc = torch.sqrt(B * B + 4.0 * C)
        tiny = torch.finfo(y.dtype).tiny
        r_pos = 2.0 * C / (B + disc).clamp_min(tiny)  # accurate when B >= 0
        r_neg = 0.5 * (disc - B)  # accurate when B < 0
        r = torch.where(B >= 0, r_pos, r_neg)
        x = z0 + d / (1.0 + beta / (alpha + r))
        return x, self._ldj(r, alpha, beta, y.shape[-1])


class Radial(ConditionedRadial, TransformModule):
    """Learnable radial flow with parameters ``z0`` (``(D,)``), ``alpha_raw``, ``beta_raw``."""

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(self._params, cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        bound = input_dim ** -0.5
        self.z0 = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.alpha_raw = nn.Parameter(torch.empty(1).uniform_(-bound, bound))
        self.beta_raw = nn.Parameter(torch.empty(1).uniform_(-bound, bound))

    def _params(self):
        return self.z0, self.alpha_raw, self.beta_raw


class ConditionalRadial(ConditionalTransformModule):
    """Amortized radial flow: a hypernetwork maps the context to ``(z0, α', β')``."""

    def __init__(self, input_dim: int, context_dim: int, hidden_dims=None):
        super().__init__()
        self.input_dim = check_input_dim(input_dim)
        self.context_dim = check_input_dim(context_dim, "context_dim", minimum=1)
        hidden_dims = default_hidden_dims(max(input_dim, context_dim)) if hidden_dims is None \
            else hidden_dims
        self.hypernet = MLP(context_dim, hidden_dims, input_dim + 2)

    def condition(self, context: torch.Tensor) -> ConditionedRadial:
        check_context(context, self.context_dim, type(self).__name__)
        out = self.hypernet(context)
        D = self.input_dim
        z0, a, b = out[..., :D], out[..., D:D + 1], out[..., D + 1:]
        return ConditionedRadial(lambda: (z0, a, b))


def radial(input_dim: int) -> Radial:
    """A learnable :class:`Radial` flow on ``R^input_dim``."""
    return Radial(input_dim)


def conditional_radial(input_dim: int, context_dim: int, hidden_dims=None) -> ConditionalRadial:
    """A :class:`ConditionalRadial` whose parameters come from an MLP of the context."""
    return ConditionalRadial(input_dim, context_dim, hidden_dims)
