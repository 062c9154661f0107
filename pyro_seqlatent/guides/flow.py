r"""Flow site guides: an amortized Gaussian pushed through ``K`` context-conditioned flows.

.. math::
    z_0 \sim \mathcal N(\mu(c), \operatorname{diag}\sigma(c)^2),\qquad
    z_K = f_K^{c} \circ \dots \circ f_1^{c}(z_0),\qquad
    \log q(z_K \mid c) = \log \mathcal N(z_0) - \sum_{k=1}^{K} \log\Bigl|\det
        \frac{\partial f_k^{c}}{\partial z_{k-1}}\Bigr|.

The flows read the context ``c`` as in their papers: planar / radial parameters are produced
from ``c`` by a hypernetwork (Rezende & Mohamed 2015), IAF's MADE takes ``c`` as its extra
input ``h`` (Kingma et al. 2016), and NICE / RealNVP coupling networks see ``[x_A, c]``.
Every flow has an exact inverse, so ``log_prob`` works on any value, not only on samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.contrib.zuko import ZukoToPyro
from torch.nn import functional as F

from pyro_seqlatent.guides.site import MIN_SCALE, SiteGuide
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.transforms.foreign import build_conditional_flow, flow_name, is_zuko_flow


class FlowGuide(SiteGuide):
    """``q(z | c)``: a diagonal Gaussian of ``c`` followed by ``num_flows`` conditional flows.

    :param int context_dim: size of the context ``c``.
    :param int latent_dim: size of ``z`` (≥ 2).
    :param flow: one of ``"planar"``, ``"radial"``, ``"iaf"``, ``"iaf_gated"``, ``"nice"``,
        ``"real_nvp"``, ``"spline"`` (Pyro's conditional neural spline flow), or a Pyro
        ``ConditionalTransformModule``, a zuko flow built with ``context=context_dim``, or a
        factory ``f(latent_dim, context_dim)`` (see :mod:`pyro_seqlatent.transforms.foreign`).
        A zuko flow is the whole of ``q(z | c)`` (its own base distribution, through
        :class:`pyro.contrib.zuko.ZukoToPyro`); the others follow the Gaussian base.
    :param int num_flows: ``K`` (couplings for NICE / RealNVP).
    :param hidden_dims: hidden layers of the network ``c -> (μ, σ)``.
    :param flow_hidden_dims: hidden layers of the flows' networks (default: none, i.e. linear
        hypernetworks, for planar / radial as in Rezende & Mohamed 2015; the flows' own defaults
        for IAF / NICE / RealNVP).
    """

    def __init__(
        self,
        context_dim: int,
        latent_dim: int,
        flow: str = "planar",
        num_flows: int = 4,
        hidden_dims: Sequence[int] = (),
        flow_hidden_dims: Sequence[int] | None = None,
    ):
        super().__init__()
        self.context_dim = int(context_dim)
        self.latent_dim = int(latent_dim)
        self.flow = flow_name(flow)
        self.num_flows = num_flows
        if flow_hidden_dims is None and isinstance(flow, str) and flow in ("planar", "radial"):
            # Rezende & Mohamed amortize planar/radial parameters as a linear function of the
            # encoder's output; a deep hypernetwork per flow costs ~10x the step time at K = 10.
            flow_hidden_dims = ()
        self.base_net = MLP(self.context_dim, hidden_dims, 2 * self.latent_dim)
        self.flows = build_conditional_flow(
            flow, self.latent_dim, self.context_dim, num_flows, flow_hidden_dims
        )
        self.is_zuko = is_zuko_flow(self.flows)
        if self.is_zuko:  # zuko's flow brings its own base distribution
            del self.base_net

    def base(self, context: torch.Tensor) -> dist.Distribution:
        """The Gaussian ``N(μ(c), diag σ(c)²)`` before the flows (not for a zuko flow, whose
        base is its own)."""
        self.check_context(context)
        if self.is_zuko:
            raise TypeError("this FlowGuide's flow is a zuko flow: it has its own base "
                            "distribution; use guide(context) for q(z | c)")
        loc, raw = self.base_net(context).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + MIN_SCALE).to_event(1)

    def transform(self, context: torch.Tensor):
        """The composed flows ``f_K^c ∘ … ∘ f_1^c`` as one transform (not for a zuko flow)."""
        if self.is_zuko:
            raise TypeError("this FlowGuide's flow is a zuko flow: its transform is zuko's; "
                            "use guide(context) for q(z | c)")
        return self.flows.condition(context)

    def forward(self, context: torch.Tensor) -> dist.Distribution:
        if self.is_zuko:
            self.check_context(context)
            return ZukoToPyro(self.flows(context))
        return dist.TransformedDistribution(self.base(context), [self.transform(context)])
