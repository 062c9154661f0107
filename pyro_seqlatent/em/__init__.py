"""EM baselines on torch tensors (CPU or CUDA), independent of Pyro and SVI.

* :class:`GaussianMixture` - full / diagonal / spherical Gaussian mixtures, streaming E-step.
* :class:`PPCA` - probabilistic PCA (Tipping & Bishop), missing values allowed.
* :class:`LinearGaussianSSM` - linear-Gaussian state-space model, Kalman filter + RTS smoother.

Every ``fit`` records the exact log-likelihood per iteration in ``log_likelihood_history_``;
EM never decreases it (beyond round-off) when no regularisation is added.
"""

from pyro_seqlatent.em.gmm import GaussianMixture, GMMStatistics
from pyro_seqlatent.em.lgssm import LinearGaussianSSM, SSMStatistics
from pyro_seqlatent.em.ppca import PPCA, PPCAStatistics

__all__ = ["GMMStatistics", "GaussianMixture", "LinearGaussianSSM", "PPCA", "PPCAStatistics",
           "SSMStatistics"]
