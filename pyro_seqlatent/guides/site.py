r"""Site guides: amortized variational distributions over one named latent, reusable by any model.

A site guide is an ``nn.Module`` that maps a context tensor ``c`` (computed by whatever encoder
the model's guide runs: an MLP of an image, an RNN state ``[φ_x(x_t), h_{t-1}]``, an ODE-RNN's
final state) to a distribution over a latent vector,

.. math:: q_\phi(z \mid c),\qquad z \in \mathbb{R}^{D},

with ``event_dim = 1``. ``site_guide.sample("z", c)`` draws the Pyro sample site ``"z"``; a VAE's
guide calls it once, a VRNN's guide once per time step, a Latent ODE's guide for ``z0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn
from torch.nn import functional as F

from pyro_seqlatent.nn import MLP

# Lower bound on the standard deviation of amortized Gaussians (keeps log q finite).
MIN_SCALE = 1e-4


class SiteGuide(nn.Module):
    """Base class: ``forward(context) -> Distribution`` with event_dim 1 over ``latent_dim``."""

    latent_dim: int
    context_dim: int

    def check_context(self, context: torch.Tensor) -> None:
        if not torch.is_tensor(context):
            raise TypeError(f"context must be a tensor, got {type(context).__name__}")
        # not while torch.jit traces: its first call, untraced, checked the same shapes
        if not torch.jit.is_tracing() and context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has last dimension {context.shape[-1]} but this "
                f"{type(self).__name__} was built with context_dim={self.context_dim}"
            )

    def sample(self, name: str, context: torch.Tensor, mask: torch.Tensor | bool | None = None,
               **sample_kwargs) -> torch.Tensor:
        """``pyro.sample(name, self(context))``: the guide site for latent ``name``.

        :param mask: as :func:`pyro.poutine.mask` for this one site: ``None`` (no mask),
            ``True`` / ``False``, or a boolean tensor broadcasting with the site's batch shape;
            masked-out entries add nothing to ``log q`` (the value is drawn all the same).
        """
        if mask is None:
            return pyro.sample(name, self(context), **sample_kwargs)
        if not isinstance(mask, bool) and not (torch.is_tensor(mask)
                                               and mask.dtype == torch.bool):
            raise TypeError(f"mask must be None, a bool or a boolean tensor, got "
                            f"{type(mask).__name__}"
                            + (f" of dtype {mask.dtype}" if torch.is_tensor(mask) else ""))
        with poutine.mask(mask=mask):
            return pyro.sample(name, self(context), **sample_kwargs)


class MeanFieldGuide(SiteGuide):
    r"""Diagonal Gaussian :math:`q(z\mid c) = \mathcal N(\mu(c), \operatorname{diag}\sigma(c)^2)`
    with :math:`\sigma = \operatorname{softplus}(\cdot) + \sigma_{\min}`.

    :param int context_dim: size of the context vector.
    :param int latent_dim: size of ``z``.
    :param hidden_dims: hidden layers of the network from context to ``(μ, σ)``; an empty tuple
        means a single affine layer.
    """

    def __init__(self, context_dim: int, latent_dim: int, hidden_dims: Sequence[int] = ()):
        super().__init__()
        self.context_dim = int(context_dim)
        self.latent_dim = int(latent_dim)
        self.net = MLP(self.context_dim, hidden_dims, 2 * self.latent_dim)

    def loc_scale(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_context(context)
        loc, raw = self.net(context).chunk(2, dim=-1)
        return loc, F.softplus(raw) + MIN_SCALE

    def forward(self, context: torch.Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(context)
        return dist.Normal(loc, scale).to_event(1)
