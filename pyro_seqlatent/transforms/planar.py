r"""Planar flow (Rezende & Mohamed 2015) with an inverse for any value.

.. math::
    f(z) = z + \hat u\, h(w^\top z + b),\qquad h = \tanh,\qquad
    \hat u = u + \big(m(w^\top u) - w^\top u\big)\frac{w}{\lVert w\rVert^2},\quad
    m(a) = -1 + \operatorname{softplus}(a),

    \log|\det J| = \log|1 + \hat u^\top \psi(z)|,\qquad \psi(z) = h'(w^\top z + b)\, w.

Since ``w^T û = m(w^T u) > −1`` the map is strictly increasing along ``w``. With
``α = w^T z + b`` and ``c = w^T y + b`` the inverse solves the scalar equation
``α + m tanh(α) = c`` (bracketed in ``[c − |m|, c + |m|]``, solved by bisection), then
``z = y − û tanh(α)``. A final Newton step taken *with* gradients makes ``α`` differentiable by
the implicit-function theorem, so ``log_prob`` of a value the flow never sampled has exact
gradients. The log-det is evaluated stably as ``log(tanh²α + (1 − tanh²α)·softplus(w^T u))``
(equal to ``log(1 + h'(α) m)``), finite even when ``w^T u ≪ −1``.
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

BISECTION_STEPS = 64


class ConditionedPlanar(Flow):
    """Planar flow for given parameters ``params_fn() -> (u, w, b)`` of shapes
    ``(..., D)``, ``(..., D)``, ``(..., 1)`` (batched parameters broadcast with the input)."""

    def __init__(self, params_fn: Callable, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.params_fn = params_fn

    def _coefficients(self):
        u, w, b = self.params_fn()
        wu = (w * u).sum(-1, keepdim=True)
        sp = F.softplus(wu)
        w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        u_hat = u + (sp - 1.0 - wu) * w / w_sq
        return u_hat, w, b, sp - 1.0, sp

    @staticmethod
    def _ldj(t, sp):
        t2 = t * t
        return torch.log(t2 + (1.0 - t2) * sp).squeeze(-1)

    def _forward(self, x):
        u_hat, w, b, _, sp = self._coefficients()
        t = torch.tanh((w * x).sum(-1, keepdim=True) + b)
        return x + u_hat * t, self._ldj(t, sp)

    def _inverse_and_ldj(self, y):
        u_hat, w, b, m, sp = self._coefficients()
        c = (w * y).sum(-1, keepdim=True) + b
        with torch.no_grad():
            cd, md = c.detach(), m.detach()
            lo, hi = torch.broadcast_tensors(cd - md.abs(), cd + md.abs())
            lo, hi = lo.clone(), hi.clone()
            for _ in range(BISECTION_STEPS):
                mid = 0.5 * (lo + hi)
                above = mid + md * torch.tanh(mid) > cd
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            alpha0 = 0.5 * (lo + hi)
        # one differentiable Newton step at the root: exact implicit gradients
        t0 = torch.tanh(alpha0)
        g = alpha0 + m * t0 - c
        dg = t0 * t0 + (1.0 - t0 * t0) * sp
        alpha = alpha0 - g / dg
        t = torch.tanh(alpha)
        return y - u_hat * t, self._ldj(t, sp)


class Planar(ConditionedPlanar, TransformModule):
    """Learnable planar flow with parameters ``u``, ``w`` (``(D,)``) and ``b`` (``(1,)``)."""

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(self._params, cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        bound = input_dim ** -0.5
        self.u = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.w = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1).uniform_(-bound, bound))

    def _params(self):
        return self.u, self.w, self.b


class ConditionalPlanar(ConditionalTransformModule):
    """Amortized planar flow: a hypernetwork maps the context to ``(u, w, b)``."""

    def __init__(self, input_dim: int, context_dim: int, hidden_dims=None):
        super().__init__()
        self.input_dim = check_input_dim(input_dim)
        self.context_dim = check_input_dim(context_dim, "context_dim", minimum=1)
        hidden_dims = default_hidden_dims(max(input_dim, context_dim)) if hidden_dims is None \
            else hidden_dims
        self.hypernet = MLP(context_dim, hidden_dims, 2 * input_dim + 1)

    def condition(self, context: torch.Tensor) -> ConditionedPlanar:
        check_context(context, self.context_dim, type(self).__name__)
        out = self.hypernet(context)
        D = self.input_dim
        u, w, b = out[..., :D], out[..., D:2 * D], out[..., 2 * D:]
        return ConditionedPlanar(lambda: (u, w, b))


def planar(input_dim: int) -> Planar:
    """A learnable :class:`Planar` flow on ``R^input_dim``."""
    return Planar(input_dim)


def conditional_planar(input_dim: int, context_dim: int, hidden_dims=None) -> ConditionalPlanar:
    """A :class:`ConditionalPlanar` whose ``(u, w, b)`` come from an MLP of the context."""
    return ConditionalPlanar(input_dim, context_dim, hidden_dims)
