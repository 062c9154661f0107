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
from dataclasses import dataclass

import pyro

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


SITES = ("any", "reparameterizable", "discrete")


@dataclass(frozen=True)
class EstimatorSpec:
    r"""A named estimator: ``build(num_particles) -> ELBO``.

    :param sites: what it applies to: ``"any"`` guide site, ``"reparameterizable"`` sites only
        (refuses discrete ones), or ``"discrete"`` (needs a non-reparameterizable guide site;
        on an all-continuous guide it would equal another estimator).
    :param multi_sample: needs K > 1 particles (default K = 5).
    :param bound: ``"elbo"`` or ``"iwae"`` (the K-sample bound :math:`\mathbb E\log\frac1K
        \sum_k w_k`): what its mean gradient is the gradient of.
    :param biased: its mean is not the gradient of ``bound`` (the Concrete relaxation).
    :param warmup: draws that let a stateful baseline adapt before variance is measured.
    """

    name: str
    description: str
    build: Callable[[int], pyro.infer.ELBO]
    multi_sample: bool = False
    warmup: int = 0
    sites: str = "any"
    bound: str = "elbo"
    biased: bool = False


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
                                                               vectorize_particles=_vec(k)),
                      sites="reparameterizable"),
        EstimatorSpec("score", "score function (every guide site)",
                      lambda k: ScoreFunctionELBO(num_particles=k, vectorize_particles=_vec(k))),
        EstimatorSpec("score_avg_baseline", "score function + decaying-average baseline",
                      lambda k: BaselineScoreFunctionELBO("average", num_particles=k), warmup=50),
        EstimatorSpec("score_nn_baseline", "score function + neural baseline (NVIL-style)",
                      lambda k: BaselineScoreFunctionELBO("nn", num_particles=k), warmup=200),
        EstimatorSpec("stl", "sticking the landing",
                      lambda k: StickingTheLandingELBO(num_particles=k,
                                                       vectorize_particles=_vec(k)),
                      sites="reparameterizable"),
        EstimatorSpec("iwae", "IWAE bound (RenyiELBO alpha=0)",
                      lambda k: IWAEELBO(num_particles=k, vectorize_particles=_vec(k)),
                      multi_sample=True, sites="reparameterizable", bound="iwae"),
        EstimatorSpec("dreg", "IWAE bound, doubly-reparameterized gradient",
                      lambda k: DReGELBO(num_particles=k, vectorize_particles=_vec(k)),
                      multi_sample=True, sites="reparameterizable", bound="iwae"),
        EstimatorSpec("vimco", "IWAE bound, score function with VIMCO leave-one-out baselines",
                      lambda k: VIMCOELBO(num_particles=k), multi_sample=True,
                      sites="discrete", bound="iwae"),
        EstimatorSpec("reinforce_loo", "ELBO, score function with leave-one-out baselines "
                      "over K draws", lambda k: LeaveOneOutELBO(num_particles=k),
                      multi_sample=True, sites="discrete"),
        EstimatorSpec("concrete", "Concrete / Gumbel-softmax relaxation (biased), "
                      "temperature 0.5",
                      lambda k: ConcreteELBO(num_particles=k, vectorize_particles=_vec(k)),
                      sites="discrete", biased=True),
        EstimatorSpec("enum", "exact sum over discrete guide sites (TraceEnum_ELBO)",
                      lambda k: EnumELBO(num_particles=k, vectorize_particles=_vec(k)),
                      sites="discrete"),
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
