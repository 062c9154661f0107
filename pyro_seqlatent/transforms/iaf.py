r"""Inverse autoregressive flow (Kingma et al. 2016) on a MADE network.

A MADE ``(m, s) = \mathrm{MADE}(z[, h])`` is autoregressive in an ordering ``π`` of the
coordinates (output ``i`` sees only inputs ranked before ``i``), optionally fed a context ``h``.

.. math::
    \text{standard:}\quad & z' = m + \sigma \odot z,\qquad \sigma = e^{\tilde s},\
        \tilde s = 5\tanh(s/5), \\
    \text{gated ("LSTM-type"):}\quad & \sigma = \operatorname{sigmoid}(s + b_\sigma),\qquad
        z' = \sigma \odot z + (1 - \sigma) \odot m,

    \log|\det J| = \textstyle\sum_i \log \sigma_i,

the Jacobian being triangular in the ordering ``π``. The inverse is sequential: starting from
``z = 0``, ``D`` passes of ``z ← (z' − m(z))/σ(z)`` (gated: ``(z' − (1 − σ) m)/σ``) make the
coordinates exact one rank at a time (``D`` network calls). Stacks reverse ``π`` between flows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch.nn import functional as F

from pyro_seqlatent.nn import MADE
from pyro_seqlatent.transforms._base import Flow, check_context, check_input_dim, soft_clamp
from pyro_seqlatent.transforms.coupling import default_hidden_dims

SIGMOID_BIAS = 2.0


class ConditionedIAF(Flow):
    """IAF for a given autoregressive network ``made_fn(z) -> (m, s)`` (each ``(..., D)``)."""

    def __init__(self, made_fn: Callable, input_dim: int, gated: bool = False,
                 sigmoid_bias: float = SIGMOID_BIAS, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.made_fn = made_fn
        self.input_dim = input_dim
        self.gated = bool(gated)
        self.sigmoid_bias = float(sigmoid_bias)

    def _coefficients(self, z):
        m, s = self.made_fn(z)
        if self.gated:
            gate = s + self.sigmoid_bias
            return m, torch.sigmoid(gate), F.logsigmoid(gate)
        log_sigma = soft_clamp(s)
        return m, torch.exp(log_sigma), log_sigma

    def _update(self, z, m, sigma):
        if self.gated:
            return sigma * z + (1.0 - sigma) * m
        return m + sigma * z

    def _solve(self, y, m, sigma):
        if self.gated:
            return (y - (1.0 - sigma) * m) / sigma
        return (y - m) / sigma

    def _forward(self, x):
        m, sigma, log_sigma = self._coefficients(x)
        return self._update(x, m, sigma), log_sigma.sum(-1)

    def _inverse_and_ldj(self, y):
        if y.shape[-1] != self.input_dim:
            raise ValueError(f"expected (..., {self.input_dim}), got {tuple(y.shape)}")
        x = torch.zeros_like(y)
        for _ in range(self.input_dim):
            m, sigma, log_sigma = self._coefficients(x)
            x = self._solve(y, m, sigma)
        # the last pass's coefficients depend on every coordinate except the last-ranked one,
        # which no output reads, so they are the coefficients at the exact x.
        return x, log_sigma.sum(-1)


class IAF(ConditionedIAF, TransformModule):
    """Learnable IAF. :param int input_dim: ``D ≥ 2``. :param hidden_dims: MADE hidden sizes.
    :param bool gated: the gated update. :param permutation: MADE ordering (default identity)."""

    def __init__(self, input_dim: int, hidden_dims=None, gated: bool = False, permutation=None,
                 sigmoid_bias: float = SIGMOID_BIAS, cache_size: int = 1):
        check_input_dim(input_dim)
        super().__init__(self._made, input_dim, gated, sigmoid_bias, cache_size=cache_size)
        hidden_dims = default_hidden_dims(input_dim) if hidden_dims is None else hidden_dims
        self.made = MADE(input_dim, hidden_dims, num_params=2, permutation=permutation,
                         zero_last=True)

    def _made(self, z):
        return self.made(z)


class ConditionalIAF(ConditionalTransformModule):
    """IAF whose MADE also reads a context ``h`` (Kingma et al. 2016's encoder output)."""

    def __init__(self, input_dim: int, context_dim: int, hidden_dims=None, gated: bool = False,
                 permutation=None, sigmoid_bias: float = SIGMOID_BIAS):
        super().__init__()
        self.input_dim = check_input_dim(input_dim)
        self.context_dim = check_input_dim(context_dim, "context_dim", minimum=1)
        hidden_dims = default_hidden_dims(input_dim) if hidden_dims is None else hidden_dims
        self.gated = gated
        self.sigmoid_bias = sigmoid_bias
        self.made = MADE(input_dim, hidden_dims, num_params=2, context_dim=context_dim,
                         permutation=permutation, zero_last=True)

    def condition(self, context: torch.Tensor) -> ConditionedIAF:
        check_context(context, self.context_dim, type(self).__name__)
        return ConditionedIAF(lambda z: self.made(z, context), self.input_dim, self.gated,
                              self.sigmoid_bias)


def iaf(input_dim: int, hidden_dims=None, gated: bool = False, permutation=None) -> IAF:
    """A learnable :class:`IAF` (standard update; ``gated=True`` for the LSTM-type update)."""
    return IAF(input_dim, hidden_dims, gated=gated, permutation=permutation)


def conditional_iaf(input_dim: int, context_dim: int, hidden_dims=None, gated: bool = False,
                    permutation=None) -> ConditionalIAF:
    """A :class:`ConditionalIAF` whose MADE reads the context."""
    return ConditionalIAF(input_dim, context_dim, hidden_dims, gated=gated,
                          permutation=permutation)
