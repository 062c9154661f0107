r"""Gaussian mixture fitted by exact EM on torch tensors (CPU or CUDA), scikit-learn style.

The model is :math:`p(x) = \sum_k \pi_k\,\mathcal N(x \mid \mu_k, \Sigma_k)`. The covariances are
stored through the Cholesky factor of the precision, :math:`\Sigma_k^{-1} = P_k P_k^\top` with
:math:`P_k` upper triangular (as in scikit-learn), so that

.. math:: \log \mathcal N(x\mid\mu_k,\Sigma_k) = -\tfrac D2\log 2\pi + \sum_d \log (P_k)_{dd}
          - \tfrac12 \lVert (x-\mu_k)^\top P_k\rVert^2 .

**E-step** (exact posterior): :math:`r_{nk} = \exp(\log\pi_k + \log\mathcal N(x_n\mid\mu_k,\Sigma_k)
- \operatorname{logsumexp}_j[\dots])`. It is *streamed*:
:meth:`GaussianMixture.sufficient_statistics` turns one chunk of rows into the sums

.. math:: N_k = \sum_n r_{nk},\quad S_k = \sum_n r_{nk}\,\tilde x_n,\quad
          T_k = \sum_n r_{nk}\,\tilde x_n \tilde x_n^\top \;(\text{or its diagonal / trace}),

with :math:`\tilde x = x - c` for a fixed shift :math:`c` (the mean of the initialisation sample,
which keeps the one-pass covariance formula well conditioned), plus :math:`\sum_n \log p(x_n)`.
Sums over chunks (or over processes, e.g. with ``torch.distributed.all_reduce`` on
:meth:`GMMStatistics.tensors`) are exact.

**M-step** (closed form, :meth:`GaussianMixture.m_step`): :math:`\pi_k = N_k / N`,
:math:`\mu_k = c + S_k/N_k`, :math:`\Sigma_k = T_k/N_k - (S_k/N_k)(S_k/N_k)^\top + \lambda I`
with :math:`\lambda` = ``reg_covar`` (diagonal: the diagonal of that; spherical: its trace / D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pyro_seqlatent.em._data import ChunkSource, as_tensor, resolve_device, resolve_dtype
from pyro_seqlatent.em._loop import run_em, seeded_generator, sum_statistics
from pyro_seqlatent.em.kmeans import kmeans, kmeans_plusplus, squared_distances

COVARIANCE_TYPES = ("full", "diag", "spherical")
INIT_PARAMS = ("k-means++", "kmeans", "random_from_data")
ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical "
    "covariance (for instance caused by singleton or collapsed samples): {detail}. Try to "
    "decrease the number of components, or increase reg_covar."
)


@dataclass
class GMMStatistics:
    """Sufficient statistics of one or more chunks; ``a + b`` is the statistics of both.

    ``resp_sum`` (K,), ``first`` (K, D) = :math:`\\sum_n r_{nk}(x_n - c)`, ``second``
    (K, D, D) / (K, D) / (K,) for full / diag / spherical, ``log_likelihood`` (scalar tensor)
    and ``count`` (scalar tensor, number of rows).
    """

    resp_sum: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    log_likelihood: torch.Tensor
    count: torch.Tensor

    def __add__(self, other: GMMStatistics) -> GMMStatistics:
        return GMMStatistics(*(a + b for a, b in zip(self.tensors(), other.tensors())))

    def tensors(self) -> list[torch.Tensor]:
        """The fields as a list, e.g. to ``all_reduce`` each one across processes."""
        return [getattr(self, f.name) for f in fields(self)]


class GaussianMixture:
    """Gaussian mixture model fitted by EM (scikit-learn's ``GaussianMixture`` interface).

    :param n_components: number of components K.
    :param covariance_type: ``"full"``, ``"diag"`` or ``"spherical"``.
    :param tol: stop when the mean log-likelihood per sample improves by less than ``tol``
        (``0`` runs ``max_iter`` iterations).
    :param reg_covar: added to the covariance diagonals (``0`` keeps EM exactly monotone).
    :param max_iter: maximum number of EM iterations.
    :param init_params: ``"k-means++"`` (seeding + hard assignment), ``"kmeans"`` (k-means++ then
        Lloyd) or ``"random_from_data"``; ignored for the means when ``means_init`` is given.
    :param weights_init, means_init, precisions_init: optional initial parameters (precisions
        as in scikit-learn: full (K, D, D), diag (K, D), spherical (K,)).
    :param random_state: seed of the initialisation.
    :param chunk_size: rows per E-step chunk (``None``: chosen so that a chunk's work buffers stay
        near 64 MiB).
    :param init_max_samples: the initialisation uses at most this many leading rows.
    :param dtype: working dtype (default float64; ``None``: the dtype of the data).
    :param device: working device (default: the device of the data tensor).
    :param progress: show a tqdm bar over iterations.
    """

    def __init__(self, n_components: int = 1, *, covariance_type: str = "full",
                 tol: float = 1e-3, reg_covar: float = 1e-6, max_iter: int = 100,
                 init_params: str = "k-means++", weights_init: Any = None,
                 means_init: Any = None, precisions_init: Any = None,
                 random_state: int | None = None, chunk_size: int | None = None,
                 init_max_samples: int = 100_000, dtype: torch.dtype | None = torch.float64,
                 device: Any = None, progress: bool = False):
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, "
                             f"got {covariance_type!r}")
        if init_params not in INIT_PARAMS:
            raise ValueError(f"init_params must be one of {INIT_PARAMS}, got {init_params!r}")
        if not (reg_covar >= 0):
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar!r}")
        if not (tol >= 0):
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol, self.reg_covar, self.max_iter = tol, reg_covar, max_iter
        self.init_params = init_params
        self.weights_init, self.means_init = weights_init, means_init
        self.precisions_init = precisions_init
        self.random_state, self.chunk_size = random_state, chunk_size
        self.init_max_samples = init_max_samples
        self.dtype, self.device, self.progress = dtype, device, progress

    # ----------------------------------------------------------------------------- fitting
    def fit(self, X: Any, y: Any = None) -> GaussianMixture:
        """Run EM on ``X`` (tensor, array/memmap, or callable returning an iterable of chunks).

        Records ``log_likelihood_history_`` (mean log-likelihood per sample of the parameters
        *entering* each iteration; non-decreasing when ``reg_covar == 0``), ``n_iter_``,
        ``converged_``, ``lower_bound_`` (the last recorded value) and ``fit_times_`` (seconds
        since the start of ``fit`` at which each recorded value was known).
        """
        source = self._source(X)
        self._initialize(source)
        history = run_em(self, lambda: self.accumulate_statistics(source),
                         lambda stats: stats.count, "GMM EM")
        self.lower_bound_ = history[-1]
        return self

    def fit_predict(self, X: Any, y: Any = None) -> torch.Tensor:
        return self.fit(X).predict(X)

    def accumulate_statistics(self, X: Any) -> GMMStatistics:
        """The E-step over all chunks of ``X``: the sum of :meth:`sufficient_statistics`."""
        source = X if isinstance(X, ChunkSource) else self._source(X)
        return sum_statistics(source, self.sufficient_statistics)

    def sufficient_statistics(self, X_chunk: torch.Tensor) -> GMMStatistics:
        """E-step on one chunk (N, D) under the current parameters: see the module docstring.

        The centred data :math:`\tilde x` and its products (:math:`\tilde x^2`, or the upper
        triangle of :math:`\tilde x\tilde x^\top` for full covariances) are formed once and
        serve both the log-densities and the second moments, each as one matrix product over
        all components (no Python loop over K).
        """
        self._check_features(X_chunk)
        Xc = X_chunk - self.shift_
        if self.covariance_type == "full":
            products = self._outer_products(Xc)
        elif self.covariance_type == "diag":
            products = Xc * Xc
        else:
            products = (Xc * Xc).sum(1, keepdim=True)
        log_prob = self._centered_log_prob(Xc, products)  # (K, N): faster GEMM layout
        log_norm = torch.logsumexp(log_prob, dim=0)
        resp = torch.exp(log_prob - log_norm)
        second = resp @ products
        if self.covariance_type == "full":
            second = self._from_triangle(second)
        elif self.covariance_type == "spherical":
            second = second.squeeze(1)
        count = torch.tensor(float(X_chunk.shape[0]), dtype=X_chunk.dtype, device=X_chunk.device)
        return GMMStatistics(resp.sum(1), resp @ Xc, second, log_norm.sum(), count)

    def _triangle(self, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (D, str(device))
        if getattr(self, "_tri_key", None) != key:
            self._tri = torch.triu_indices(D, D, device=device)
            self._tri_key = key
        return self._tri[0], self._tri[1]

    def _outer_products(self, Xc: torch.Tensor) -> torch.Tensor:
        """Upper triangle of every :math:`\tilde x_n\tilde x_n^\top`, shape (N, D(D+1)/2)."""
        i, j = self._triangle(Xc.shape[1], Xc.device)
        return Xc[:, i] * Xc[:, j]

    def _from_triangle(self, tri: torch.Tensor) -> torch.Tensor:
        """(K, D(D+1)/2) upper triangles -> (K, D, D) symmetric matrices."""
        D = self.means_.shape[1]
        i, j = self._triangle(D, tri.device)
        full = tri.new_zeros(tri.shape[0], D, D)
        full[:, i, j] = tri
        full[:, j, i] = tri
        return full

    def _centered_log_prob(self, Xc: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\pi_k + \log\mathcal N`, shape (K, N), from centred data, with the
        quadratic form expanded, :math:`(\tilde x - m)^\top\Lambda(\tilde x - m) = \langle \tilde x
        \tilde x^\top, \Lambda\rangle - 2\tilde x^\top\Lambda m + m^\top\Lambda m`,
        :math:`m = \mu - c`, so that it is one matrix product for all components."""
        D = Xc.shape[1]
        P = self.precisions_cholesky_
        m = self.means_ - self.shift_
        if self.covariance_type == "full":
            prec = self.precisions_
            i, j = self._triangle(D, Xc.device)
            weights = prec[:, i, j] * torch.where(i == j, 1.0, 2.0).to(prec.dtype)
            lm = (prec @ m.unsqueeze(-1)).squeeze(-1)  # (K, D)
            maha = weights @ products.T - 2.0 * lm @ Xc.T + (m * lm).sum(1)[:, None]
            log_det = torch.diagonal(P, dim1=1, dim2=2).log().sum(1)
        elif self.covariance_type == "diag":
            prec = P * P
            maha = prec @ products.T - 2.0 * (m * prec) @ Xc.T + (m * m * prec).sum(1)[:, None]
            log_det = P.log().sum(1)
        else:
            prec = P * P
            maha = (products.T - 2.0 * m @ Xc.T + (m * m).sum(1)[:, None]) * prec[:, None]
            log_det = D * P.log()
        maha = maha.clamp_min(0.0)
        offset = log_det + self.weights_.log()
        return -0.5 * (D * math.log(2 * math.pi) + maha) + offset[:, None]

    def m_step(self, stats: GMMStatistics) -> None:
        """Closed-form M-step from summed statistics (see the module docstring)."""
        eps = 10 * torch.finfo(stats.resp_sum.dtype).eps
        nk = stats.resp_sum + eps
        self.weights_ = nk / nk.sum()
        m = stats.first / nk[:, None]
        self.means_ = self.shift_ + m
        if self.covariance_type == "full":
            cov = stats.second / nk[:, None, None] - m[:, :, None] * m[:, None, :]
            cov = 0.5 * (cov + cov.transpose(1, 2))
            cov = cov + self.reg_covar * torch.eye(cov.shape[-1], dtype=cov.dtype,
                                                   device=cov.device)
        elif self.covariance_type == "diag":
            cov = stats.second / nk[:, None] - m * m + self.reg_covar
        else:
            cov = (stats.second / nk - (m * m).sum(1)) / m.shape[1] + self.reg_covar
        self._set_covariances(cov)

    # ----------------------------------------------------------------------------- inference
    def score_samples(self, X: Any) -> torch.Tensor:
        r""":math:`\log p(x_n)` for every row, shape (N,)."""
        return torch.cat([torch.logsumexp(self._weighted_log_prob(c), 1) for c in self._rows(X)])

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per sample."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X: Any) -> torch.Tensor:
        """Posterior responsibilities :math:`p(k \\mid x_n)`, shape (N, K)."""
        return torch.cat([torch.softmax(self._weighted_log_prob(c), 1) for c in self._rows(X)])

    def predict(self, X: Any) -> torch.Tensor:
        """Most probable component of every row."""
        return torch.cat([self._weighted_log_prob(c).argmax(1) for c in self._rows(X)])

    def sample(self, n_samples: int = 1, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_samples`` points; returns (X (n, D), component labels (n,))."""
        self._check_fitted()
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        labels = torch.multinomial(self.weights_, n_samples, replacement=True,
                                   generator=generator)
        z = torch.randn(n_samples, self.means_.shape[1], dtype=self.means_.dtype,
                        device=self.means_.device, generator=generator)
        if self.covariance_type == "full":
            chol = torch.linalg.cholesky(self.covariances_)
            noise = torch.einsum("nij,nj->ni", chol[labels], z)
        elif self.covariance_type == "diag":
            noise = self.covariances_[labels].sqrt() * z
        else:
            noise = self.covariances_[labels].sqrt()[:, None] * z
        return self.means_[labels] + noise, labels

    def n_parameters(self) -> int:
        K, D = self.means_.shape
        cov = {"full": K * D * (D + 1) // 2, "diag": K * D, "spherical": K}[self.covariance_type]
        return cov + K * D + K - 1

    def bic(self, X: Any) -> float:
        n = sum(c.shape[0] for c in self._rows(X))
        return -2 * self.score(X) * n + self.n_parameters() * math.log(n)

    def aic(self, X: Any) -> float:
        n = sum(c.shape[0] for c in self._rows(X))
        return -2 * self.score(X) * n + 2 * self.n_parameters()

    # ----------------------------------------------------------------------------- internals
    def _source(self, X: Any) -> ChunkSource:
        if isinstance(X, ChunkSource):
            return X
        dtype = resolve_dtype(self.dtype, X)
        device = resolve_device(self.device, X)
        source = ChunkSource(X, chunk_size=None, dtype=dtype, device=device)
        if not source.streamed and source.n_rows < 1:
            raise ValueError("X has no rows")
        return source

    def _rows(self, X: Any):
        self._check_fitted()
        source = self._source(X)
        source.dtype, source.device = self.means_.dtype, self.means_.device
        chunk = self._chunk_rows(source)
        if not source.streamed:
            source.chunk_size = chunk
        yield from source

    def _chunk_rows(self, source: ChunkSource) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        D = source.n_features if not source.streamed else 1
        width = D * (D + 1) // 2 if self.covariance_type == "full" else D
        # ~2^21 elements (16 MiB in float64) of data products per chunk: cache friendly on CPUs
        return max(1024, 2**21 // max(width, 1))

    def _check_fitted(self) -> None:
        if not hasattr(self, "means_"):
            raise RuntimeError("this GaussianMixture is not fitted yet: call fit(X) first")

    def _check_features(self, X: torch.Tensor) -> None:
        if X.dim() != 2 or X.shape[1] != self.means_.shape[1]:
            raise ValueError(f"X must have shape (n, {self.means_.shape[1]}) like the data the "
                             f"model was fitted on, got {tuple(X.shape)}")

    def _generator(self, device: torch.device) -> torch.Generator:
        return seeded_generator(device, self.random_state)

    def _initialize(self, source: ChunkSource) -> None:
        if not source.streamed:
            source.chunk_size = self._chunk_rows(source)
        head = source.head(self.init_max_samples)
        n, D = head.shape
        K = self.n_components
        if K > n:
            raise ValueError(f"n_components={K} must be <= the number of samples ({n}); "
                             "use fewer components or more data")
        dev, dt = head.device, head.dtype
        self.shift_ = head.mean(0)
        self.means_ = torch.zeros(K, D, dtype=dt, device=dev)  # for _check_features
        gen = self._generator(dev)
        if self.means_init is not None:
            centers = as_tensor(self.means_init, name="means_init", dtype=dt, device=dev)
            if centers.shape != (K, D):
                raise ValueError(f"means_init must have shape ({K}, {D}), "
                                 f"got {tuple(centers.shape)}")
        elif self.init_params == "kmeans":
            centers, _ = kmeans(head, K, gen)
        elif self.init_params == "k-means++":
            centers = kmeans_plusplus(head, K, gen)
        else:
            centers = head[torch.randperm(n, generator=gen, device=dev)[:K]]
        labels = squared_distances(head, centers).argmin(1)
        resp = torch.nn.functional.one_hot(labels, K).to(dt)
        Xc = head - self.shift_
        if self.covariance_type == "full":
            second = self._from_triangle(resp.T @ self._outer_products(Xc))
        elif self.covariance_type == "diag":
            second = resp.T @ (Xc * Xc)
        else:
            second = resp.T @ (Xc * Xc).sum(1)
        zero = torch.zeros((), dtype=dt, device=dev)
        stats = GMMStatistics(resp.sum(0), resp.T @ Xc, second, zero, zero + n)
        self.m_step(stats)
        if self.means_init is not None:
            self.means_ = centers.clone()
        if self.weights_init is not None:
            w = as_tensor(self.weights_init, name="weights_init", dtype=dt, device=dev, ndim=1)
            if w.shape != (K,) or bool((w < 0).any()) or abs(float(w.sum()) - 1) > 1e-6:
                raise ValueError(f"weights_init must be {K} non-negative weights summing to 1")
            self.weights_ = w
        if self.precisions_init is not None:
            ndim = {"full": 3, "diag": 2, "spherical": 1}[self.covariance_type]
            prec = as_tensor(self.precisions_init, name="precisions_init", dtype=dt, device=dev,
                             ndim=ndim)
            if self.covariance_type == "full":
                cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
            else:
                cov = 1.0 / prec
            self._set_covariances(cov)

    def _set_covariances(self, cov: torch.Tensor) -> None:
        if self.covariance_type == "full":
            chol, info = torch.linalg.cholesky_ex(cov)
            if bool((info > 0).any()) or not bool(torch.isfinite(cov).all()):
                bad = torch.nonzero(info > 0).flatten().tolist()
                raise ValueError(ILL_DEFINED.format(
                    detail=f"the covariance of component(s) {bad} is not positive definite"))
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            inv_chol = torch.linalg.solve_triangular(chol, eye.expand_as(cov), upper=False)
            self.precisions_cholesky_ = inv_chol.transpose(1, 2)
            self.precisions_ = self.precisions_cholesky_ @ inv_chol
        else:
            if bool((cov <= 0).any()) or not bool(torch.isfinite(cov).all()):
                bad = torch.nonzero((cov <= 0).reshape(cov.shape[0], -1).any(1)).flatten()
                raise ValueError(ILL_DEFINED.format(
                    detail=f"component(s) {bad.tolist()} have a non-positive variance"))
            self.precisions_cholesky_ = cov.rsqrt()
            self.precisions_ = 1.0 / cov
        self.covariances_ = cov

    def _weighted_log_prob(self, X: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\pi_k + \log\mathcal N(x_n\mid\mu_k,\Sigma_k)`, shape (N, K)."""
        self._check_features(X)
        D = X.shape[1]
        P, mu = self.precisions_cholesky_, self.means_
        if self.covariance_type == "full":
            y = torch.matmul(X, P) - (mu[:, None, :] @ P)  # (K, N, D)
            maha = (y * y).sum(-1).T
            log_det = torch.diagonal(P, dim1=1, dim2=2).log().sum(1)
        elif self.covariance_type == "diag":
            prec = P * P
            maha = ((mu * mu * prec).sum(1) - 2.0 * X @ (mu * prec).T + (X * X) @ prec.T)
            log_det = P.log().sum(1)
        else:
            prec = P * P
            maha = ((mu * mu).sum(1) * prec - 2.0 * (X @ mu.T) * prec
                    + (X * X).sum(1, keepdim=True) * prec)
            log_det = D * P.log()
        return -0.5 * (D * math.log(2 * math.pi) + maha) + log_det + self.weights_.log()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array (moved to the CPU)."""
    return t.detach().cpu().numpy()
