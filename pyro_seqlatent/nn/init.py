"""Weight initialisation schemes a model can ask for by name."""

from __future__ import annotations

import torch
from torch import nn

INITS = ("torch", "normal")


@torch.no_grad()
def init_linear_normal_(*modules: nn.Module, std: float = 0.1) -> int:
    r"""Every ``nn.Linear`` inside ``modules``: :math:`W_{ij} \sim \mathcal N(0, \text{std}^2)`,
    :math:`b = 0` (the Latent ODE reference's ``init_network_weights``, std 0.1, which it applies
    to its ODE functions, encoder update nets, z0 head and decoder). Other layers (e.g. a
    ``GRUCell``) keep their initialisation, and so do flows (``TransformModule``\\ s and their
    conditional versions), which start at the identity on purpose. Returns the number of layers
    changed."""
    from pyro.distributions.conditional import ConditionalTransformModule
    from pyro.distributions.torch_transform import TransformModule

    flows = (TransformModule, ConditionalTransformModule)

    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")
    seen, count = set(), 0

    def visit(m: nn.Module) -> None:
        nonlocal count
        if id(m) in seen or isinstance(m, flows):
            return
        seen.add(id(m))
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            count += 1
        for child in m.children():
            visit(child)

    for root in modules:
        visit(root)
    return count


def apply_init(name: str, *modules: nn.Module) -> None:
    """Initialise ``modules`` by scheme ``name``: ``"torch"`` (leave PyTorch's defaults) or
    ``"normal"`` (:func:`init_linear_normal_`, std 0.1)."""
    if name == "normal":
        init_linear_normal_(*modules)
    elif name != "torch":
        raise ValueError(f"init must be one of {INITS}, got {name!r}")
