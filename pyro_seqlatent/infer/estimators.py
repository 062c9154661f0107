r"""The ELBO gradient-estimator lab: named estimators over any Pyro model/guide pair, their
gradient variance and signal-to-noise ratio at fixed parameters, and training curves.

Estimators (:data:`ESTIMATORS`; every one is a ``pyro.infer.ELBO`` usable by
:func:`~pyro_seqlatent.infer.train`), none of which edits the model or the guide:

======================  ===================================================================
``reparam``             pathwise, Monte-Carlo KL (``Trace_ELBO``; SGVB estimator A, eq. 6)
``analytic_kl``         pathwise, analytic KL where registered (``TraceMeanField_ELBO``; B, eq. 7)
``score``               score function at every guide site (BBVI, Ranganath et al. 2014, eq. 3)
``score_avg_baseline``  score function, decaying-average baseline (``TraceGraph_ELBO``)
``score_nn_baseline``   score function, neural baseline of the guide's input (``TraceGraph_ELBO``)
``stl``                 sticking the landing (Roeder et al. 2017)
``iwae``                IWAE bound, K particles (``RenyiELBO(alpha=0)``; Burda et al. 2015)
``dreg``                IWAE bound, doubly-reparameterized gradient (Tucker et al. 2018)
======================  ===================================================================

Quick use::

    from pyro_seqlatent.infer.estimators import make_estimator, gradient_stats
    stats = gradient_stats(model, guide, batch, make_estimator("score"), num_draws=200)
    stats.summary()   # {"guide": {"mean_variance": ..., "median_snr": ...}, "model": {...}}

Command line: ``pyro-seqlatent compare-estimators --model vae`` or
``--pair my_module:make_pair`` (see ``docs/estimators.md``); its driver, which builds registered
models and trains them, is :mod:`pyro_seqlatent.experiments.compare_estimators`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro

from pyro_seqlatent.infer.estimators_elbos import (
    BaselineScoreFunctionELBO,
    DReGELBO,
    ScoreFunctionELBO,
    StickingTheLandingELBO,
    clear_average_baselines,
)
from pyro_seqlatent.infer.estimators_report import write_report
from pyro_seqlatent.infer.estimators_sites import (
    ScoreFunctionMessenger,
    ScoreFunctionSite,
    as_score_function,
    cache_free_log_prob,
    score_function,
)
from pyro_seqlatent.infer.estimators_stats import (
    GradientStats,
    GroupStats,
    TrainingCurve,
    gradient_stats,
    parameter_groups,
    training_curve,
)

__all__ = [
    "ESTIMATORS",
    "BaselineScoreFunctionELBO",
    "DReGELBO",
    "EstimatorSpec",
    "GradientStats",
    "GroupStats",
    "ScoreFunctionELBO",
    "ScoreFunctionMessenger",
    "ScoreFunctionSite",
    "StickingTheLandingELBO",
    "TrainingCurve",
    "as_score_function",
    "cache_free_log_prob",
    "check_names",
    "clear_average_baselines",
    "compare_estimators",
    "compare_training",
    "gradient_stats",
    "make_estimator",
    "parameter_groups",
    "score_function",
    "training_curve",
    "write_report",
]


@dataclass(frozen=True)
class EstimatorSpec:
    """A named estimator: ``build(num_particles) -> ELBO``; ``multi_sample`` estimators optimise
    the K-particle IWAE bound (default K = 5), the others the ELBO (default K = 1); ``warmup``
    draws let a stateful baseline adapt before variance is measured."""

    name: str
    description: str
    build: Callable[[int], pyro.infer.ELBO]
    multi_sample: bool = False
    warmup: int = 0


def _vec(k: int) -> bool:
    return k > 1


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec("reparam", "pathwise, Monte-Carlo KL (Trace_ELBO)",
                      lambda k: pyro.infer.Trace_ELBO(num_particles=k,
                                                      vectorize_particles=_vec(k))),
        EstimatorSpec("analytic_kl", "pathwise, analytic KL (TraceMeanField_ELBO)",
                      lambda k: pyro.infer.TraceMeanField_ELBO(num_particles=k,
                                                               vectorize_particles=_vec(k))),
        EstimatorSpec("score", "score function (every guide site)",
                      lambda k: ScoreFunctionELBO(num_particles=k, vectorize_particles=_vec(k))),
        EstimatorSpec("score_avg_baseline", "score function + decaying-average baseline",
                      lambda k: BaselineScoreFunctionELBO("average", num_particles=k), warmup=50),
        EstimatorSpec("score_nn_baseline", "score function + neural baseline",
                      lambda k: BaselineScoreFunctionELBO("nn", num_particles=k), warmup=200),
        EstimatorSpec("stl", "sticking the landing",
                      lambda k: StickingTheLandingELBO(num_particles=k,
                                                       vectorize_particles=_vec(k))),
        EstimatorSpec("iwae", "IWAE bound (RenyiELBO alpha=0)",
                      lambda k: pyro.infer.RenyiELBO(alpha=0.0, num_particles=k,
                                                     vectorize_particles=_vec(k)),
                      multi_sample=True),
        EstimatorSpec("dreg", "IWAE bound, doubly-reparameterized gradient",
                      lambda k: DReGELBO(num_particles=k, vectorize_particles=_vec(k)),
                      multi_sample=True),
    )
}

DEFAULT_IWAE_PARTICLES = 5


def make_estimator(name: str, num_particles: int | None = None) -> pyro.infer.ELBO:
    """A fresh ELBO instance of the estimator ``name`` (one of :data:`ESTIMATORS`);
    ``num_particles`` defaults to 1, or 5 for the multi-sample bounds."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {list(ESTIMATORS)}")
    spec = ESTIMATORS[name]
    k = num_particles if num_particles is not None else (
        DEFAULT_IWAE_PARTICLES if spec.multi_sample else 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    return spec.build(k)


def check_names(estimators: Sequence[str]) -> list[str]:
    """``estimators`` as a list, after checking that it is not empty and that every name is one
    of :data:`ESTIMATORS` (a ``ValueError`` lists the known names otherwise)."""
    names = list(estimators)
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise ValueError(f"unknown or no estimators {unknown}; choose from {list(ESTIMATORS)}")
    return names


def compare_estimators(model, guide, batch, estimators: Sequence[str] = tuple(ESTIMATORS), *,
                       num_draws: int = 200, num_particles: int = DEFAULT_IWAE_PARTICLES,
                       groups=None, seed: int = 0, progress: bool = False
                       ) -> dict[str, GradientStats]:
    """:func:`gradient_stats` of each named estimator on the same batch and parameters
    (multi-sample bounds use ``num_particles``; baselines get their ``warmup`` draws)."""
    out = {}
    for name in check_names(estimators):
        spec = ESTIMATORS[name]
        est = make_estimator(name, num_particles if spec.multi_sample else 1)
        if progress:
            print(f"  gradient stats: {name} ({num_draws} draws)", file=sys.stderr, flush=True)
        out[name] = gradient_stats(model, guide, batch, est, num_draws, groups=groups,
                                   warmup=spec.warmup, seed=seed)
    return out


def compare_training(build: Callable[[], tuple], train_data, eval_batch,
                     estimators: Sequence[str] = tuple(ESTIMATORS), *, num_steps: int,
                     num_particles: int = DEFAULT_IWAE_PARTICLES, eval_every: int = 50,
                     seed: int = 0, progress: bool = False, **train_kwargs
                     ) -> dict[str, TrainingCurve]:
    """Train a fresh ``build()`` pair with each estimator for ``num_steps`` and record the
    held-out ELBO of ``eval_batch`` against steps and training seconds."""
    out = {}
    for name in check_names(estimators):
        spec = ESTIMATORS[name]
        if progress:
            print(f"  training: {name} ({num_steps} steps)", file=sys.stderr, flush=True)
        est = make_estimator(name, num_particles if spec.multi_sample else 1)
        out[name] = training_curve(name, build, train_data, eval_batch, est,
                                   num_steps=num_steps, eval_every=eval_every, seed=seed,
                                   **train_kwargs)
    return out
