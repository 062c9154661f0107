"""``pyro-seqlatent``: train, evaluate and sample any registered system, and run the demo.

This module only parses the command line and dispatches; the work is done by
:mod:`pyro_seqlatent.experiments` (:mod:`~pyro_seqlatent.experiments.systems`: train, evaluate,
sample; :mod:`~pyro_seqlatent.experiments.launch`: ``--nproc``). Models register themselves
(:mod:`pyro_seqlatent.registry`); their options become flags automatically::

    pyro-seqlatent list
    pyro-seqlatent train vae --guide iaf --num-flows 4 --num-epochs 10 --run-dir runs/vae-iaf
    pyro-seqlatent train vae --num-steps 100 --option weight_decay=1e-4 --option ema_decay=0.99
    pyro-seqlatent train vae --num-steps 100 --train-options '{"lr_schedule": "cosine"}'
    pyro-seqlatent train vae --help-all          # every option and training setting
    pyro-seqlatent evaluate runs/vae-iaf --num-samples 5000 --max-points 1000
    pyro-seqlatent sample runs/vae-iaf -n 64
    pyro-seqlatent demo --out runs/demo
    pyro-seqlatent train vrnn --nproc 4 --batch-size 64 --run-dir runs/vrnn-4   # 4 processes
    pyro-seqlatent --import my_models train dmm --num-steps 100   # a model of your own module
    pyro-seqlatent train vae --data images.npz --num-steps 1000   # your own data (own-data.md)

``train MODEL --help`` shows the model's options and the dozen training settings people use;
every other setting of :func:`pyro_seqlatent.infer.config.settings` is reachable through
``--option KEY=VALUE`` (repeatable), ``--train-options JSON`` or its own (unlisted) flag, and
``--help-all`` lists them all. ``--nproc N`` re-launches the same command under ``torchrun
--standalone --nproc_per_node N`` (one machine); for several machines run ``torchrun ... -m
pyro_seqlatent.cli train ...`` yourself (docs: "Training on many GPUs or machines").
``--import MODULE_OR_PATH`` (repeatable, before the command; or ``$PYRO_SEQLATENT_IMPORT``)
imports a module that registers its own models, a dotted name or a ``.py`` file
(:func:`pyro_seqlatent.registry.import_user_modules`; docs/own-model.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any

from pyro_seqlatent.infer.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig, settings
from pyro_seqlatent.infer.elbos import ELBOS, lab_estimators
from pyro_seqlatent.registry import (
    IMPORT_ENV,
    ModelSpec,
    UserModuleError,
    get_model,
    import_user_modules,
    list_commands,
    list_models,
)

#: the training settings ``train MODEL --help`` shows, by help group; every other setting keeps
#: an unlisted flag and is reachable through ``--option`` / ``--train-options``
SHOWN_SETTINGS = {
    "length and budget": ("num_steps", "num_epochs", "max_time_s"),
    "optimisation": ("elbo", "lr", "batch_size", "clip_norm"),
    "output: run folder and validation": ("valid_every",),
    "where it runs": ("device", "seed"),
}
_SETTING_CHOICES = {
    "elbo": list(ELBOS) + list(lab_estimators()),
    "optimizer": sorted(OPTIMIZERS),
    "lr_schedule": [s for s in LR_SCHEDULES if s is not None],
    "time_budget": ["wall", "process"],
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_EPILOG = """\
Every other training setting (weight_decay, lr_schedule, kl_anneal_steps, ema_decay,
checkpoint_every, ...) and every model option can be set with --option KEY=VALUE (repeatable;
VALUE is read as JSON when it parses, else as a string) or with --train-options JSON (an object
of training settings, e.g. '{"lr_schedule": "cosine"}'). Precedence: --train-options, then
--option, then the named flags. The full list with groups, defaults and help:
`pyro-seqlatent train %(model)s --help-all`, or docs/api.md ("Training settings")."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_value(text: str) -> Any:
    """``text`` as JSON when it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _setting_kind(setting) -> type | Any:
    """The type of a training setting's flag (``_json_value`` for dicts, tuples, ...)."""
    if setting.default is not None and type(setting.default) in _TYPES.values():
        return type(setting.default)
    return _TYPES.get(str(setting.type).split("|")[0].strip(), _json_value)


def _train_defaults(spec: ModelSpec) -> dict[str, Any]:
    """Every training setting's default for ``spec`` (its ``train_defaults`` and ELBO over the
    trainer's own)."""
    out = {name: s.default for name, s in settings().items()}
    return {**out, **spec.train_defaults, "elbo": spec.elbo}


def _help(text: str, default: Any, choices: list | None = None) -> str:
    one_of = f" {{{', '.join(map(str, choices))}}}" if choices else ""
    shown = "none" if default is None else default
    return f"{text}{one_of} (default: {shown})".replace("%", "%%")


def _add_flag(group, name: str, kind: Any, text: str, choices: list | None = None) -> None:
    if kind is bool:
        group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)
        return
    metavar = "JSON" if kind is _json_value else kind.__name__.upper()
    group.add_argument(_flag(name), dest=name, type=kind, default=argparse.SUPPRESS,
                       choices=choices, metavar=metavar, help=text)


def _add_model_options(parser: argparse.ArgumentParser, spec: ModelSpec) -> None:
    """The model's options, in its ``option_groups`` (the rest under "<name> options")."""
    titles = {k: title for title, names in spec.option_groups.items() for k in names}
    groups: dict[str, Any] = {}
    for name, default in spec.defaults.items():
        title = f"{spec.name} options" + (f": {titles[name]}" if name in titles else "")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        choices = spec.option_choices.get(name)
        _add_flag(groups[title], name, type(default),
                  _help(spec.option_help.get(name, ""), default, choices), choices)


def _add_settings(parser: argparse.ArgumentParser, spec: ModelSpec) -> dict[str, Any]:
    """Every training setting as a flag: those of :data:`SHOWN_SETTINGS` in their help groups,
    the others unlisted. Returns the help groups by title."""
    groups = {title: parser.add_argument_group(title) for title in SHOWN_SETTINGS}
    shown = {name: title for title, names in SHOWN_SETTINGS.items() for name in names}
    defaults, known = _train_defaults(spec), settings()
    for name in [*shown, *(k for k in known if k not in shown)]:
        setting, choices = known[name], _SETTING_CHOICES.get(name)
        if name in shown:
            group = groups[shown[name]]
            text = _help(setting.help, defaults[name], choices)
        else:
            group, text = parser, argparse.SUPPRESS
        _add_flag(group, name, _setting_kind(setting), text, choices)
    return groups


def _add_run_flags(groups: dict[str, Any]) -> None:
    """The flags of ``train`` that are no training setting."""
    groups["optimisation"].add_argument(
        "--num-particles", type=int, default=argparse.SUPPRESS, metavar="INT",
        help="particles per ELBO estimate, vectorized (default: 1)")
    out = groups["output: run folder and validation"]
    out.add_argument("--run-dir", default=None,
                     help="output folder (default: runs/<model>-<date>-<time>)")
    out.add_argument("--resume", action="store_true",
                     help="continue from RUN_DIR/checkpoint.pt (default: a fresh run)")
    where = groups["where it runs"]
    where.add_argument("--data-root", default=None,
                       help="data folder (default: $PYRO_SEQLATENT_DATA)")
    where.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="data-parallel processes on this machine, launched with torchrun; "
                       "--batch-size is the global batch (default: 1)")


class _HelpAll(argparse.Action):
    """``--help-all``: print every model option and training setting, then exit."""

    def __init__(self, option_strings, dest, spec: ModelSpec, **kwargs):
        self.spec = spec
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(describe_all(self.spec))
        parser.exit()


def _check_clashes(spec: ModelSpec, parser: argparse.ArgumentParser) -> None:
    taken = set(parser._option_string_actions) | {_flag(k) for k in settings()}
    clashes = sorted(k for k in spec.defaults if _flag(k) in taken or k in settings())
    if clashes:
        raise ValueError(
            f"model {spec.name!r} has option(s) {clashes} whose flags are the trainer's own "
            f"({', '.join(_flag(k) for k in clashes)}); rename them in its ModelSpec.defaults "
            "(e.g. 'seed' -> 'data_seed')"
        )


def _train_parser(spec: ModelSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"pyro-seqlatent train {spec.name}",
        usage=f"pyro-seqlatent train {spec.name} [options]",
        description=textwrap.fill(spec.description
                                  or f"Train the registered model {spec.name!r} by SVI.", 79),
        epilog=_EPILOG % {"model": spec.name},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _check_clashes(spec, parser)
    _add_model_options(parser, spec)
    groups = _add_settings(parser, spec)
    _add_run_flags(groups)
    other = parser.add_argument_group("every other setting")
    other.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="set any model option or training setting by name (repeatable)")
    other.add_argument("--train-options", default=None, metavar="JSON",
                       help="a JSON object of training settings")
    other.add_argument("--help-all", action=_HelpAll, spec=spec,
                       help="list every model option and training setting and exit")
    return parser


def describe_all(spec: ModelSpec) -> str:
    """What ``train MODEL --help-all`` prints: every model option and every training setting
    with its group, default (``spec``'s own where it sets one) and help text."""
    lines = [f"pyro-seqlatent train {spec.name}: every option. Set any of them with --option "
             "KEY=VALUE or its flag (--key-name VALUE); training settings also with "
             "--train-options JSON.", "", f"{spec.name} options:"]
    for name, default in spec.defaults.items():
        choices = spec.option_choices.get(name)
        text = spec.option_help.get(name, "") + (f" {{{', '.join(map(str, choices))}}}"
                                                 if choices else "")
        lines.append(f"  {name} = {default!r}: {text}")
    defaults = _train_defaults(spec)
    for group, names in _by_group().items():
        lines += ["", f"training settings, group {group!r} (pyro_seqlatent.infer.config):"]
        for name in names:
            setting = settings()[name]
            lines.append(f"  {name} = {defaults[name]!r}: {setting.help}")
    return "\n".join(lines)


def _by_group() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, setting in settings().items():
        out.setdefault(setting.group, []).append(name)
    return out


def settings_markdown() -> str:
    """The table of every training setting in ``docs/api.md`` ("Training settings")."""
    shown = {name for names in SHOWN_SETTINGS.values() for name in names}
    rows = ["| setting | group | default | shown by `--help` | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for name, s in settings().items():
        flag = f"`{_flag(name)}`" if name in shown else "–"
        rows.append(f"| `{name}` | {s.group} | `{s.default!r}` | {flag} | {s.help} |")
    return "\n".join(rows)


def _option_value(text: str, kind: Any) -> Any:
    """An ``--option`` value for a setting or option of type ``kind``."""
    if kind is bool and text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    if kind is str:
        return None if text in ("null", "None") else text
    value = _json_value(text)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_options(parser, spec: ModelSpec, pairs: list[str]) -> tuple[dict, dict]:
    """``--option KEY=VALUE`` pairs as ``(model options, training settings)``."""
    options, train_settings = {}, {}
    known = settings()
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            parser.error(f"--option {pair!r}: use KEY=VALUE")
        if key in spec.defaults:
            options[key] = _option_value(text, type(spec.defaults[key]))
        elif key in known:
            train_settings[key] = _option_value(text, _setting_kind(known[key]))
        else:
            parser.error(f"--option {key}: not an option of {spec.name!r} nor a training "
                         f"setting; `pyro-seqlatent train {spec.name} --help-all` lists them")
    return options, train_settings


def _parse_train_options(parser, spec: ModelSpec, text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"--train-options: not JSON ({err}); e.g. '{{\"lr_schedule\": \"cosine\"}}'")
    if not isinstance(value, dict):
        parser.error(f"--train-options: a JSON object of training settings, got {text!r}")
    unknown = sorted(set(value) - set(settings()))
    if unknown:
        hint = " (model options: use --option KEY=VALUE)" if set(unknown) & set(spec.defaults) \
            else ""
        parser.error(f"--train-options: {unknown} are not training settings{hint}; known: "
                     f"{sorted(settings())}")
    return value


def _train_arguments(parser, spec: ModelSpec, args: dict) -> tuple[dict, dict]:
    """``(model options, training settings)`` of parsed ``train`` arguments: --train-options,
    then --option, then the named flags; both checked here so that a mistake is a usage error."""
    from_json = _parse_train_options(parser, spec, args.pop("train_options"))
    options, from_pairs = _parse_options(parser, spec, args.pop("option"))
    options.update({k: args.pop(k) for k in list(args) if k in spec.defaults})
    train_settings = {**from_json, **from_pairs,
                      **{k: args.pop(k) for k in list(args) if k in settings()}}
    particles = args.pop("num_particles", 1)
    if particles > 1:
        train_settings["elbo_kwargs"] = {**train_settings.get("elbo_kwargs", {}),
                                         "num_particles": particles, "vectorize_particles": True}
    try:
        spec.options(**options)
        TrainConfig(**{**_train_defaults(spec), **train_settings}).validate()
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    return options, train_settings


def _train_usage(argv: list[str]) -> int:
    print("usage: pyro-seqlatent train MODEL [options]   (pyro-seqlatent train MODEL --help)")
    print(f"registered models: {', '.join(list_models())}")
    return 0 if argv and argv[0] in ("-h", "--help") else 2


def _refuse_data_flag(parser, spec: ModelSpec, argv: list[str]) -> None:
    """``--data FILE`` (docs/own-data.md) for a system without the ``data`` option: a usage
    error naming the systems that take one (argparse would read it as an abbreviation)."""
    if "data" in spec.defaults or not any(a == "--data" or a.startswith("--data=")
                                          for a in argv):
        return
    takers = [name for name in list_models() if "data" in get_model(name).defaults]
    parser.error(f"--data: {spec.name!r} does not train on your own files; the systems that "
                 f"do: {', '.join(takers)} (docs/own-data.md)")


def _cmd_train(argv: list[str]) -> int:
    from pyro_seqlatent.experiments.launch import relaunch
    from pyro_seqlatent.experiments.systems import default_run_dir, run_summary, train_system
    from pyro_seqlatent.parallel import shutdown, world

    if not argv or argv[0].startswith("-"):
        return _train_usage(argv)
    spec = get_model(argv[0])
    parser = _train_parser(spec)
    _refuse_data_flag(parser, spec, argv[1:])
    args = vars(parser.parse_args(argv[1:]))
    nproc = args.pop("nproc")
    if nproc < 1:
        parser.error(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # re-launch under torchrun
        return relaunch(argv, nproc, args["run_dir"] or default_run_dir(spec.name))
    options, train_settings = _train_arguments(parser, spec, args)
    result, *_ = train_system(spec.name, options, args["run_dir"], data_root=args["data_root"],
                              resume=args["resume"], **train_settings)
    if world()[0] == 0:
        print(json.dumps(run_summary(result)))
    shutdown()
    return 0


def _cmd_list(args) -> int:
    for name in list_models():
        spec = get_model(name)
        print(f"{name:16s} {spec.description}")
    return 0


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from pyro_seqlatent.experiments.systems import evaluate_run

    out = evaluate_run(args.run_dir, split=args.split, num_samples=args.num_samples,
                       max_points=args.max_points, batch_size=args.batch_size,
                       device=args.device, data_root=args.data_root, seed=args.seed,
                       progress=True, data=args.data)
    source = f"{Path(args.data).stem}_" if args.data else ""
    path = Path(args.run_dir) / f"eval_{source}{args.split}_K{args.num_samples}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _cmd_sample(args) -> int:
    from pyro_seqlatent.experiments.systems import sample_run
    from pyro_seqlatent.infer.checkpoint import RunFileError

    try:
        path = sample_run(args.run_dir, args.num_samples, out=args.out, seed=args.seed,
                          device=args.device)
    except ValueError as err:
        if isinstance(err, RunFileError):
            raise
        print(f"pyro-seqlatent: error: sample {args.run_dir}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_demo(args) -> int:
    from pathlib import Path

    from pyro_seqlatent.experiments.report import run_demo

    run_demo(Path(args.out), models=args.models, data_root=args.data_root, device=args.device)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where tensors live (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--data-root", default=None,
                        help="data folder (default: $PYRO_SEQLATENT_DATA)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-seqlatent",
        description="Deep latent-variable models of sequences and densities on Pyro: train, "
        "evaluate and sample any registered model.",
    )
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE_OR_PATH",
                        help="before the command: import a module that registers models "
                        "(register_model(ModelSpec(...))), a dotted name or a .py file; "
                        f"repeatable; also read from ${IMPORT_ENV} (separated by "
                        f"{os.pathsep!r})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the registered models")
    sub.add_parser("train", help="train a model: pyro-seqlatent train MODEL --help",
                   add_help=False)
    ev = sub.add_parser("evaluate", help="importance-sampled log p(x) and ELBO of a run")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test", "all"],
                    help="which split, or all three (default: test)")
    ev.add_argument("--data", default=None, metavar="FILE",
                    help="score this file of yours instead of the run's data, read as the "
                    "run's own (docs/own-data.md); writes eval_<file>_<split>_K<n>.json")
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
    from pyro_seqlatent.infer.checkpoint import RunFileError

    try:
        return _main(argv)
    except (DataNotFoundError, TrainingDiverged, RunFileError, UserModuleError) as err:
        print(f"pyro-seqlatent: error: {err}", file=sys.stderr)
        return 2


def _leading_imports(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(modules, rest)``: the ``--import MODULE`` / ``--import=MODULE`` options before the
    command, and the arguments after them."""
    modules = []
    while argv and (argv[0] == "--import" or argv[0].startswith("--import=")):
        if argv[0] == "--import":
            if len(argv) < 2 or argv[1].startswith("-"):
                raise UserModuleError("--import needs a module name or a .py file path")
            modules.append(argv[1])
            argv = argv[2:]
        else:
            modules.append(argv[0].partition("=")[2])
            argv = argv[1:]
    return modules, argv


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules, argv = _leading_imports(argv)
    import_user_modules(modules)
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
