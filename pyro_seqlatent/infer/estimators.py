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
``--pair my_module:make_pair`` (see ``docs/estimators.md``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
from torch.utils.data import DataLoader

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
from pyro_seqlatent.registry import CommandSpec, register_command

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
    "clear_average_baselines",
    "compare_estimators",
    "compare_training",
    "gradient_stats",
    "load_pair",
    "make_estimator",
    "parameter_groups",
    "run_comparison",
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


def _check_names(estimators: Sequence[str]) -> list[str]:
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
    for name in _check_names(estimators):
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
    for name in _check_names(estimators):
        spec = ESTIMATORS[name]
        if progress:
            print(f"  training: {name} ({num_steps} steps)", file=sys.stderr, flush=True)
        est = make_estimator(name, num_particles if spec.multi_sample else 1)
        out[name] = training_curve(name, build, train_data, eval_batch, est,
                                   num_steps=num_steps, eval_every=eval_every, seed=seed,
                                   **train_kwargs)
    return out


# ----------------------------------------------------------------------------- command line


def _parse_options(pairs: Sequence[str], defaults: dict) -> dict:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise ValueError(f"--option {item!r}: write KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.replace("-", "_")
        default = defaults.get(key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif default is not None and not isinstance(default, str):
            out[key] = type(default)(value)
        else:
            out[key] = value
    return out


def load_pair(target: str, options: dict | None = None) -> dict[str, Any]:
    """Import ``module:function`` and call it with ``options``; it returns ``(model, guide,
    train_dataset)`` or a dict with ``model``, ``guide``, ``train`` and optionally ``valid``,
    ``collate_fn`` and ``build`` (a function giving a fresh ``(model, guide)``)."""
    if ":" not in target:
        raise ValueError(f"--pair {target!r}: write module:function (e.g. mypkg.models:make)")
    module_name, func_name = target.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    finally:
        sys.path.pop(0)
    result = func(**(options or {}))
    if isinstance(result, (tuple, list)):
        if len(result) != 3:
            raise ValueError(f"{target} returned {len(result)} items; return (model, guide, "
                             "train_dataset) or a dict")
        result = {"model": result[0], "guide": result[1], "train": result[2]}
    missing = {"model", "guide", "train"} - set(result)
    if missing:
        raise ValueError(f"{target} must return model, guide and train; missing {sorted(missing)}")
    return dict(result)


def _setup(args) -> dict[str, Any]:
    """Model, guide, data and a fresh-pair builder from ``--model`` or ``--pair``."""
    if args.pair:
        setup = load_pair(args.pair, _parse_options(args.option, {}))
        if "build" not in setup:
            initial = copy.deepcopy((setup["model"], setup["guide"]))
            setup["build"] = lambda: copy.deepcopy(initial)
        setup["title"] = args.pair
        return setup
    from pyro_seqlatent.registry import get_model

    spec = get_model(args.model)
    options = spec.options(**_parse_options(args.option, spec.defaults))
    data = spec.datasets(options, args.data_root)
    model, guide = spec.build(options)
    return {"model": model, "guide": guide, "train": data["train"], "valid": data.get("valid"),
            "collate_fn": spec.collate_fn, "build": lambda: spec.build(options),
            "title": f"{args.model} ({', '.join(f'{k}={v}' for k, v in options.items())})",
            "train_defaults": spec.train_defaults}


def _first_batch(dataset, size: int, collate_fn):
    return next(iter(DataLoader(dataset, batch_size=min(size, len(dataset)), shuffle=False,
                                collate_fn=collate_fn)))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default="vae", help="a registered model (default: vae)")
    src.add_argument("--pair", default=None,
                     help="module:function returning (model, guide, train_dataset) or a dict")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="model option (repeatable), e.g. --option train_limit=5000")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS),
                        help=f"comma-separated subset of {','.join(ESTIMATORS)}")
    parser.add_argument("--num-draws", type=int, default=200,
                        help="gradient draws per estimator at the fixed checkpoint")
    parser.add_argument("--batch-size", type=int, default=100, help="data points per batch")
    parser.add_argument("--num-particles", type=int, default=DEFAULT_IWAE_PARTICLES,
                        help="K of the multi-sample bounds (iwae, dreg)")
    parser.add_argument("--run-dir", default=None,
                        help="take the checkpoint from this finished run (pyro-seqlatent train)")
    parser.add_argument("--pretrain-steps", type=int, default=300,
                        help="otherwise train this many Trace_ELBO steps to get the checkpoint")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="run mode: train a fresh pair this many steps with each estimator")
    parser.add_argument("--eval-every", type=int, default=50, help="run mode: steps between "
                        "evaluations of the held-out ELBO")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam)")
    parser.add_argument("--target-elbo", type=float, default=None,
                        help="ELBO level for 'steps/seconds to reach' (default: 90%% of the "
                        "best improvement)")
    parser.add_argument("--out", default="runs/estimators", help="output folder")
    parser.add_argument("--data-root", default=None, help="data folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)


def run_comparison(args) -> Path:
    """Everything ``compare-estimators`` does; returns the Markdown report's path."""
    names = _check_names([n.strip() for n in args.estimators.split(",") if n.strip()])
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    setup = _setup(args)
    model, guide = setup["model"], setup["guide"]
    collate_fn = setup.get("collate_fn")
    model.to(args.device)
    guide.to(args.device)
    if args.run_dir:
        from pyro_seqlatent.infer.train import restore_modules

        restore_modules(Path(args.run_dir) / "checkpoint.pt", model, guide,
                        map_location=args.device)
        where = f"checkpoint of run {args.run_dir}"
    elif args.pretrain_steps > 0:
        from pyro_seqlatent.infer import train

        train(model, guide, setup["train"], num_steps=args.pretrain_steps,
              batch_size=args.batch_size, lr=args.lr, collate_fn=collate_fn, progress=False,
              seed=args.seed, device=args.device,
              clip_norm=setup.get("train_defaults", {}).get("clip_norm"))
        where = f"after {args.pretrain_steps} Trace_ELBO steps (batch {args.batch_size})"
    else:
        where = "at initialization"
    from pyro_seqlatent.infer.batches import to_device

    held_out = setup.get("valid") or setup["train"]
    batch = to_device(_first_batch(held_out, args.batch_size, collate_fn), args.device)
    stats = compare_estimators(model, guide, batch, names, num_draws=args.num_draws,
                               num_particles=args.num_particles, seed=args.seed, progress=True)
    curves = None
    if args.train_steps > 0:
        curves = compare_training(setup["build"], setup["train"], batch, names,
                                  num_steps=args.train_steps, num_particles=args.num_particles,
                                  eval_every=args.eval_every, seed=args.seed, progress=True,
                                  batch_size=args.batch_size, lr=args.lr,
                                  collate_fn=collate_fn, device=args.device)
    notes = (f"Model: {setup['title']}. Parameters fixed {where}; {args.num_draws} independent "
             f"gradient draws per estimator on one held-out batch of {args.batch_size}; "
             f"IWAE/DReG with K = {args.num_particles}. Variance is the mean over the group's "
             "coordinates of the per-coordinate variance of one draw; SNR = |E g| / std g per "
             "coordinate. Times are wall-clock on this machine.")
    return write_report(args.out, "Gradient estimators", stats, curves, args.target_elbo, notes)


def _run(args) -> int:
    path = run_comparison(args)
    print(path.read_text())
    print(f"\nwritten: {path}", file=sys.stderr)
    return 0


register_command(CommandSpec(
    name="compare-estimators",
    help="compare ELBO gradient estimators (variance, SNR, ELBO vs time) on a model/guide pair",
    add_arguments=_add_arguments,
    run=_run,
))
