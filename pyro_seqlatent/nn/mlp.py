"""A plain multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


class MLP(nn.Module):
    r"""``y = W_L a(... a(W_1 x + b_1) ...) + b_L`` with activation ``a`` between layers.

    :param int input_dim: size of the last dimension of the input.
    :param hidden_dims: sizes of the hidden layers (may be empty: a single affine map).
    :param int output_dim: size of the output.
    :param str activation: one of ``relu, tanh, elu, softplus, leaky_relu, gelu``.
    :param bool zero_last: initialise the last layer to zero (flows start at the identity).

    Works on inputs of any batch shape ``(..., input_dim)``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        activation: str = "relu",
        zero_last: bool = False,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}"
            )
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        dims = [int(input_dim), *[int(h) for h in hidden_dims], int(output_dim)]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        self.input_dim = dims[0]
        self.output_dim = dims[-1]
        if zero_last:
            last = self.net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
