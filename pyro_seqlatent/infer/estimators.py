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
``vimco``               IWAE bound, score function, leave-one-out baselines (Mnih & Rezende 2016)
``reinforce_loo``       ELBO from K draws, leave-one-out baselines (Kool et al. 2019)
``concrete``            Concrete / Gumbel-softmax relaxation, temperature 0.5 (biased)
``enum``                exact sum over discrete guide sites (``TraceEnum_ELBO``)
======================  ===================================================================

Each :class:`EstimatorSpec` says what it applies to (``sites``: any site, reparameterizable
sites only, or discrete sites) and which bound it estimates; :func:`compare_estimators` runs
those that apply to the model at hand and lists the others with the reason
(:mod:`~pyro_seqlatent.infer.estimators_applies`).

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

from pyro_seqlatent.infer.estimators_applies import applicability, inspect_sites
from pyro_seqlatent.infer.estimators_discrete import (
    IWAEELBO,
    VIMCOELBO,
    ConcreteELBO,
    EnumELBO,
    LeaveOneOutELBO,
    exact_bound,
)
from pyro_seqlatent.infer.estimators_elbos import (
    BaselineScoreFunctionELBO,
    DReGELBO,
    ScoreFunctionELBO,
    StickingTheLandingELBO,
    clear_average_baselines,
)
from pyro_seqlatent.infer.estimators_registry import (
    DEFAULT_IWAE_PARTICLES,
    ESTIMATORS,
    EstimatorSpec,
    check_names,
    make_estimator,
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
    "ConcreteELBO",
    "DReGELBO",
    "EnumELBO",
    "EstimatorComparison",
    "IWAEELBO",
    "LeaveOneOutELBO",
    "VIMCOELBO",
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
    "exact_bound",
    "gradient_stats",
    "make_estimator",
    "parameter_groups",
    "score_function",
    "training_curve",
    "write_report",
]


class EstimatorComparison(dict):
    """What :func:`compare_estimators` and :func:`compare_training` return: ``name →`` result
    of every estimator that ran, plus ``skipped`` (``name →`` why it did not apply, or
    ``"failed: …"``) and ``notes`` (``name →`` where it silently becomes another estimator)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}


_FAILURES = (ValueError, RuntimeError, NotImplementedError, TypeError, IndexError)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"failed: {type(err).__name__}: {text[0] if text else ''}"


def _plan(names: list[str], model, guide, batch, out: EstimatorComparison) -> list[str]:
    """The names that apply to the pair (one guide trace); the others go to ``out.skipped``."""
    sites = inspect_sites(model, guide, batch)
    runnable = []
    for name in names:
        reason, notes = applicability(ESTIMATORS[name], sites)
        if reason:
            out.skipped[name] = reason
            continue
        out.notes[name] = notes
        runnable.append(name)
    return runnable


def compare_estimators(model, guide, batch, estimators: Sequence[str] = tuple(ESTIMATORS), *,
                       num_draws: int = 200, num_particles: int = DEFAULT_IWAE_PARTICLES,
                       groups=None, seed: int = 0, progress: bool = False,
                       warmup: int | None = None) -> EstimatorComparison:
    """:func:`gradient_stats` of each named estimator that applies to the pair, on the same
    batch and parameters (multi-sample ones use ``num_particles``; baselines get their spec's
    ``warmup`` draws, or ``warmup`` when given). Estimators that do not apply (or fail) are
    listed in ``.skipped`` with the reason instead of stopping the comparison; ``.notes`` says
    where one is another."""
    out = EstimatorComparison()
    for name in _plan(check_names(estimators), model, guide, batch, out):
        spec = ESTIMATORS[name]
        est = make_estimator(name, num_particles if spec.multi_sample else 1)
        if progress:
            print(f"  gradient stats: {name} ({num_draws} draws)", file=sys.stderr, flush=True)
        try:
            stats = gradient_stats(model, guide, batch, est, num_draws, groups=groups,
                                   warmup=spec.warmup if warmup is None else warmup, seed=seed)
        except _FAILURES as err:
            out.skipped[name] = _first_line(err)
            continue
        stats.extra.update(bound=spec.bound, biased=spec.biased, notes=out.notes[name])
        out[name] = stats
    return out


def compare_training(build: Callable[[], tuple], train_data, eval_batch,
                     estimators: Sequence[str] = tuple(ESTIMATORS), *, num_steps: int,
                     num_particles: int = DEFAULT_IWAE_PARTICLES, eval_every: int = 50,
                     seed: int = 0, progress: bool = False, **train_kwargs
                     ) -> EstimatorComparison:
    """Train a fresh ``build()`` pair with each estimator that applies for ``num_steps`` and
    record the held-out ELBO of ``eval_batch`` against steps and training seconds (the others
    are listed in ``.skipped``)."""
    out = EstimatorComparison()
    model, guide = build()
    for name in _plan(check_names(estimators), model, guide, eval_batch, out):
        spec = ESTIMATORS[name]
        if progress:
            print(f"  training: {name} ({num_steps} steps)", file=sys.stderr, flush=True)
        est = make_estimator(name, num_particles if spec.multi_sample else 1)
        try:
            out[name] = training_curve(name, build, train_data, eval_batch, est,
                                       num_steps=num_steps, eval_every=eval_every, seed=seed,
                                       **train_kwargs)
        except _FAILURES as err:
            out.skipped[name] = _first_line(err)
    return out
