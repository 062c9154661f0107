"""LinearGaussianSSM (pyro_seqlatent.em): Kalman/RTS against the dense joint Gaussian; EM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pyro_seqlatent.em import LinearGaussianSSM


def true_model(D=3, seed=0):
    rng = np.random.default_rng(seed)
    return LinearGaussianSSM(2).set_params(
        A=[[0.9, 0.25], [-0.25, 0.85]], Q=[[0.1, 0.02], [0.02, 0.05]],
        C=rng.normal(size=(D, 2)), d=rng.normal(size=D), R=0.2 * np.eye(D) + 0.05,
        mu0=[0.5, -0.3], V0=[[1.0, 0.3], [0.3, 0.8]])


def dense_joint(m: LinearGaussianSSM, T: int):
    """Mean and covariance of (z_1..z_T) and of (y_1..y_T), built from the recursions."""
    A, Q, C, d, R = (getattr(m, k).numpy() for k in ("A", "Q", "C", "d", "R"))
    mu0, V0 = m.mu0.numpy(), m.V0.numpy()
    K = A.shape[0]
    # z = F e with e = (z_1 - mu0, w_2, ..., w_T): z_t - E z_t = sum_{s<=t} A^{t-s} e_s
    F = np.zeros((T * K, T * K))
    for t in range(T):
        for s in range(t + 1):
            F[t * K:(t + 1) * K, s * K:(s + 1) * K] = np.linalg.matrix_power(A, t - s)
    E = np.zeros((T * K, T * K))
    E[:K, :K] = V0
    for t in range(1, T):
        E[t * K:(t + 1) * K, t * K:(t + 1) * K] = Q
    mz = np.concatenate([np.linalg.matrix_power(A, t) @ mu0 for t in range(T)])
    Sz = F @ E @ F.T
    H = np.kron(np.eye(T), C)
    my = H @ mz + np.tile(d, T)
    Sy = H @ Sz @ H.T + np.kron(np.eye(T), R)
    return mz, Sz, my, Sy, H


def test_kalman_log_likelihood_equals_dense_gaussian_with_missing_frames():
    m = true_model()
    T = 4
    _, y = m.sample(3, T, torch.Generator().manual_seed(0))
    mask = torch.tensor([[True] * 4, [True, False, True, True], [False, True, True, False]])
    got = m.score_samples(y, mask).numpy()
    _, _, my, Sy, _ = dense_joint(m, T)
    D = y.shape[-1]
    for b in range(3):
        keep = np.repeat(mask[b].numpy(), D)
        want = multivariate_normal(my[keep], Sy[np.ix_(keep, keep)]).logpdf(
            y[b].reshape(-1).numpy()[keep])
        assert abs(got[b] - want) < 1e-9
    # NaN frames are the same as masked frames
    y_nan = y.clone()
    y_nan[~mask] = float("nan")
    np.testing.assert_allclose(m.score_samples(y_nan).numpy(), got, rtol=1e-12)


def test_rts_smoother_equals_dense_conditioning():
    m = true_model()
    T = 5
    _, y = m.sample(1, T, torch.Generator().manual_seed(1))
    ms, Ps = m.smooth(y)
    mz, Sz, my, Sy, H = dense_joint(m, T)
    gain = Sz @ H.T @ np.linalg.inv(Sy)
    post_mean = mz + gain @ (y[0].reshape(-1).numpy() - my)
    post_cov = Sz - gain @ H @ Sz
    np.testing.assert_allclose(ms[0].reshape(-1).numpy(), post_mean, atol=1e-9)
    for t in range(T):
        np.testing.assert_allclose(Ps[0, t].numpy(), post_cov[2 * t:2 * t + 2, 2 * t:2 * t + 2],
                                   atol=1e-9)


def test_em_is_monotone_and_beats_the_true_parameters():
    truth = true_model(D=4, seed=2)
    _, y = truth.sample(8, 25, torch.Generator().manual_seed(2))
    mask = torch.rand(8, 25, generator=torch.Generator().manual_seed(3)) > 0.2
    m = LinearGaussianSSM(2, tol=0.0, max_iter=30, random_state=0).fit(y, mask)
    hist = np.array(m.log_likelihood_history_)
    assert np.diff(hist).min() >= -1e-9 * np.abs(hist).max()
    assert hist[-1] > hist[0] + 1.0
    # EM started at the true parameters climbs above them (never below)
    start = {k: getattr(truth, k) for k in LinearGaussianSSM.PARAMS}
    m2 = LinearGaussianSSM(2, tol=0.0, max_iter=10).set_params(**start).fit(y, mask)
    assert m2.log_likelihood_history_[0] == pytest.approx(truth.score(y, mask), abs=1e-9)
    assert np.diff(m2.log_likelihood_history_).min() >= -1e-9
    assert m2.score(y, mask) > truth.score(y, mask) + 0.1


def test_statistics_are_sums_over_sequences():
    m = true_model()
    _, y = m.sample(4, 6, torch.Generator().manual_seed(4))
    mask = torch.ones(4, 6, dtype=torch.bool)
    whole = m.sufficient_statistics(y, mask)
    parts = m.sufficient_statistics(y[:1], mask[:1]) + m.sufficient_statistics(y[1:], mask[1:])
    for a, b in zip(whole.tensors(), parts.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


def test_long_sequence_with_tiny_noise_stays_finite_and_symmetric():
    m = true_model()
    m.set_params(R=1e-10 * np.eye(3), Q=1e-8 * np.eye(2))
    _, y = m.sample(2, 300, torch.Generator().manual_seed(5))
    ms, Ps = m.smooth(y)
    assert torch.isfinite(ms).all() and torch.isfinite(m.score_samples(y)).all()
    torch.testing.assert_close(Ps, Ps.transpose(-1, -2), rtol=0, atol=0)
    assert float(torch.linalg.eigvalsh(Ps).min()) > -1e-9


def test_float32_input_is_fitted_in_float64_by_default():
    _, y = true_model().sample(3, 10, torch.Generator().manual_seed(6))
    m = LinearGaussianSSM(2, max_iter=2).fit(y.float())
    assert m.A.dtype == torch.float64


def test_bad_input_gives_clear_errors():
    _, y = true_model().sample(2, 6, torch.Generator().manual_seed(7))
    part = y.clone()
    part[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="partly NaN"):
        LinearGaussianSSM(2).fit(part)
    with pytest.raises(ValueError, match="mask must have shape"):
        LinearGaussianSSM(2).fit(y, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="length >= 2"):
        LinearGaussianSSM(2).fit(y[:, :1])
    with pytest.raises(ValueError, match="n_states=4"):
        LinearGaussianSSM(4).fit(y)
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        LinearGaussianSSM(2).fit(y[0, 0])
    m = true_model()
    with pytest.raises(ValueError, match="has 2 features but the model has 3"):
        m.score(y[..., :2])
    with pytest.raises(RuntimeError, match="no parameters"):
        LinearGaussianSSM(2).score(y)
    inf = y.clone()
    inf[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        LinearGaussianSSM(2).fit(inf)
