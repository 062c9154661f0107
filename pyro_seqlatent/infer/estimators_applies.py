"""Which estimators apply to a model/guide pair, read from one guide trace (and the model replayed
against it), and where an estimator silently becomes another one.

:func:`inspect_sites` sorts the guide's latent sites into reparameterizable ones, point
estimates, and non-reparameterizable ("discrete") ones (enumerable or not, relaxable or not),
and finds the reparameterizable sites without a registered KL to the model's site.
:func:`applicability` turns an :class:`~pyro_seqlatent.infer.estimators.EstimatorSpec` and that
inspection into ``(reason it does not apply or None, notes)``:

* ``sites="reparameterizable"`` (``analytic_kl``, ``stl``, ``iwae``, ``dreg``) does not apply
  when a guide site is not reparameterizable (Pyro's ``RenyiELBO(alpha=0)`` gives an
  identically zero guide gradient there; ``TraceMeanField_ELBO`` raises);
* ``sites="discrete"`` (``vimco``, ``reinforce_loo``, ``concrete``, ``enum``) does not apply
  when every guide site is reparameterizable (each would equal another estimator there);
  ``enum`` also needs enumerable supports and ``concrete`` Bernoulli / OneHotCategorical sites
  in guide and model;
* notes: ``reparam`` and ``score`` are the same score-function estimator at discrete sites;
  ``analytic_kl`` is a Monte-Carlo KL at sites without a registered KL (flow guides);
  ``concrete`` is biased.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import kl_divergence

from pyro_seqlatent.infer.batches import batch_args
from pyro_seqlatent.infer.estimators_discrete import (
    is_reparameterized,
    latent_sites,
    leaf_distribution,
)
from pyro_seqlatent.infer.estimators_sites import _is_point_estimate

__all__ = ["SiteInspection", "applicability", "inspect_sites"]

# what a "discrete" estimator equals on an all-reparameterizable guide
_EQUALS = {"vimco": "iwae", "reinforce_loo": "reparam with K draws", "concrete": "reparam",
           "enum": "reparam"}


@dataclass
class SiteInspection:
    """Latent guide sites by kind (names, in trace order) and ``types[name]`` the guide
    distribution's class name."""

    reparameterized: list[str] = field(default_factory=list)
    point_estimates: list[str] = field(default_factory=list)
    discrete: list[str] = field(default_factory=list)
    enumerable: list[str] = field(default_factory=list)
    relaxable: list[str] = field(default_factory=list)
    no_kl: list[str] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)

    def describe(self, names: list[str]) -> str:
        shown = ", ".join(f"{n!r} ({self.types[n]})" for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _relaxable(fn) -> bool:
    return isinstance(leaf_distribution(fn), (dist.Bernoulli, dist.OneHotCategorical))


def _has_kl(guide_fn, model_fn) -> bool:
    try:
        kl_divergence(guide_fn, model_fn)
    except (NotImplementedError, ValueError, RuntimeError):  # none registered, or unusable
        return False
    return True


def inspect_sites(model, guide, batch) -> SiteInspection:
    """Run the guide once and the model against it (RNG and param store untouched) and sort the
    guide's latent sites."""
    args, kwargs = batch_args(batch)
    with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
    out = SiteInspection()
    for name, site in latent_sites(guide_trace):
        fn = site["fn"]
        out.types[name] = type(leaf_distribution(fn)).__name__
        model_fn = model_trace.nodes[name]["fn"] if name in model_trace.nodes else None
        if _is_point_estimate(fn):
            out.point_estimates.append(name)
        elif is_reparameterized(fn):
            out.reparameterized.append(name)
            if model_fn is not None and not _has_kl(fn, model_fn):
                out.no_kl.append(name)
        else:
            out.discrete.append(name)
            if fn.has_enumerate_support:
                out.enumerable.append(name)
            if _relaxable(fn) and model_fn is not None and _relaxable(model_fn):
                out.relaxable.append(name)
    return out


def _reason(spec, sites: SiteInspection) -> str | None:
    if spec.sites == "reparameterizable" and sites.discrete:
        why = ("Pyro's RenyiELBO(alpha=0) gives an identically zero guide gradient there; "
               "'vimco' estimates the same K-sample bound" if spec.name == "iwae"
               else "it needs reparameterizable guide sites")
        return f"not reparameterizable: {sites.describe(sites.discrete)}; {why}"
    if spec.sites == "discrete" and not sites.discrete:
        same = _EQUALS.get(spec.name, "a pathwise estimator")
        return f"every guide site is reparameterizable: {spec.name} would equal {same} here"
    if spec.name == "enum":
        bad = [n for n in sites.discrete if n not in sites.enumerable]
        if bad:
            return (f"no enumerable support at {sites.describe(bad)} (a to_event vector of "
                    "binary units is not enumerable)")
    if spec.name == "concrete":
        bad = [n for n in sites.discrete if n not in sites.relaxable]
        if bad:
            return (f"no Concrete relaxation for {sites.describe(bad)} (guide and model sites "
                    "must be Bernoulli or OneHotCategorical)")
    return None


def _notes(spec, sites: SiteInspection) -> list[str]:
    notes = []
    if spec.name in ("reparam", "score") and sites.discrete:
        notes.append(f"score function at {sites.describe(sites.discrete)}: 'reparam' and "
                     "'score' are the same estimator there")
    if spec.name == "analytic_kl" and sites.no_kl:
        notes.append(f"Monte-Carlo KL at {sites.describe(sites.no_kl)} (no registered KL): "
                     "equals 'reparam' there")
    if spec.sites == "discrete" and sites.reparameterized and spec.name != "enum":
        notes.append(f"pathwise at the reparameterizable {sites.describe(sites.reparameterized)}")
    if spec.name == "enum" and sites.reparameterized:
        notes.append(f"Monte Carlo (pathwise) at {sites.describe(sites.reparameterized)}; "
                     "exact only at the discrete sites")
    if spec.biased:
        notes.append("biased: the gradient of a relaxed ELBO, not of the ELBO")
    return notes


def applicability(spec, sites: SiteInspection) -> tuple[str | None, list[str]]:
    """``(reason, notes)``: why ``spec`` does not apply to the inspected pair (``None`` if it
    does) and where it becomes another estimator."""
    return _reason(spec, sites), _notes(spec, sites)
