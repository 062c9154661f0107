r"""Tractable latent-variable models with exact marginals and posteriors.

They are the yardsticks of the project: an ELBO must stay below their exact log-likelihood,
``log_marginal`` must converge to it, a trained guide must reach their exact posterior, and an
estimator's mean gradient must match the closed-form gradient.

* :class:`NormalNormal`: :math:`z_n \sim \mathcal N(0, s_0^2)`,
  :math:`x_n \mid z_n \sim \mathcal N(z_n, \sigma^2)`; so
  :math:`p(x_n) = \mathcal N(0, s_0^2 + \sigma^2)` and
  :math:`p(z_n \mid x_n) = \mathcal N\bigl(\tfrac{s_0^2}{s_0^2+\sigma^2} x_n,
  \tfrac{s_0^2\sigma^2}{s_0^2+\sigma^2}\bigr)`.
* :class:`LinearGaussian` (probabilistic PCA / a linear VAE): :math:`z_n \sim \mathcal N(0, I_d)`,
  :math:`x_n \mid z_n \sim \mathcal N(W z_n + \mu, \psi I_D)`; so
  :math:`p(x_n) = \mathcal N(\mu, W W^\top + \psi I)` and with :math:`M = W^\top W + \psi I`,
  :math:`p(z_n \mid x_n) = \mathcal N(M^{-1} W^\top (x_n - \mu), \psi M^{-1})`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


class NormalNormal(nn.Module):
    """The scalar conjugate model; ``x`` has shape ``(B,)``. ``learn_noise`` makes σ a
    parameter (``log_noise``)."""

    def __init__(self, prior_scale: float = 1.0, noise: float = 0.5, learn_noise: bool = False):
        super().__init__()
        self.prior_scale = float(prior_scale)
        log_noise = torch.tensor(float(noise)).log()
        if learn_noise:
            self.log_noise = nn.Parameter(log_noise)
        else:
            self.register_buffer("log_noise", log_noise)

    @property
    def noise(self) -> torch.Tensor:
        return self.log_noise.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), self.prior_scale))
            pyro.sample("x", dist.Normal(z, self.noise), obs=x)
        return z

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        var = self.prior_scale**2 + self.noise**2
        return dist.Normal(torch.zeros_like(x), var.sqrt()).log_prob(x)

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of ``z`` given each ``x``."""
        s2, n2 = self.prior_scale**2, self.noise**2
        return s2 / (s2 + n2) * x, (s2 * n2 / (s2 + n2)).sqrt().expand_as(x)


class AffineNormalGuide(nn.Module):
    r"""Amortized :math:`q(z_n\mid x_n) = \mathcal N(a x_n + b, e^{2 \log s})`; it contains the
    exact posterior of :class:`NormalNormal`."""

    def __init__(self, a: float = 0.0, b: float = 0.0, log_scale: float = 0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("z", dist.Normal(self.a * x + self.b, self.log_scale.exp()))

    @classmethod
    def exact_for(cls, model: NormalNormal) -> AffineNormalGuide:
        s2, n2 = model.prior_scale**2, float(model.noise) ** 2
        a = s2 / (s2 + n2)
        return cls(a=a, b=0.0, log_scale=0.5 * torch.tensor(s2 * n2 / (s2 + n2)).log().item())


class LinearGaussian(nn.Module):
    """Linear-Gaussian latent model; ``x`` has shape ``(B, D)``."""

    def __init__(self, weight: torch.Tensor, loc: torch.Tensor, noise_var: float):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight))  # (D, d)
        self.register_buffer("loc", torch.as_tensor(loc))  # (D,)
        self.noise_var = float(noise_var)

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> None:
        d = self.latent_dim
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(d), x.new_ones(d)).to_event(1)
            )
            mean = z @ self.weight.T + self.loc
            pyro.sample("x", dist.Normal(mean, self.noise_var**0.5).to_event(1), obs=x)

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        D = self.weight.shape[0]
        cov = self.weight @ self.weight.T + self.noise_var * torch.eye(D, dtype=x.dtype)
        return dist.MultivariateNormal(self.loc, cov).log_prob(x)

    def exact_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means ``(B, d)`` and the shared covariance ``(d, d)``."""
        d = self.latent_dim
        M = self.weight.T @ self.weight + self.noise_var * torch.eye(d, dtype=x.dtype)
        Minv = torch.linalg.inv(M)
        means = (x - self.loc) @ self.weight @ Minv.T
        return means, self.noise_var * Minv


class LinearGaussianGuide(nn.Module):
    r"""Amortized full-covariance guide :math:`q(z\mid x) = \mathcal N(A(x-\mu) + c, LL^\top)`."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(latent_dim, data_dim))
        self.c = nn.Parameter(torch.zeros(latent_dim))
        self.raw_tril = nn.Parameter(torch.zeros(latent_dim, latent_dim))

    @property
    def scale_tril(self) -> torch.Tensor:
        lower = torch.tril(self.raw_tril, -1)
        return lower + torch.diag(F.softplus(self.raw_tril.diagonal()) + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[-2]):
            loc = x @ self.A.T + self.c
            return pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=self.scale_tril))

    def set_exact(self, model: LinearGaussian) -> LinearGaussianGuide:
        """Set the parameters to the exact posterior of ``model``; returns ``self``."""
        d = model.latent_dim
        W, mu = model.weight, model.loc
        Minv = torch.linalg.inv(W.T @ W + model.noise_var * torch.eye(d, dtype=W.dtype))
        chol = torch.linalg.cholesky(model.noise_var * Minv)
        with torch.no_grad():
            self.A.copy_(Minv @ W.T)
            self.c.copy_(-(Minv @ W.T) @ mu)
            diag = chol.diagonal() - 1e-5
            raw = torch.tril(chol, -1) + torch.diag(diag + torch.log(-torch.expm1(-diag)))
            self.raw_tril.copy_(raw)
        return self
