"""The estimator lab's names: each estimator as an :class:`EstimatorSpec` (what it applies to,
its bound, whether it is biased) and :func:`make_estimator`, which builds a fresh ELBO from a
name. It knows only the ELBO classes, so that :func:`pyro_seqlatent.infer.make_elbo` (and
``train(elbo="vimco")``, ``--elbo vimco``) can build them by name;
:mod:`pyro_seqlatent.infer.estimators` re-exports it with the lab around it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro

from pyro_seqlatent.infer.estimators_discrete import (
    IWAEELBO,
    VIMCOELBO,
    ConcreteELBO,
    EnumELBO,
    LeaveOneOutELBO,
)
from pyro_seqlatent.infer.estimators_elbos import (
    BaselineScoreFunctionELBO,
    DReGELBO,
    ScoreFunctionELBO,
    StickingTheLandingELBO,
)


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
