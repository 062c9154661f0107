r"""Pyro versions of the EM models of :mod:`pyro_seqlatent.em`, to be trained by SVI.

* :class:`GMMTwin` - :math:`k_n \sim \mathrm{Cat}(\pi)`, :math:`x_n \sim \mathcal N(\mu_k,
  \Sigma_k)` with the assignment enumerated (``TraceEnum_ELBO``); its guide is empty, so the
  ELBO *is* the exact log-likelihood and SVI is gradient ascent on it.
* :class:`PPCATwin` + :class:`PPCAGuide` - the linear-Gaussian VAE :math:`z\sim\mathcal N(0, I)`,
  :math:`x \mid z \sim \mathcal N(Wz + \mu, \sigma^2 I)` with the amortised linear guide
  :math:`q(z\mid x) = \mathcal N(Vx + b, LL^\top)`, a family that contains the exact posterior.
* :class:`LGSSMTwin` + :class:`LGSSMGuide` - the linear-Gaussian state-space model under
  ``pyro.markov`` with the structured guide :math:`q(z_t\mid z_{t-1}, x_t) = \mathcal N(F z_{t-1}
  + G x_t + b, L L^\top)`.

Each twin has ``to_em()``: the same parameters in the EM class, whose exact ``score`` gives the
log-likelihood of an SVI-trained model.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_seqlatent.em import PPCA, GaussianMixture, LinearGaussianSSM


def tril_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Lower-triangular factor with a positive diagonal: strict lower part of ``raw`` plus
    :math:`\\exp` of its diagonal."""
    return torch.tril(raw, -1) + torch.diag_embed(torch.diagonal(raw, dim1=-2, dim2=-1).exp())


def raw_from_tril(L: torch.Tensor) -> torch.Tensor:
    return torch.tril(L, -1) + torch.diag_embed(torch.diagonal(L, dim1=-2, dim2=-1).log())


class EmptyGuide(nn.Module):
    """The guide of a model whose only latent variables are enumerated."""

    def forward(self, *args, **kwargs) -> None:
        return None


class GMMTwin(PyroModule):
    """Gaussian mixture with full covariances and enumerated assignments.

    :param init_means: (K, D) initial means (e.g. data rows); covariances start at ``init_scale``
        squared times the identity.
    """

    def __init__(self, init_means: torch.Tensor, init_scale: float = 1.0):
        super().__init__()
        K, D = init_means.shape
        self.logits = nn.Parameter(torch.zeros(K))
        self.locs = nn.Parameter(init_means.clone().float())
        raw = torch.eye(D).expand(K, D, D).clone() * 0.0
        raw.diagonal(dim1=-2, dim2=-1).fill_(float(torch.log(torch.tensor(init_scale))))
        self.raw_scale_tril = nn.Parameter(raw)

    def forward(self, x: torch.Tensor) -> None:
        scale_tril = tril_from_raw(self.raw_scale_tril)
        with pyro.plate("data", x.shape[-2]):
            k = pyro.sample("assignment", dist.Categorical(logits=self.logits),
                            infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.MultivariateNormal(self.locs[k], scale_tril=scale_tril[k]),
                        obs=x)

    def to_em(self) -> GaussianMixture:
        g = GaussianMixture(self.locs.shape[0], covariance_type="full")
        with torch.no_grad():
            g.weights_ = torch.softmax(self.logits.double(), 0)
            g.means_ = self.locs.double().clone()
            g.shift_ = torch.zeros_like(g.means_[0])
            L = tril_from_raw(self.raw_scale_tril.double())
            g._set_covariances(L @ L.transpose(-1, -2))
        return g


class PPCATwin(PyroModule):
    """The PPCA generative model (a VAE with a linear decoder and isotropic noise)."""

    def __init__(self, data_dim: int, latent_dim: int, init_mean: torch.Tensor | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.W = nn.Parameter(0.1 * torch.randn(data_dim, latent_dim))
        self.mu = nn.Parameter(torch.zeros(data_dim) if init_mean is None
                               else init_mean.clone().float())
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> None:
        q = self.latent_dim
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(q), 1.0).to_event(1))
            loc = z @ self.W.T + self.mu
            pyro.sample("obs", dist.Normal(loc, self.log_sigma.exp()).to_event(1), obs=x)

    def to_em(self) -> PPCA:
        p = PPCA(self.latent_dim)
        with torch.no_grad():
            p.components_ = self.W.double().clone()
            p.mean_ = self.mu.double().clone()
            p.noise_variance_ = (2 * self.log_sigma.double()).exp()
        return p


class PPCAGuide(PyroModule):
    """:math:`q(z\\mid x) = \\mathcal N(Vx + b, LL^\\top)` (contains the exact PPCA posterior)."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.encoder = nn.Linear(data_dim, latent_dim)
        nn.init.zeros_(self.encoder.weight)
        self.raw_scale_tril = nn.Parameter(torch.zeros(latent_dim, latent_dim))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.MultivariateNormal(
                self.encoder(x), scale_tril=tril_from_raw(self.raw_scale_tril)))


class LGSSMTwin(PyroModule):
    """Linear-Gaussian state-space model over padded batches ``x`` (B, T, D), ``mask`` (B, T)."""

    def __init__(self, data_dim: int, state_dim: int, init_d: torch.Tensor | None = None):
        super().__init__()
        K, D = state_dim, data_dim
        self.state_dim = K
        self.A = nn.Parameter(0.9 * torch.eye(K))
        self.raw_Q = nn.Parameter(torch.diag_embed(torch.full((K,), -1.0)))
        self.C = nn.Parameter(0.3 * torch.randn(D, K))
        self.d = nn.Parameter(torch.zeros(D) if init_d is None else init_d.clone().float())
        self.raw_R = nn.Parameter(torch.zeros(D, D))
        self.mu0 = nn.Parameter(torch.zeros(K))
        self.raw_V0 = nn.Parameter(torch.zeros(K, K))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        T = x.shape[-2]
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        Lq, Lr, Lv = (tril_from_raw(r) for r in (self.raw_Q, self.raw_R, self.raw_V0))
        with pyro.plate("data", x.shape[-3]):
            z = None
            for t in pyro.markov(range(T)):
                if z is None:
                    z = pyro.sample(f"z_{t}", dist.MultivariateNormal(self.mu0, scale_tril=Lv))
                else:
                    z = pyro.sample(f"z_{t}", dist.MultivariateNormal(z @ self.A.T,
                                                                      scale_tril=Lq))
                pyro.sample(f"x_{t}", dist.MultivariateNormal(z @ self.C.T + self.d,
                                                              scale_tril=Lr).mask(mask[..., t]),
                            obs=x[..., t, :])

    def to_em(self) -> LinearGaussianSSM:
        m = LinearGaussianSSM(self.state_dim)
        with torch.no_grad():
            cov = {k: (lambda L: L @ L.T)(tril_from_raw(getattr(self, f"raw_{k}").double()))
                   for k in ("Q", "R", "V0")}
            m.set_params(A=self.A.double(), C=self.C.double(), d=self.d.double(),
                         mu0=self.mu0.double(), **cov)
        return m


class LGSSMGuide(PyroModule):
    """:math:`q(z_t \\mid z_{t-1}, x_t) = \\mathcal N(F z_{t-1} + G x_t + b, LL^\\top)`."""

    def __init__(self, data_dim: int, state_dim: int):
        super().__init__()
        self.F = nn.Parameter(torch.zeros(state_dim, state_dim))
        self.G = nn.Linear(data_dim, state_dim)
        nn.init.zeros_(self.G.weight)
        self.raw_L = nn.Parameter(torch.zeros(state_dim, state_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        T = x.shape[-2]
        L = tril_from_raw(self.raw_L)
        with pyro.plate("data", x.shape[-3]):
            z = None
            for t in pyro.markov(range(T)):
                loc = self.G(x[..., t, :])
                if z is not None:
                    loc = loc + z @ self.F.T
                z = pyro.sample(f"z_{t}", dist.MultivariateNormal(loc, scale_tril=L))
