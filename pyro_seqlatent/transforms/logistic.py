r"""The logistic distribution, NICE's prior (Dinh et al. 2014), usable as a flow base.

.. math:: \log p(x) = -\operatorname{softplus}(z) - \operatorname{softplus}(-z) - \log s,
    \qquad z = (x - \mu)/s;\qquad x = \mu + s(\log u - \log(1 - u)),\ u \sim U(0, 1).
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F


class Logistic(TorchDistribution):
    """Logistic(loc, scale), elementwise; ``.to_event(1)`` makes it a vector flow base."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc=0.0, scale=1.0, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Logistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(Logistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        eps = torch.finfo(self.loc.dtype).eps
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(eps, 1 - eps)
        return self.loc + self.scale * (torch.log(u) - torch.log1p(-u))

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        return -F.softplus(z) - F.softplus(-z) - torch.log(self.scale)

    def cdf(self, value):
        return torch.sigmoid((value - self.loc) / self.scale)

    def icdf(self, value):
        return self.loc + self.scale * (torch.log(value) - torch.log1p(-value))

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return self.scale.pow(2) * (torch.pi ** 2 / 3)

    def entropy(self):
        return torch.log(self.scale) + 2.0


def standard_logistic(dim: int, dtype=None, device=None):
    """NICE's factorized standard-logistic prior on ``R^dim`` (event_dim 1)."""
    zeros = torch.zeros(dim, dtype=dtype, device=device)
    return Logistic(zeros, torch.ones_like(zeros)).to_event(1)
