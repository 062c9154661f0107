r"""Linear-Gaussian state-space model fitted by exact EM (Kalman filter + RTS smoother).

The model (the exact counterpart of a VRNN whose maps are linear):

.. math:: z_1 \sim \mathcal N(\mu_0, V_0),\quad z_t = A z_{t-1} + w_t,\; w_t\sim\mathcal N(0, Q),
          \quad y_t = C z_t + d + v_t,\; v_t \sim \mathcal N(0, R).

Frames may be missing (``mask[b, t] = False`` or an all-NaN frame): they are skipped by the
update, which makes the likelihood that of the observed frames only.

* **E-step**: the Kalman filter (Joseph-form covariance update, symmetrised covariances,
  Cholesky with escalating jitter only when a factorisation fails) gives
  :math:`\log p(y_{1:T}) = \sum_t \log\mathcal N(y_t \mid C m_{t|t-1} + d,\;
  C P_{t|t-1}C^\top + R)`;
  the Rauch–Tung–Striebel smoother gives :math:`\mathbb E[z_t]`, :math:`\mathbb E[z_t z_t^\top]`
  and :math:`\mathbb E[z_t z_{t-1}^\top] = P_{t|T}J_{t-1}^\top + m_{t|T} m_{t-1|T}^\top` with
  :math:`J_t = P_{t|t} A^\top P_{t+1|t}^{-1}`. :meth:`LinearGaussianSSM.sufficient_statistics`
  sums them over sequences and time (summable over chunks or processes).
* **M-step** (closed form, Shumway & Stoffer / Ghahramani & Hinton): with
  :math:`S_{11} = \sum_{t\ge2}\mathbb E z_t z_t^\top`, :math:`S_{00} = \sum_{t\ge2}\mathbb E
  z_{t-1}z_{t-1}^\top`, :math:`S_{10} = \sum_{t\ge2}\mathbb E z_t z_{t-1}^\top`:
  :math:`A = S_{10}S_{00}^{-1}`, :math:`Q = (S_{11} - A S_{10}^\top)/n_{trans}`;
  with :math:`\tilde z = (z, 1)` over observed frames:
  :math:`[C\;d] = (\sum y\,\mathbb E\tilde z^\top)(\sum\mathbb E\tilde z\tilde z^\top)^{-1}`,
  :math:`R = (\sum y y^\top - [C\;d]\sum \mathbb E\tilde z\,y^\top)/n_{obs}`;
  :math:`\mu_0` and :math:`V_0` are the mean and second central moment of :math:`\mathbb E z_1`
  over sequences (plus the posterior covariance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pyro_seqlatent.em._data import as_tensor, resolve_device, resolve_dtype
from pyro_seqlatent.em._loop import run_em, seeded_generator


def symmetrize(P: torch.Tensor) -> torch.Tensor:
    return 0.5 * (P + P.transpose(-1, -2))


def safe_cholesky(P: torch.Tensor, what: str) -> torch.Tensor:
    """Cholesky factor; on failure retry with jitter 1e-10, 1e-8, ... times the mean diagonal."""
    chol, info = torch.linalg.cholesky_ex(P)
    if not bool((info > 0).any()):
        return chol
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    scale = torch.diagonal(P, dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    for exponent in range(-10, -3, 2):
        jittered = P + (10.0**exponent) * scale[..., None, None] * eye
        chol, info = torch.linalg.cholesky_ex(jittered)
        if not bool((info > 0).any()):
            return chol
    raise ValueError(f"{what} is not positive definite even with jitter; the parameters have "
                     "degenerated (try reg_covar > 0 or fewer latent states)")


@dataclass
class SSMStatistics:
    """Expected sufficient statistics, summed over sequences and time (module docstring)."""

    z1: torch.Tensor  # sum_b E z_1            (K,)
    z1z1: torch.Tensor  # sum_b E z_1 z_1^T    (K, K)
    s00: torch.Tensor  # (K, K)
    s11: torch.Tensor  # (K, K)
    s10: torch.Tensor  # (K, K)
    yz: torch.Tensor  # sum_obs y E z~^T      (D, K + 1)
    zz: torch.Tensor  # sum_obs E z~ z~^T      (K + 1, K + 1)
    yy: torch.Tensor  # sum_obs y y^T         (D, D)
    n_seq: torch.Tensor
    n_trans: torch.Tensor
    n_obs: torch.Tensor
    log_likelihood: torch.Tensor

    def __add__(self, other: SSMStatistics) -> SSMStatistics:
        return SSMStatistics(*(a + b for a, b in zip(self.tensors(), other.tensors())))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


class LinearGaussianSSM:
    """Linear-Gaussian state-space model with an exact EM ``fit``.

    :param n_states: latent dimension K.
    :param tol: stop when the mean log-likelihood per sequence improves by less than ``tol``.
    :param max_iter: maximum number of EM iterations.
    :param reg_covar: added to the diagonals of Q, R and V0 after each M-step (0 keeps EM
        exactly monotone).
    :param random_state, dtype, device, progress: as in :class:`GaussianMixture`.

    ``fit(y, mask=None)`` takes ``y`` of shape (B, T, D) (or (T, D)) and an optional boolean
    ``mask`` (B, T) of observed frames; all-NaN frames count as missing. Fitted attributes:
    ``A``, ``Q``, ``C``, ``d``, ``R``, ``mu0``, ``V0``, ``log_likelihood_history_``.
    """

    PARAMS = ("A", "Q", "C", "d", "R", "mu0", "V0")

    def __init__(self, n_states: int, *, tol: float = 1e-4, max_iter: int = 200,
                 reg_covar: float = 0.0, random_state: int | None = None,
                 dtype: torch.dtype | None = torch.float64, device: Any = None,
                 progress: bool = False):
        if not isinstance(n_states, int) or n_states < 1:
            raise ValueError(f"n_states must be a positive int, got {n_states!r}")
        if not (reg_covar >= 0) or not (tol >= 0):
            raise ValueError(f"reg_covar and tol must be >= 0, got {reg_covar!r}, {tol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        self.n_states, self.tol, self.max_iter, self.reg_covar = n_states, tol, max_iter, reg_covar
        self.random_state, self.dtype, self.device, self.progress = (random_state, dtype, device,
                                                                     progress)

    # ----------------------------------------------------------------------------- fitting
    def fit(self, y: Any, mask: Any = None) -> LinearGaussianSSM:
        y, mask = self._prepare(y, mask, fitting=True)
        if not self._has_params():
            self._initialize(y, mask)
        run_em(self, lambda: self.sufficient_statistics(y, mask),
               lambda stats: stats.n_seq, "LG-SSM EM")
        return self

    def set_params(self, **params: Any) -> LinearGaussianSSM:
        """Set any of A, Q, C, d, R, mu0, V0 (tensors or arrays); a later ``fit`` starts there."""
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}; known: {self.PARAMS}")
        for name, value in params.items():
            dt = resolve_dtype(self.dtype, value)
            dev = resolve_device(self.device, value)
            t = torch.as_tensor(value, dtype=dt, device=dev)
            setattr(self, name, t)
        return self

    def sufficient_statistics(self, y: torch.Tensor, mask: torch.Tensor) -> SSMStatistics:
        """E-step on a batch of sequences (B, T, D) with frame mask (B, T)."""
        filt = self.filter(y, mask)
        ms, Ps, cross = self._smooth(filt)
        B, T, K = ms.shape
        Ezz = Ps + ms[..., :, None] * ms[..., None, :]  # (B, T, K, K)
        Ez1z0 = cross + ms[:, 1:, :, None] * ms[:, :-1, None, :]
        m = mask.to(y.dtype)
        y0 = torch.where(mask[..., None], y, 0.0)
        ones = torch.ones(B, T, 1, dtype=y.dtype, device=y.device)
        zt = torch.cat([ms, ones], -1)  # E z~ (B, T, K+1)
        zz = torch.zeros(B, T, K + 1, K + 1, dtype=y.dtype, device=y.device)
        zz[..., :K, :K] = Ezz
        zz[..., :K, K] = ms
        zz[..., K, :K] = ms
        zz[..., K, K] = 1.0
        f = y.new_tensor
        return SSMStatistics(
            z1=ms[:, 0].sum(0),
            z1z1=Ezz[:, 0].sum(0),
            s00=Ezz[:, :-1].sum((0, 1)),
            s11=Ezz[:, 1:].sum((0, 1)),
            s10=Ez1z0.sum((0, 1)),
            yz=torch.einsum("btd,btk->dk", y0, zt),
            zz=torch.einsum("bt,btij->ij", m, zz),
            yy=torch.einsum("btd,bte->de", y0, y0),
            n_seq=f(float(B)),
            n_trans=f(float(B * (T - 1))),
            n_obs=m.sum(),
            log_likelihood=filt["loglik"].sum(),
        )

    def m_step(self, stats: SSMStatistics) -> None:
        """Closed-form M-step from summed statistics (module docstring)."""
        K = stats.s00.shape[0]
        eye = torch.eye(K, dtype=stats.s00.dtype, device=stats.s00.device)
        if float(stats.n_obs) == 0:
            raise ValueError("no observed frame: every mask entry is False")
        self.A = torch.linalg.solve(stats.s00, stats.s10, left=False)
        self.Q = symmetrize(stats.s11 - self.A @ stats.s10.T) / stats.n_trans
        Cd = torch.linalg.solve(stats.zz, stats.yz, left=False)
        self.C, self.d = Cd[:, :K].contiguous(), Cd[:, K].contiguous()
        self.R = symmetrize(stats.yy - Cd @ stats.yz.T) / stats.n_obs
        self.mu0 = stats.z1 / stats.n_seq
        self.V0 = symmetrize(stats.z1z1 / stats.n_seq - self.mu0[:, None] * self.mu0[None])
        if self.reg_covar > 0:
            eye_d = torch.eye(self.R.shape[0], dtype=eye.dtype, device=eye.device)
            self.Q = self.Q + self.reg_covar * eye
            self.V0 = self.V0 + self.reg_covar * eye
            self.R = self.R + self.reg_covar * eye_d

    # ----------------------------------------------------------------------------- inference
    def filter(self, y: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Kalman filter over (B, T, D); returns predicted/filtered means and covariances and
        the per-sequence log-likelihood ``loglik`` (B,)."""
        A, Q, C, d, R = self.A, self.Q, self.C, self.d, self.R
        B, T, D = y.shape
        K = A.shape[0]
        eye = torch.eye(K, dtype=y.dtype, device=y.device)
        m = self.mu0.expand(B, K)
        P = self.V0.expand(B, K, K)
        out = {k: [] for k in ("m_pred", "P_pred", "m_filt", "P_filt")}
        loglik = y.new_zeros(B)
        log2pi = D * math.log(2 * math.pi)
        for t in range(T):
            out["m_pred"].append(m)
            out["P_pred"].append(P)
            S = symmetrize(C @ P @ C.T + R)
            L = safe_cholesky(S, "the innovation covariance C P C^T + R")
            innov = y[:, t] - m @ C.T - d
            white = torch.linalg.solve_triangular(L, innov.unsqueeze(-1), upper=False)
            ll = -0.5 * (log2pi + 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
                         + white.squeeze(-1).pow(2).sum(-1))
            obs = mask[:, t]
            loglik = loglik + torch.where(obs, ll, 0.0)
            # Kalman gain G = P C^T S^{-1}
            G = torch.cholesky_solve(C @ P, L).transpose(-1, -2)
            m_upd = m + (G @ innov.unsqueeze(-1)).squeeze(-1)
            IKC = eye - G @ C
            P_upd = symmetrize(IKC @ P @ IKC.transpose(-1, -2) + G @ R @ G.transpose(-1, -2))
            m = torch.where(obs[:, None], m_upd, m)
            P = torch.where(obs[:, None, None], P_upd, P)
            out["m_filt"].append(m)
            out["P_filt"].append(P)
            m = m @ A.T
            P = symmetrize(A @ P @ A.T + Q)
        res = {k: torch.stack(v, 1) for k, v in out.items()}
        res["loglik"] = loglik
        return res

    def _smooth(self, filt: dict[str, torch.Tensor]):
        mf, Pf, mp, Pp = filt["m_filt"], filt["P_filt"], filt["m_pred"], filt["P_pred"]
        T = mf.shape[1]
        ms, Ps = [mf[:, -1]], [Pf[:, -1]]
        cross = []
        for t in range(T - 2, -1, -1):
            L = safe_cholesky(Pp[:, t + 1], "the predicted state covariance")
            J = torch.cholesky_solve(self.A @ Pf[:, t], L).transpose(-1, -2)  # Pf A^T Pp^{-1}
            m_next, P_next = ms[-1], Ps[-1]
            ms.append(mf[:, t] + (J @ (m_next - mp[:, t + 1]).unsqueeze(-1)).squeeze(-1))
            Ps.append(symmetrize(Pf[:, t] + J @ (P_next - Pp[:, t + 1]) @ J.transpose(-1, -2)))
            cross.append(P_next @ J.transpose(-1, -2))  # Cov(z_{t+1}, z_t | y)
        ms, Ps = torch.stack(ms[::-1], 1), torch.stack(Ps[::-1], 1)
        K = ms.shape[-1]
        cross = (torch.stack(cross[::-1], 1) if cross
                 else ms.new_zeros(ms.shape[0], 0, K, K))
        return ms, Ps, cross

    def smooth(self, y: Any, mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means (B, T, K) and covariances (B, T, K, K) of the states given all y."""
        y, mask = self._prepare(y, mask)
        ms, Ps, _ = self._smooth(self.filter(y, mask))
        return ms, Ps

    def score_samples(self, y: Any, mask: Any = None) -> torch.Tensor:
        """Exact :math:`\\log p(y_{\\text{observed}})` of every sequence, shape (B,)."""
        y, mask = self._prepare(y, mask)
        return self.filter(y, mask)["loglik"]

    def score(self, y: Any, mask: Any = None) -> float:
        """Mean log-likelihood per sequence."""
        return float(self.score_samples(y, mask).mean())

    def sample(self, n_sequences: int, length: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (states (B, T, K), observations (B, T, D))."""
        self._check_fitted()
        A, C = self.A, self.C
        K, D = A.shape[0], C.shape[0]

        def noise(cov, n):
            chol = torch.linalg.cholesky(cov)
            e = torch.randn(n, cov.shape[0], dtype=cov.dtype, device=cov.device,
                            generator=generator)
            return e @ chol.T

        z = self.mu0 + noise(self.V0, n_sequences)
        zs, ys = [], []
        for t in range(length):
            if t > 0:
                z = z @ A.T + noise(self.Q, n_sequences)
            zs.append(z)
            ys.append(z @ C.T + self.d + noise(self.R, n_sequences))
        assert zs[0].shape[-1] == K and ys[0].shape[-1] == D
        return torch.stack(zs, 1), torch.stack(ys, 1)

    # ----------------------------------------------------------------------------- internals
    def _has_params(self) -> bool:
        return all(hasattr(self, p) for p in self.PARAMS)

    def _check_fitted(self) -> None:
        if not self._has_params():
            raise RuntimeError("this LinearGaussianSSM has no parameters yet: call fit(y) or "
                               "set_params(...) first")

    def _prepare(self, y: Any, mask: Any, fitting: bool = False):
        if not fitting:
            self._check_fitted()
        if self._has_params():
            dt, dev = self.A.dtype, self.A.device
        else:
            dt, dev = resolve_dtype(self.dtype, y), resolve_device(self.device, y)
        if isinstance(y, torch.Tensor | list | tuple) or hasattr(y, "__array__"):
            ndim = y.dim() if isinstance(y, torch.Tensor) else np.ndim(y)
            y = as_tensor(y, name="y", dtype=dt, device=dev, allow_nan=True, ndim=ndim)
        else:
            raise TypeError(f"y must be a tensor or array of shape (B, T, D), got {type(y)}")
        if y.dim() == 2:
            y = y.unsqueeze(0)
            mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
        if y.dim() != 3:
            raise ValueError(f"y must have shape (B, T, D) or (T, D), got {tuple(y.shape)}")
        B, T, D = y.shape
        nan = torch.isnan(y)
        if bool((nan.any(-1) & ~nan.all(-1)).any()):
            raise ValueError("y has frames that are only partly NaN; only whole frames can be "
                             "missing: set the whole frame to NaN or impute those entries")
        frame_seen = ~nan.all(-1)
        if mask is None:
            mask = frame_seen
        else:
            mask = torch.as_tensor(mask, device=dev)
            if mask.shape != (B, T):
                raise ValueError(f"mask must have shape (B, T) = {(B, T)}, "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(torch.bool)
            if bool((mask & ~frame_seen).any()):
                raise ValueError("y is NaN in frames that mask marks as observed")
        y = torch.where(mask[..., None], y, 0.0)
        if fitting and T < 2:
            raise ValueError(f"fitting needs sequences of length >= 2, got T = {T}")
        if self._has_params() and D != self.C.shape[0]:
            raise ValueError(f"y has {D} features but the model has {self.C.shape[0]}")
        return y, mask

    def _initialize(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        """PCA of the observed frames for C, d, R; A = 0.9 I; Q, V0 from the PCA scores."""
        K = self.n_states
        frames = y[mask]
        if frames.shape[0] < 2:
            raise ValueError("need at least 2 observed frames")
        D = frames.shape[1]
        if K > D:
            raise ValueError(f"n_states={K} must be <= the number of features ({D})")
        dt, dev = frames.dtype, frames.device
        gen = seeded_generator(dev, self.random_state)
        d = frames.mean(0)
        _, svals, vh = torch.linalg.svd(frames - d, full_matrices=False)
        sd = svals[:K] / math.sqrt(frames.shape[0])
        C = vh[:K].T * sd.clamp_min(1e-3)
        C = C + 0.01 * torch.randn(C.shape, dtype=dt, device=dev, generator=gen)
        resid = ((frames - d).pow(2).mean(0) - (C * C).sum(1)).clamp_min(1e-3 * frames.var(0)
                                                                         .mean() + 1e-6)
        eye = torch.eye(K, dtype=dt, device=dev)
        self.set_params(A=0.9 * eye, Q=0.19 * eye, C=C, d=d, R=torch.diag(resid),
                        mu0=torch.zeros(K, dtype=dt, device=dev), V0=eye.clone())
