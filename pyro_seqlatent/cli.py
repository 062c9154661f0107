"""``pyro-seqlatent``: train, evaluate and sample any registered system, and run the demo.

This is the only module that wires models, data and inference together. Models register
themselves (:mod:`pyro_seqlatent.registry`); their options become flags automatically::

    pyro-seqlatent list
    pyro-seqlatent train vae --guide iaf --num-flows 4 --num-epochs 10 --run-dir runs/vae-iaf
    pyro-seqlatent evaluate runs/vae-iaf --num-samples 5000 --max-points 1000
    pyro-seqlatent sample runs/vae-iaf -n 64
    pyro-seqlatent demo --out runs/demo
    pyro-seqlatent train vrnn --nproc 4 --batch-size 64 --run-dir runs/vrnn-4   # 4 processes

``--nproc N`` re-launches the same command under ``torchrun --standalone --nproc_per_node N``
(one machine); for several machines run ``torchrun ... -m pyro_seqlatent.cli train ...`` yourself
(docs: "Training on many GPUs or machines").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_seqlatent.infer import ELBOS, TrainConfig, evaluate, load_run, train
from pyro_seqlatent.infer.run import RUN_CONFIG
from pyro_seqlatent.registry import ModelSpec, get_model, list_commands, list_models

# TrainConfig fields whose default is None: the type of their flag.
_NONE_TYPES = {
    "num_steps": int,
    "num_epochs": int,
    "clip_norm": float,
    "valid_every": int,
    "valid_max_batches": int,
    "early_stopping_patience": int,
    "checkpoint_every": int,
    "max_time_s": float,
    "lr_schedule": str,
    "pyro_validation": bool,
}
_SKIP_TRAIN_FIELDS = {"elbo_kwargs", "betas", "progress", "device", "seed", "elbo"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_options(group, defaults: dict[str, Any], types: dict[str, type] | None = None,
                 helps: dict[str, str] | None = None) -> None:
    for name, default in defaults.items():
        kind = type(default) if default is not None else (types or {}).get(name, str)
        text = f"{(helps or {}).get(name, '')} (default: {default})".strip()
        if kind is bool:
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(_flag(name), dest=name, type=kind, default=argparse.SUPPRESS,
                               metavar=kind.__name__.upper(), help=text)


def _train_defaults() -> dict[str, Any]:
    out = {}
    for f in fields(TrainConfig):
        if f.name in _SKIP_TRAIN_FIELDS:
            continue
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()
    return out


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where tensors live (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--data-root", default=None,
                        help="data folder (default: $PYRO_SEQLATENT_DATA)")


def _train_parser(spec: ModelSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"pyro-seqlatent train {spec.name}",
        description=spec.description or f"Train the registered model {spec.name!r} by SVI.",
    )
    _common(parser)
    parser.add_argument("--run-dir", default=None,
                        help="output folder (default: runs/<model>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument("--elbo", default=spec.elbo, choices=list(ELBOS), metavar="ELBO",
                        help=f"one of {', '.join(ELBOS)} (default: {spec.elbo})")
    parser.add_argument("--num-particles", type=int, default=1,
                        help="particles per ELBO estimate, vectorized (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine, launched with torchrun; "
                        "--batch-size is the global batch (default: 1)")
    defaults = {**_train_defaults(), **spec.train_defaults}
    taken = set(parser._option_string_actions) | {_flag(k) for k in defaults}
    clashes = sorted(k for k in spec.defaults if _flag(k) in taken)
    if clashes:
        raise ValueError(
            f"model {spec.name!r} has option(s) {clashes} whose flags are the trainer's own "
            f"({', '.join(_flag(k) for k in clashes)}); rename them in its ModelSpec.defaults "
            "(e.g. 'seed' -> 'data_seed')"
        )
    model_group = parser.add_argument_group(f"{spec.name} options")
    _add_options(model_group, spec.defaults, helps=spec.option_help)
    train_group = parser.add_argument_group("training options")
    _add_options(train_group, {k: v for k, v in defaults.items() if k in _train_defaults()},
                 _NONE_TYPES)
    return parser


def _check_resumed_options(run_dir: Path, name: str, options: dict) -> None:
    """Resuming continues the same model on the same data: refuse other model options."""
    from pyro_seqlatent.infer.train import CHECKPOINT

    path = run_dir / RUN_CONFIG
    if not (path.exists() and (run_dir / CHECKPOINT).exists()):
        return  # nothing to continue: a fresh run
    saved = json.loads(path.read_text())
    new = json.loads(json.dumps(options, default=str))
    old = saved.get("options", {})
    changed = sorted(k for k in old if k in new and old[k] != new[k])
    if saved.get("model", name) != name or changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise ValueError(
            f"resume: {run_dir} holds a {saved.get('model')!r} run with other options "
            f"({diffs or 'another model'}); resume it with its own options (config.json) or "
            "train in another folder")


def train_system(
    name: str,
    options: dict | None = None,
    run_dir: str | Path | None = None,
    *,
    data_root: str | None = None,
    resume: bool = False,
    **train_kwargs: Any,
):
    """Build the registered system ``name``, load its data and train it with :func:`train`.

    Writes ``config.json`` (model name and options) beside the trainer's files so that
    :func:`~pyro_seqlatent.infer.load_run` can rebuild it. Returns ``(result, model, guide,
    datasets)``.
    """
    spec = get_model(name)
    options = spec.options(**(options or {}))
    run_dir = Path(run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {**spec.train_defaults, **train_kwargs}
    pyro.clear_param_store()
    pyro.set_rng_seed(settings.get("seed", 0))
    datasets = spec.datasets(options, data_root)
    model, guide = spec.build(options)
    if resume:
        _check_resumed_options(run_dir, name, options)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        (run_dir / RUN_CONFIG).write_text(json.dumps(
            {"model": name, "options": options, "data_root": data_root}, indent=2, default=str))
    settings.setdefault("elbo", spec.elbo)
    result = train(model, guide, datasets["train"], valid_data=datasets.get("valid"),
                   collate_fn=spec.collate_fn, run_dir=run_dir, resume=resume, **settings)
    return result, model, guide, datasets


def _subset(data, max_points: int | None):
    from pyro_seqlatent.data.subsets import fixed_subset

    return fixed_subset(data, max_points)


def evaluate_run(run_dir: str | Path, *, split: str = "test", num_samples: int = 1000,
                 max_points: int | None = None, batch_size: int = 100, device: str = "cpu",
                 data_root: str | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Importance-sampled log-likelihood and ELBO of a trained run on one split."""
    run = load_run(run_dir, device=device)
    data = _subset(run.datasets(data_root)[split], max_points)
    spec = run.spec
    out = evaluate(run.model, run.guide, data, num_samples=num_samples, batch_size=batch_size,
                   collate_fn=spec.collate_fn, batch_plate=spec.batch_plate, device=device,
                   seed=seed, progress=progress)
    return {k: v for k, v in out.items() if not k.endswith("per_point")}


def _cmd_list(args) -> int:
    for name in list_models():
        spec = get_model(name)
        print(f"{name:16s} {spec.description}")
    return 0


def _cmd_train(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        models = ", ".join(list_models())
        print("usage: pyro-seqlatent train MODEL [options]   (pyro-seqlatent train MODEL --help)")
        print(f"registered models: {models}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    spec = get_model(argv[0])
    args = vars(_train_parser(spec).parse_args(argv[1:]))
    nproc = args.pop("nproc")
    if nproc < 1:
        print(f"pyro-seqlatent: error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # re-launch under torchrun
        run_dir = args["run_dir"] or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return subprocess.call(torchrun_command(argv, nproc, run_dir))
    options = {k: args.pop(k) for k in list(args) if k in spec.defaults}
    train_kwargs = {k: args.pop(k) for k in list(args) if k in _train_defaults()}
    num_particles = args.pop("num_particles")
    elbo_kwargs = {"num_particles": num_particles} if num_particles > 1 else {}
    if num_particles > 1:
        elbo_kwargs["vectorize_particles"] = True
    result, *_ = train_system(
        spec.name, options, args["run_dir"], data_root=args["data_root"], resume=args["resume"],
        elbo=args["elbo"], elbo_kwargs=elbo_kwargs, device=args["device"], seed=args["seed"],
        progress=not args["no_progress"], **train_kwargs,
    )
    from pyro_seqlatent.infer.distributed import shutdown, world

    if world()[0] == 0:
        print(json.dumps({"run_dir": str(result.run_dir), "steps": result.step,
                          "final_loss": result.final_loss, "best_valid": result.best_valid,
                          "stopped": result.stopped, "wall_time_s": round(result.wall_time_s, 1),
                          "processes": world()[1]}))
    shutdown()
    return 0


def torchrun_command(argv: list[str], nproc: int, run_dir: str) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m pyro_seqlatent.cli
    train MODEL ...`` for ``train`` arguments ``argv`` (``--nproc`` removed, ``--run-dir`` fixed
    so that every process writes to, and resumes from, the same folder)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc" or arg == "--run-dir":
            skip = True
        elif not arg.startswith(("--nproc=", "--run-dir=")):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "pyro_seqlatent.cli", "train", *rest,
            "--run-dir", str(run_dir)]


def _cmd_evaluate(args) -> int:
    out = evaluate_run(args.run_dir, split=args.split, num_samples=args.num_samples,
                       max_points=args.max_points, batch_size=args.batch_size,
                       device=args.device, data_root=args.data_root, seed=args.seed,
                       progress=True)
    path = Path(args.run_dir) / f"eval_{args.split}_K{args.num_samples}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _cmd_sample(args) -> int:
    run = load_run(args.run_dir, device=args.device)
    if run.spec is None or run.spec.generate is None:
        print(f"model {run.extra.get('model')!r} has no generator", file=sys.stderr)
        return 2
    pyro.set_rng_seed(args.seed)
    with torch.no_grad():
        samples = run.spec.generate(run.model, args.num_samples, run.options)
    out = Path(args.out or Path(args.run_dir) / "samples.pt")
    torch.save(samples, out)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    from pyro_seqlatent.experiments.report import run_demo

    run_demo(Path(args.out), models=args.models, data_root=args.data_root, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-seqlatent",
        description="Deep latent-variable models of sequences and densities on Pyro: train, "
        "evaluate and sample any registered model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the registered models")
    sub.add_parser("train", help="train a model: pyro-seqlatent train MODEL --help",
                   add_help=False)
    ev = sub.add_parser("evaluate", help="importance-sampled log p(x) and ELBO of a run")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"],
                    help="which split (default: test)")
    ev.add_argument("--num-samples", type=int, default=1000,
                    help="importance samples K per data point (default: 1000)")
    ev.add_argument("--max-points", type=int, default=None,
                    help="a fixed random subset of N points of the split, the same on every "
                    "call (data.subsets.fixed_subset; default: all)")
    ev.add_argument("--batch-size", type=int, default=100, help="(default: 100)")
    _common(ev)
    sa = sub.add_parser("sample", help="draw from a trained model's generative process")
    sa.add_argument("run_dir")
    sa.add_argument("-n", "--num-samples", type=int, default=16)
    sa.add_argument("--out", default=None, help="output .pt file (default: RUN_DIR/samples.pt)")
    _common(sa)
    de = sub.add_parser("demo", help="short end-to-end training of every system + a report")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--models", nargs="*", default=None, help="only these models")
    _common(de)
    for name, command in sorted(list_commands().items()):
        extra = sub.add_parser(name, help=command.help)
        command.add_arguments(extra)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pyro_seqlatent.data.root import DataNotFoundError
    from pyro_seqlatent.infer import TrainingDiverged

    try:
        return _main(argv)
    except (DataNotFoundError, TrainingDiverged) as err:
        print(f"pyro-seqlatent: error: {err}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _cmd_train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"list": _cmd_list, "evaluate": _cmd_evaluate, "sample": _cmd_sample,
                "demo": _cmd_demo}
    if args.command in handlers:
        return handlers[args.command](args)
    return list_commands()[args.command].run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
