"""``pyro-seqlatent compare-estimators``: the estimator lab on a registered model or your own pair.

Builds the model/guide pair (a registered system via :mod:`pyro_seqlatent.registry`, or
``--pair module:function``), fixes its parameters (a finished run's checkpoint, a short
``Trace_ELBO`` pre-training by :func:`pyro_seqlatent.infer.train`, or the initialisation), then
measures the gradient variance and signal-to-noise ratio of every named estimator that applies
to the pair with :func:`pyro_seqlatent.infer.estimators.compare_estimators` and, in run mode,
trains a fresh pair with each (:func:`~pyro_seqlatent.infer.estimators.compare_training`); the
others are listed in the report with the reason (e.g. ``stl`` at a discrete site). The
estimators and their statistics are in :mod:`pyro_seqlatent.infer.estimators`; this module
only wires them to models, data and the command line (see ``docs/estimators.md``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
from torch.utils.data import DataLoader

from pyro_seqlatent.infer.estimators import (
    DEFAULT_IWAE_PARTICLES,
    ESTIMATORS,
    check_names,
    compare_estimators,
    compare_training,
    write_report,
)
from pyro_seqlatent.registry import CommandSpec, get_model, register_command

__all__ = ["load_pair", "run_comparison"]


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
                        help="K of the multi-sample estimators (iwae, dreg, vimco, "
                        "reinforce_loo)")
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
    names = check_names([n.strip() for n in args.estimators.split(",") if n.strip()])
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
             f"multi-sample estimators with K = {args.num_particles}. Estimators that do not "
             "apply to this model are listed under 'Not run' with the reason. Variance is the "
             "mean over the group's coordinates of the per-coordinate variance of one draw; "
             "SNR = |E g| / std g per coordinate. Times are wall-clock on this machine.")
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
