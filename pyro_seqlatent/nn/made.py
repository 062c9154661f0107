r"""MADE: a masked autoencoder whose outputs are autoregressive in its inputs (Germain et al. 2015).

With an ordering ``π`` of the ``D`` inputs (``rank[i]`` = position of input ``i`` in it), every
hidden unit gets a degree ``m ∈ {0, …, D−2}`` and the masks are

.. math::
    M^{(1)}_{k,i} = [\,m_k \ge \mathrm{rank}_i\,],\quad
    M^{(\ell)}_{k,j} = [\,m_k \ge m_j\,],\quad
    M^{\mathrm{out}}_{i,k} = [\,\mathrm{rank}_i > m_k\,],

so output ``i`` (of each parameter group) depends only on inputs ``j`` with
``rank_j < rank_i``: the Jacobian of every output group is strictly triangular in the ordering
``π``. An optional context vector ``h`` (an encoder's output, Kingma et al. 2016) feeds every
hidden unit of the first layer without a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MaskedLinear(nn.Linear):
    """``y = (W ⊙ M) x + b`` with a fixed binary mask ``M`` (a buffer, follows ``.to()``)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        if mask.shape != (out_features, in_features):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, expected {(out_features, in_features)}"
            )
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoregressive network ``x[, h] -> (param_1(x), …, param_P(x))``, each ``(..., D)``.

    :param int input_dim: ``D`` (≥ 2).
    :param hidden_dims: hidden layer sizes (each ≥ D − 1 so every degree is represented).
    :param int num_params: number of output groups ``P`` (e.g. 2 for shift and log-scale).
    :param int context_dim: size of an unmasked context input (0: none).
    :param permutation: the ordering ``π`` as a sequence of the ``D`` input indices
        (default: ``0, 1, …, D−1``).
    :param bool zero_last: initialise the output layer to zero.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        num_params: int = 2,
        context_dim: int = 0,
        permutation: Sequence[int] | torch.Tensor | None = None,
        activation: type[nn.Module] = nn.ReLU,
        zero_last: bool = False,
    ):
        super().__init__()
        if int(input_dim) < 2:
            raise ValueError(f"MADE needs input_dim >= 2, got {input_dim}")
        hidden_dims = [int(h) for h in hidden_dims]
        if not hidden_dims:
            raise ValueError("MADE needs at least one hidden layer (hidden_dims is empty)")
        if min(hidden_dims) < input_dim - 1:
            raise ValueError(
                f"hidden_dims={hidden_dims}: every hidden layer needs >= input_dim - 1 = "
                f"{input_dim - 1} units, otherwise some outputs lose all their inputs"
            )
        self.input_dim = D = int(input_dim)
        self.num_params = int(num_params)
        self.context_dim = int(context_dim)
        if permutation is None:
            permutation = torch.arange(D)
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        if sorted(permutation.tolist()) != list(range(D)):
            raise ValueError(
                f"permutation must be a reordering of 0..{D - 1}, got {permutation.tolist()}"
            )
        rank = torch.empty(D, dtype=torch.long)
        rank[permutation] = torch.arange(D)
        self.register_buffer("permutation", permutation)
        self.register_buffer("rank", rank)

        degrees = [rank]
        layers = []
        for h in hidden_dims:
            deg = torch.arange(h) % (D - 1)
            mask = (deg[:, None] >= degrees[-1][None, :]).float()
            layers.append(MaskedLinear(degrees[-1].numel(), h, mask))
            degrees.append(deg)
        self.hidden = nn.ModuleList(layers)
        out_mask = (rank[:, None] > degrees[-1][None, :]).float().repeat(self.num_params, 1)
        self.out = MaskedLinear(hidden_dims[-1], D * self.num_params, out_mask)
        self.context_layer = (
            nn.Linear(self.context_dim, hidden_dims[0], bias=False) if self.context_dim else None
        )
        self.activation = activation()
        if zero_last:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        if not torch.jit.is_tracing() and x.shape[-1] != self.input_dim:  # see check_context
            raise ValueError(f"MADE expects inputs (..., {self.input_dim}), got {tuple(x.shape)}")
        h = self.hidden[0](x)
        if self.context_layer is not None:
            if context is None:
                raise ValueError("this MADE was built with context_dim > 0: pass a context")
            h = h + self.context_layer(context)
        elif context is not None:
            raise ValueError("this MADE has no context input (context_dim=0) but got a context")
        h = self.activation(h)
        for layer in self.hidden[1:]:
            h = self.activation(layer(h))
        out = self.out(h)
        return tuple(out.unflatten(-1, (self.num_params, self.input_dim)).unbind(-2))
