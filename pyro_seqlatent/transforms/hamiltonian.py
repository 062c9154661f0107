r"""Infinitesimal flows, discretised: the Hamiltonian flow and the annealed Langevin flow.

Both move a latent :math:`z \in \mathbb R^D` with the gradient of a log target
:math:`\log\pi(z)` that the caller passes as a function ``grad_log_target(z) -> ∇_z log π(z)``
(for a guide, :math:`\log\pi(z) = \log p(x, z)`, see :mod:`pyro_seqlatent.guides.hamiltonian`).
This module knows no model: the target is a callable.

**Hamiltonian flow** (Caterini, Doucet & Sejdinovic 2018, the Hamiltonian VAE). On the pair
:math:`(z, \rho)` with :math:`H(z, \rho) = -\log\pi(z) + \tfrac12\rho^\top\rho` (mass
:math:`M = I`), start from :math:`\rho_0 = \gamma/\sqrt{\beta_0}`, :math:`\gamma \sim
\mathcal N(0, I)`, and make :math:`K` leapfrog steps with step sizes
:math:`\varepsilon_k \in \mathbb R^D_{>0}`, each followed by a tempering of the momentum:

.. math::
    \tilde\rho = \rho_{k-1} + \tfrac{\varepsilon_k}{2}\odot\nabla\log\pi(z_{k-1}),\quad
    z_k = z_{k-1} + \varepsilon_k\odot\tilde\rho,\quad
    \rho'_k = \tilde\rho + \tfrac{\varepsilon_k}{2}\odot\nabla\log\pi(z_k),\quad
    \rho_k = \sqrt{\beta_{k-1}/\beta_k}\,\rho'_k .

Each leapfrog half-step is a shear (its Jacobian is triangular with unit diagonal), so the
leapfrog map is volume preserving; the tempering scales :math:`D` coordinates and has
:math:`\log|\det| = \tfrac D2\log(\beta_{k-1}/\beta_k)`. The schedule is HVAE's quadratic one,
:math:`1/\sqrt{\beta_k} = (1 - 1/\sqrt{\beta_0})\,k^2/K^2 + 1/\sqrt{\beta_0}` (so
:math:`\beta_K = 1`), with :math:`\beta_0 \in (0, 1)` learned; ``tempering=False`` keeps
:math:`\beta_k = 1`. With :math:`q_0` the density of :math:`z_0`, the flow's density on the
pair and the augmented ELBO are

.. math::
    \log \bar q_K(z_K, \rho_K) = \log q_0(z_0) + \log\mathcal N(\rho_0; 0, \beta_0^{-1}I)
        - \sum_{k=1}^K \tfrac D2 \log\frac{\beta_{k-1}}{\beta_k},\qquad
    \mathcal L = \mathbb E\bigl[\log p(x, z_K) + \log\mathcal N(\rho_K; 0, I)
        - \log\bar q_K(z_K, \rho_K)\bigr] \le \log p(x),

so :meth:`HamiltonianFlow.forward` returns :math:`z_K` and the correction
:math:`\delta = \log\bar q_K - \log q_0(z_0) - \log\mathcal N(\rho_K; 0, I)`, and a guide uses
:math:`\log\tilde q(z_K) = \log q_0(z_0) + \delta`. The density is exact (no reverse kernel).

**Annealed Langevin flow** (unadjusted Langevin kernels with their time reversals as the
auxiliary reverse model: Wu, Köhler & Noé 2020; Thin et al. 2021). The Langevin SDE
:math:`dz = \nabla\log\pi\,dt + \sqrt2\,d\xi` discretised with step :math:`\varepsilon_k`
(Euler–Maruyama) is the kernel
:math:`F_k(z_k\mid z_{k-1}) = \mathcal N(z_{k-1} + \varepsilon_k\odot\nabla\log\pi_k(z_{k-1}),
2\varepsilon_k)`, aimed at the intermediate targets
:math:`\log\pi_k = (1 - b_k)\log q_0 + b_k\log\pi`, :math:`0 < b_1 < \dots < b_K = 1`
(learned). Its path density is not that of :math:`z_K` alone, so the reverse path is scored by
:math:`B_k(z_{k-1}\mid z_k) = \mathcal N(z_k + \varepsilon_k\odot\nabla\log\pi_k(z_k),
2\varepsilon_k)` and

.. math::
    \mathcal L = \mathbb E\Bigl[\log p(x, z_K) - \log q_0(z_0)
        - \sum_{k=1}^K \bigl(\log F_k(z_k\mid z_{k-1}) - \log B_k(z_{k-1}\mid z_k)\bigr)\Bigr]
    \le \log p(x),

a valid bound for any :math:`\varepsilon, b` (the extended-space argument of Salimans, Kingma &
Welling 2015 with :math:`B_k` as reverse model). :meth:`LangevinFlow.forward` returns
:math:`z_K` and :math:`\delta = \sum_k (\log F_k - \log B_k)`. Bias and variance: the single
sample estimate is unbiased for :math:`\mathcal L`, but :math:`\mathcal L` lies below the ELBO
of the marginal :math:`q_K(z_K)` by :math:`\mathbb E\,\mathrm{KL}(q(z_{0:K-1}\mid z_K)\,\|\,
\prod_k B_k)`, which vanishes only as :math:`\varepsilon_k \to 0` with :math:`K \to \infty`
(annealed importance sampling's limit); the estimate carries the :math:`K` injected noises, so
its variance grows with :math:`K`. Without annealing (:math:`b_k = 1`) the reverse kernels
nearly cancel the forward ones and the bound is no better than the base's; the annealing is
what gains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["HamiltonianFlow", "LangevinFlow", "leapfrog", "quadratic_tempering"]

GradFn = Callable[[torch.Tensor], torch.Tensor]


def _check_steps(steps, latent_dim, step_size) -> None:
    for name, value in (("steps", steps), ("latent_dim", latent_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")


def leapfrog(z: torch.Tensor, rho: torch.Tensor, grad_log_target: GradFn,
             step_size: torch.Tensor, grad_z: torch.Tensor | None = None):
    r"""One leapfrog step for :math:`H(z, \rho) = -\log\pi(z) + \frac12\rho^\top\rho`:
    :math:`\tilde\rho = \rho + \frac\varepsilon2\odot\nabla\log\pi(z)`,
    :math:`z' = z + \varepsilon\odot\tilde\rho`,
    :math:`\rho' = \tilde\rho + \frac\varepsilon2\odot\nabla\log\pi(z')` (unit Jacobian
    determinant; reversible: the step from :math:`(z', -\rho')` returns :math:`(z, -\rho)`).

    :param step_size: :math:`\varepsilon`, broadcasting with ``z`` (a scalar or one per
        coordinate).
    :param grad_z: :math:`\nabla\log\pi(z)` if already known (saves one gradient).
    :returns: ``(z', ρ', ∇log π(z'))``.
    """
    if grad_z is None:
        grad_z = grad_log_target(z)
    rho = rho + 0.5 * step_size * grad_z
    z = z + step_size * rho
    grad_new = grad_log_target(z)
    return z, rho + 0.5 * step_size * grad_new, grad_new


def quadratic_tempering(beta0: torch.Tensor, steps: int) -> torch.Tensor:
    r"""HVAE's schedule :math:`\beta_0, \dots, \beta_K` with
    :math:`1/\sqrt{\beta_k} = (1 - 1/\sqrt{\beta_0})\,k^2/K^2 + 1/\sqrt{\beta_0}`
    (:math:`\beta_K = 1`)."""
    k = torch.arange(steps + 1, dtype=beta0.dtype, device=beta0.device)
    inv_sqrt0 = beta0.rsqrt()
    return ((1 - inv_sqrt0) * k ** 2 / steps ** 2 + inv_sqrt0) ** -2


def _std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """``log N(x; 0, I)`` summed over the last dimension."""
    return -0.5 * (x ** 2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


class HamiltonianFlow(nn.Module):
    """``K`` tempered leapfrog steps with learned step sizes (module docstring).

    :param int latent_dim: ``D``.
    :param int steps: ``K`` leapfrog steps (``K + 1`` gradients of ``log π``).
    :param float step_size: initial ``ε`` (every step and coordinate; learned, one per step and
        coordinate).
    :param bool tempering: learn ``β_0`` and temper the momentum (HVAE); ``False``: ``β_k = 1``.
    :param float init_beta0: initial ``β_0`` in (0, 1).
    """

    def __init__(self, latent_dim: int, steps: int = 4, step_size: float = 0.02,
                 tempering: bool = True, init_beta0: float = 0.5):
        super().__init__()
        _check_steps(steps, latent_dim, step_size)
        if tempering and not 0 < init_beta0 < 1:
            raise ValueError(f"init_beta0 must lie in (0, 1), got {init_beta0!r}")
        self.latent_dim, self.steps, self.tempering = latent_dim, steps, bool(tempering)
        self.log_step_size = nn.Parameter(torch.full((steps, latent_dim), math.log(step_size)))
        if self.tempering:
            self.beta0_logit = nn.Parameter(torch.tensor(math.log(init_beta0 / (1 - init_beta0))))

    def step_sizes(self) -> torch.Tensor:
        """``ε``, shape ``(K, D)``."""
        return self.log_step_size.exp()

    def betas(self) -> torch.Tensor:
        """``β_0 … β_K`` (all ones without tempering)."""
        if not self.tempering:
            return self.log_step_size.new_ones(self.steps + 1)
        return quadratic_tempering(torch.sigmoid(self.beta0_logit), self.steps)

    def transform(self, z: torch.Tensor, rho: torch.Tensor, grad_log_target: GradFn):
        """The map ``(z_0, ρ_0) -> (z_K, ρ_K)`` and its ``log|det|``
        ``Σ_k (D/2) log(β_{k-1}/β_k)`` (shape: the batch shape of ``z``)."""
        eps, betas = self.step_sizes().to(z), self.betas().to(z)
        grad = None
        for k in range(self.steps):
            z, rho, grad = leapfrog(z, rho, grad_log_target, eps[k], grad)
            rho = rho * (betas[k] / betas[k + 1]).sqrt()
        log_det = 0.5 * self.latent_dim * (betas[:-1].log() - betas[1:].log()).sum()
        return z, rho, log_det.expand(z.shape[:-1])

    def forward(self, z0: torch.Tensor, grad_log_target: GradFn,
                gamma: torch.Tensor | None = None):
        """``(z_K, δ)`` with ``δ = log N(ρ_0; 0, β_0⁻¹ I) - log|det| - log N(ρ_K; 0, I)`` and
        ``ρ_0 = γ / √β_0``, ``γ ~ N(0, I)`` (drawn unless given)."""
        if z0.shape[-1] != self.latent_dim:
            raise ValueError(f"z has last dimension {z0.shape[-1]} but this HamiltonianFlow was "
                             f"built with latent_dim={self.latent_dim}")
        if gamma is None:
            gamma = torch.randn_like(z0)
        beta0 = self.betas()[0].to(z0)
        rho0 = gamma / beta0.sqrt()
        log_rho0 = _std_normal_log_prob(gamma) + 0.5 * self.latent_dim * beta0.log()
        z, rho, log_det = self.transform(z0, rho0, grad_log_target)
        return z, log_rho0 - log_det - _std_normal_log_prob(rho)


class LangevinFlow(nn.Module):
    """``K`` annealed unadjusted Langevin steps scored by their reverse kernels (module
    docstring).

    :param int latent_dim: ``D``.
    :param int steps: ``K`` (``K + 1`` gradients of ``log π`` and of ``log q_0``).
    :param float step_size: initial ``ε`` (learned, one per step and coordinate).
    :param bool anneal: learn the schedule ``b_1 < … < b_K = 1`` (initially ``b_k = k/K``);
        ``False``: ``b_k = 1`` (no gain over the base, kept for comparison).
    """

    def __init__(self, latent_dim: int, steps: int = 4, step_size: float = 0.01,
                 anneal: bool = True):
        super().__init__()
        _check_steps(steps, latent_dim, step_size)
        self.latent_dim, self.steps, self.anneal = latent_dim, steps, bool(anneal)
        self.log_step_size = nn.Parameter(torch.full((steps, latent_dim), math.log(step_size)))
        if self.anneal:
            self.schedule_logits = nn.Parameter(torch.zeros(steps))

    def step_sizes(self) -> torch.Tensor:
        return self.log_step_size.exp()

    def schedule(self) -> torch.Tensor:
        """``b_1 … b_K`` (the cumulative sum of a softmax: increasing, ``b_K = 1``)."""
        if not self.anneal:
            return self.log_step_size.new_ones(self.steps)
        return torch.cumsum(F.softmax(self.schedule_logits, 0), 0)

    def forward(self, z0: torch.Tensor, grad_log_target: GradFn, grad_log_base: GradFn,
                noise: torch.Tensor | None = None):
        """``(z_K, δ)`` with ``δ = Σ_k log F_k(z_k | z_{k-1}) - log B_k(z_{k-1} | z_k)``.

        :param grad_log_base: ``∇ log q_0`` (not called when ``anneal=False``).
        :param noise: the ``ξ_k``, shape ``(K,) + z0.shape`` (drawn unless given).
        """
        if z0.shape[-1] != self.latent_dim:
            raise ValueError(f"z has last dimension {z0.shape[-1]} but this LangevinFlow was "
                             f"built with latent_dim={self.latent_dim}")
        if noise is None:
            noise = torch.randn((self.steps,) + z0.shape, dtype=z0.dtype, device=z0.device)
        eps, b = self.step_sizes().to(z0), self.schedule().to(z0)

        def grads(z):
            return grad_log_target(z), (grad_log_base(z) if self.anneal else None)

        def drift(k, g):
            return g[0] if g[1] is None else b[k] * g[0] + (1 - b[k]) * g[1]

        z, g = z0, grads(z0)
        delta = z0.new_zeros(z0.shape[:-1])
        for k in range(self.steps):
            z_new = z + eps[k] * drift(k, g) + (2 * eps[k]).sqrt() * noise[k]
            g_new = grads(z_new)
            back = z - z_new - eps[k] * drift(k, g_new)
            # log F - log B: the Gaussians' normalisers (same variance 2ε) cancel
            delta = delta - 0.5 * (noise[k] ** 2).sum(-1) + (back ** 2 / (4 * eps[k])).sum(-1)
            z, g = z_new, g_new
        return z, delta
