r"""Probabilistic PCA fitted by exact EM (Tipping & Bishop, 1999), missing values allowed.

The model is the linear-Gaussian VAE :math:`z \sim \mathcal N(0, I_q)`,
:math:`x \mid z \sim \mathcal N(W z + \mu, \sigma^2 I_D)`, so
:math:`x \sim \mathcal N(\mu, C)` with :math:`C = W W^\top + \sigma^2 I`.

Missing entries (NaN) are integrated out. For row :math:`n` with observed set :math:`O` and
:math:`e = x_O - \mu_O`, with :math:`M = \sigma^2 I + W_O^\top W_O`:

* **E-step** (exact posterior): :math:`q(z) = \mathcal N(\bar z, \sigma^2 M^{-1})`,
  :math:`\bar z = M^{-1} W_O^\top e`; with :math:`\tilde z = (z, 1)` the statistics per feature
  :math:`d` summed over the rows that observe it are :math:`b_d = \sum x_{nd}\,\mathbb E\tilde z`,
  :math:`A_d = \sum \mathbb E[\tilde z\tilde z^\top]`, :math:`s_d = \sum x_{nd}^2` and the count
  :math:`N_d`.
* **M-step** (closed form, joint in :math:`(W, \mu)`): :math:`(w_d, \mu_d) = b_d^\top A_d^{-1}`,
  then :math:`\sigma^2 = \sum_d (s_d - 2\tilde w_d^\top b_d + \tilde w_d^\top A_d \tilde w_d)
  / \sum_d N_d` with :math:`\tilde w_d = (w_d, \mu_d)`.
* **Log-likelihood** (Woodbury): :math:`\log p(x_O) = -\tfrac12\bigl(|O|\log 2\pi
  + (|O| - q)\log\sigma^2 + \log|M| + (\lVert e\rVert^2 - e^\top W_O M^{-1} W_O^\top e)/\sigma^2
  \bigr)`.

Without missing values the fixed point is Tipping & Bishop's closed form
(:meth:`PPCA.fit_closed_form`):
:math:`W = U_q(\Lambda_q - \sigma^2 I)^{1/2}`, :math:`\sigma^2` = the mean of the :math:`D-q`
smallest eigenvalues of the (ddof = 0) sample covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from pyro_seqlatent.em._data import ChunkSource, as_tensor, resolve_device, resolve_dtype
from pyro_seqlatent.em._loop import run_em, seeded_generator, sum_statistics


@dataclass
class PPCAStatistics:
    """Per-feature sums over the rows observing each feature (see the module docstring)."""

    cross: torch.Tensor  # b: (D, q + 1)
    second: torch.Tensor  # A: (D, q + 1, q + 1)
    sq: torch.Tensor  # s: (D,)
    count: torch.Tensor  # N_d: (D,)
    log_likelihood: torch.Tensor  # scalar
    rows: torch.Tensor  # scalar: number of rows

    def __add__(self, other: PPCAStatistics) -> PPCAStatistics:
        return PPCAStatistics(*(a + b for a, b in zip(self.tensors(), other.tensors())))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


class PPCA:
    """Probabilistic PCA by EM; NaN entries of ``X`` are treated as missing at random.

    :param n_components: latent dimension q (< number of features).
    :param tol: stop when the mean log-likelihood per sample improves by less than ``tol``.
    :param max_iter: maximum number of EM iterations.
    :param init: ``"random"`` (Gaussian W) or ``"pca"`` (principal directions of the
        mean-imputed data, scaled by one half so that EM still has work to do).
    :param chunk_size: rows per E-step chunk (``None``: all rows at once).
    :param random_state, dtype, device, progress: as in :class:`GaussianMixture`.

    Fitted attributes: ``components_`` W (D, q), ``mean_`` (D,), ``noise_variance_``,
    ``log_likelihood_history_``, ``n_iter_``, ``converged_``.
    """

    def __init__(self, n_components: int, *, tol: float = 1e-6, max_iter: int = 1000,
                 init: str = "random", chunk_size: int | None = None,
                 random_state: int | None = None, dtype: torch.dtype | None = torch.float64,
                 device: Any = None, progress: bool = False):
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        if init not in ("random", "pca"):
            raise ValueError(f"init must be 'random' or 'pca', got {init!r}")
        if not (tol >= 0) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"need tol >= 0 and a positive int max_iter, got {tol!r}, "
                             f"{max_iter!r}")
        self.n_components, self.tol, self.max_iter, self.init = n_components, tol, max_iter, init
        self.chunk_size, self.random_state = chunk_size, random_state
        self.dtype, self.device, self.progress = dtype, device, progress

    # ----------------------------------------------------------------------------- fitting
    def fit(self, X: Any, y: Any = None) -> PPCA:
        """EM on ``X`` (N, D) with NaN for missing entries; records the log-likelihood per
        iteration (of the parameters entering it) in ``log_likelihood_history_``."""
        source = self._source(X)
        self._initialize(source)
        run_em(self, lambda: self.accumulate_statistics(source),
               lambda stats: stats.rows, "PPCA EM")
        return self

    def fit_closed_form(self, X: Any) -> PPCA:
        """Tipping & Bishop's maximum-likelihood solution (complete data only)."""
        X = self._tensor(X)
        N, D = X.shape
        q = self._check_q(D)
        self.mean_ = X.mean(0)
        Xc = X - self.mean_
        evals, evecs = torch.linalg.eigh(Xc.T @ Xc / N)
        evals, evecs = evals.flip(0), evecs.flip(1)
        self.noise_variance_ = evals[q:].mean()
        scale = (evals[:q] - self.noise_variance_).clamp_min(0).sqrt()
        self.components_ = evecs[:, :q] * scale
        return self

    def accumulate_statistics(self, X: Any) -> PPCAStatistics:
        """The E-step over all chunks of ``X``: the sum of :meth:`sufficient_statistics`."""
        source = X if isinstance(X, ChunkSource) else self._source(X)
        return sum_statistics(source, self.sufficient_statistics)

    def sufficient_statistics(self, X_chunk: torch.Tensor) -> PPCAStatistics:
        """E-step on one chunk (N, D) (NaN = missing) under the current parameters."""
        obs, e, z_mean, post_cov, loglik = self._posterior(X_chunk)
        N, q = z_mean.shape
        ez = torch.cat([z_mean, torch.ones(N, 1, dtype=e.dtype, device=e.device)], 1)
        ezz = ez[:, :, None] * ez[:, None, :]
        ezz[:, :q, :q] += post_cov
        x0 = torch.where(obs, X_chunk.nan_to_num(0.0), 0.0)
        m = obs.to(e.dtype)
        return PPCAStatistics(
            cross=x0.T @ ez,
            second=(m.T @ ezz.reshape(ezz.shape[0], -1)).reshape(-1, q + 1, q + 1),
            sq=(x0 * x0).sum(0),
            count=m.sum(0),
            log_likelihood=loglik.sum(),
            rows=torch.tensor(float(N), dtype=e.dtype, device=e.device),
        )

    def m_step(self, stats: PPCAStatistics) -> None:
        """Closed-form joint update of (W, mu) per feature, then sigma^2 (module docstring)."""
        if bool((stats.count == 0).any()):
            bad = torch.nonzero(stats.count == 0).flatten().tolist()
            raise ValueError(f"feature(s) {bad} have no observed value; drop those columns")
        wt = torch.linalg.solve(stats.second, stats.cross.unsqueeze(-1)).squeeze(-1)  # (D, q+1)
        resid = (stats.sq - 2 * (wt * stats.cross).sum(1)
                 + torch.einsum("di,dij,dj->d", wt, stats.second, wt))
        self.components_ = wt[:, :-1].contiguous()
        self.mean_ = wt[:, -1].contiguous()
        self.noise_variance_ = (resid.sum() / stats.count.sum()).clamp_min(
            torch.finfo(wt.dtype).tiny)

    # ----------------------------------------------------------------------------- inference
    def score_samples(self, X: Any) -> torch.Tensor:
        r""":math:`\log p(x_{n,O})` of the observed entries of every row, shape (N,)."""
        return self._posterior(self._tensor(X))[-1]

    def score(self, X: Any, y: Any = None) -> float:
        return float(self.score_samples(X).mean())

    def transform(self, X: Any) -> torch.Tensor:
        """Posterior means :math:`\\mathbb E[z \\mid x_O]`, shape (N, q)."""
        return self._posterior(self._tensor(X))[2]

    def impute(self, X: Any) -> torch.Tensor:
        """``X`` with every NaN replaced by :math:`\\mathbb E[x_d \\mid x_O] = w_d^\\top\\bar z
        + \\mu_d`."""
        X = self._tensor(X)
        recon = self.transform(X) @ self.components_.T + self.mean_
        return torch.where(torch.isnan(X), recon, X)

    def covariance(self) -> torch.Tensor:
        """The marginal covariance :math:`W W^\\top + \\sigma^2 I`."""
        W = self.components_
        return W @ W.T + self.noise_variance_ * torch.eye(W.shape[0], dtype=W.dtype,
                                                          device=W.device)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        W = self.components_
        z = torch.randn(n_samples, W.shape[1], dtype=W.dtype, device=W.device,
                        generator=generator)
        eps = torch.randn(n_samples, W.shape[0], dtype=W.dtype, device=W.device,
                          generator=generator)
        return z @ W.T + self.mean_ + self.noise_variance_.sqrt() * eps

    # ----------------------------------------------------------------------------- internals
    def _posterior(self, X: torch.Tensor):
        if not hasattr(self, "components_"):
            raise RuntimeError("this PPCA is not fitted yet: call fit(X) first")
        W, s2 = self.components_, self.noise_variance_
        D, q = W.shape
        if X.dim() != 2 or X.shape[1] != D:
            raise ValueError(f"X must have shape (n, {D}), got {tuple(X.shape)}")
        obs = ~torch.isnan(X)
        e = torch.where(obs, X - self.mean_, 0.0)
        eye = torch.eye(q, dtype=W.dtype, device=W.device)
        if bool(obs.all()):
            M = (s2 * eye + W.T @ W).unsqueeze(0)
        else:
            ww = (W[:, :, None] * W[:, None, :]).reshape(D, q * q)
            M = s2 * eye + (obs.to(W.dtype) @ ww).reshape(-1, q, q)
        chol = torch.linalg.cholesky(M)
        b = e @ W  # W_O^T e
        z_mean = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
        post_cov = s2 * torch.cholesky_inverse(chol)
        n_obs = obs.sum(1).to(W.dtype)
        log_det = (n_obs - q) * s2.log() + 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        quad = ((e * e).sum(1) - (b * z_mean).sum(1)) / s2
        loglik = -0.5 * (n_obs * math.log(2 * math.pi) + log_det + quad)
        return obs, e, z_mean, post_cov.expand(X.shape[0], q, q), loglik

    def _check_q(self, D: int) -> int:
        if self.n_components >= D:
            raise ValueError(f"n_components={self.n_components} must be < the number of "
                             f"features ({D})")
        return self.n_components

    def _tensor(self, X: Any) -> torch.Tensor:
        if hasattr(self, "components_"):
            dt, dev = self.components_.dtype, self.components_.device
            dev = resolve_device(self.device, X) if self.device is None else dev
        else:
            dt, dev = resolve_dtype(self.dtype, X), resolve_device(self.device, X)
        return as_tensor(X, name="X", dtype=dt, device=dev, allow_nan=True)

    def _source(self, X: Any) -> ChunkSource:
        return ChunkSource(X, chunk_size=self.chunk_size, dtype=resolve_dtype(self.dtype, X),
                           device=resolve_device(self.device, X), allow_nan=True)

    def _initialize(self, source: ChunkSource) -> None:
        head = source.head(100_000)
        N, D = head.shape
        q = self._check_q(D)
        if N < 2:
            raise ValueError(f"PPCA needs at least 2 rows, got {N}")
        gen = seeded_generator(head.device, self.random_state)
        obs = ~torch.isnan(head)
        if bool((~obs).all(0).any()):
            bad = torch.nonzero((~obs).all(0)).flatten().tolist()
            raise ValueError(f"feature(s) {bad} have no observed value; drop those columns")
        self.mean_ = head.nanmean(0)
        filled = torch.where(obs, head, self.mean_) - self.mean_
        var = (filled * filled).sum(0) / obs.sum(0).clamp_min(1)
        if self.init == "pca":
            _, svals, vh = torch.linalg.svd(filled, full_matrices=False)
            self.components_ = 0.5 * vh[:q].T * svals[:q] / math.sqrt(N)
        else:
            self.components_ = torch.randn(D, q, dtype=head.dtype, device=head.device,
                                           generator=gen) * (var.mean() / q).sqrt()
        self.noise_variance_ = var.mean().clamp_min(torch.finfo(head.dtype).tiny)
