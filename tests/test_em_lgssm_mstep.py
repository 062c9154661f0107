r"""The LG-SSM M-step against the complete-data maximum-likelihood estimates.

With :math:`C = I`, :math:`d = 0` and a tiny observation noise the smoothed states equal the
observations, so the E-step's statistics are those of the (known) states and one M-step must
return the textbook estimates computed from the states by hand: the initial state's mean and
(biased) covariance, the least-squares transition :math:`A = S_{10} S_{00}^{-1}` and its residual
covariance :math:`Q`. A non-zero initial mean makes :math:`V_0 \ne E[z_1 z_1^\top]`.
"""

from __future__ import annotations

import torch

from pyro_seqlatent.em import LinearGaussianSSM


def test_m_step_from_noiseless_states_gives_the_complete_data_estimates():
    truth = LinearGaussianSSM(2).set_params(
        A=[[0.9, 0.25], [-0.25, 0.85]], Q=[[0.1, 0.02], [0.02, 0.05]], C=torch.eye(2),
        d=torch.zeros(2), R=1e-8 * torch.eye(2), mu0=[3.0, -2.0], V0=[[0.5, 0.1], [0.1, 0.2]])
    z, y = truth.sample(60, 15, torch.Generator().manual_seed(0))
    mask = torch.ones(60, 15, dtype=torch.bool)
    fitted = LinearGaussianSSM(2).set_params(**{k: getattr(truth, k) for k in truth.PARAMS})
    fitted.m_step(fitted.sufficient_statistics(y, mask))

    z1 = z[:, 0]
    mu0 = z1.mean(0)
    V0 = (z1 - mu0).T @ (z1 - mu0) / z1.shape[0]
    prev, nxt = z[:, :-1].reshape(-1, 2), z[:, 1:].reshape(-1, 2)
    A = (nxt.T @ prev) @ torch.linalg.inv(prev.T @ prev)
    Q = (nxt.T @ nxt - A @ (nxt.T @ prev).T) / prev.shape[0]
    eye, zero = torch.eye(2, dtype=z.dtype), torch.zeros(2, dtype=z.dtype)
    for name, expected in (("mu0", mu0), ("V0", V0), ("A", A), ("Q", Q), ("C", eye), ("d", zero)):
        torch.testing.assert_close(getattr(fitted, name), expected, atol=1e-3, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert float(fitted.R.abs().max()) < 1e-5  # the observation noise is (almost) nil
