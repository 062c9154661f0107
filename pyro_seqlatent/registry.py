"""The model registry: systems register themselves, the CLI and ``load_run`` look them up.

A *system* is everything the command line needs to train, evaluate and sample one model family
on its data, without any model-specific code in the CLI or the trainer::

    from pyro_seqlatent.registry import ModelSpec, register_model

    register_model(ModelSpec(
        name="vae",
        build=build_vae,            # build(options: dict) -> (model, guide), both nn.Modules
        datasets=vae_datasets,      # datasets(options, root) -> {"train", "valid", "test"}
        defaults={"latent_dim": 40, "guide": "meanfield"},
    ))

Every key of ``defaults`` becomes a command-line flag (``--latent-dim 40``) typed from its default.
Modules under :mod:`pyro_seqlatent.models` are imported by :func:`load_builtin_models`, so adding a
model file is enough to register it; third-party packages can register through the entry-point
group ``pyro_seqlatent.models``, and a user module that is no package is imported by
``pyro-seqlatent --import my_models`` (or ``$PYRO_SEQLATENT_IMPORT``; :func:`import_user_modules`).
Extra subcommands and demo sections (:func:`register_command`,
:func:`register_demo_section`) come from the experiment drivers under
:mod:`pyro_seqlatent.experiments`, imported by :func:`load_experiments` when they are listed.
The registry imports both packages only inside those functions, never at import time, so the
modules that register with it can import it at their top.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset


@dataclass
class ModelSpec:
    """How to build, feed, train and sample one registered system.

    :param name: registry key, used on the command line.
    :param build: ``build(options) -> (model, guide)``; both must be ``nn.Module`` (or
        ``PyroModule``) so the trainer sees their parameters. ``model(*batch)`` /
        ``guide(*batch)`` are called with the collated batch (a tuple is splatted, a dict passed
        as keywords, a tensor passed as the single argument).
    :param datasets: ``datasets(options, root) -> {"train", "valid", "test"}`` torch Datasets;
        ``root`` is the data root (``None`` means ``$PYRO_SEQLATENT_DATA``).
    :param defaults: model/data options with their defaults; they become CLI flags.
    :param collate_fn: DataLoader collate function (default: torch's).
    :param elbo: default ELBO name (any of :data:`pyro_seqlatent.infer.ELBOS`, or of the
        estimator lab such as ``"vimco"``).
    :param batch_plate: name of the plate over data points (used by ``log_marginal``).
    :param generate: ``generate(model, num_samples, options) -> Tensor`` for ``sample``.
    :param train_defaults: defaults for :func:`pyro_seqlatent.infer.train` (lr, batch_size, ...).
    :param demo: overrides (options and train settings) for the short run of ``make demo``.
    :param plot: ``plot(model, guide, datasets, options, out_dir) -> list[path]`` figures for the
        report.
    :param description: one line for ``pyro-seqlatent list`` and ``--help``.
    :param option_help: help text of each option (shown by ``--help``).
    :param option_choices: the allowed values of the options that take one of a fixed set
        (the command line offers them as ``choices``; :meth:`options` refuses any other value).
    :param option_groups: ``{title: [option, ...]}``: how ``--help`` groups the options (e.g.
        data / networks / solver); options in no group are shown under "<name> options".
    """

    name: str
    build: Callable[[dict], tuple[nn.Module, nn.Module]]
    datasets: Callable[[dict, Any], dict[str, Dataset]]
    defaults: dict[str, Any] = field(default_factory=dict)
    collate_fn: Callable | None = None
    elbo: str = "Trace_ELBO"
    batch_plate: str = "data"
    generate: Callable | None = None
    train_defaults: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    plot: Callable | None = None
    description: str = ""
    option_help: dict[str, str] = field(default_factory=dict)
    option_choices: dict[str, list] = field(default_factory=dict)
    option_groups: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        grouped = [k for names in self.option_groups.values() for k in names]
        for what, keys in (("option_help", self.option_help),
                           ("option_choices", self.option_choices),
                           ("option_groups", grouped)):
            unknown = set(keys) - set(self.defaults)
            if unknown:
                raise ValueError(f"model {self.name!r}: {what} names {sorted(unknown)}, which "
                                 f"are not options; known options: {sorted(self.defaults)}")
        self._check_choices(self.defaults, "default ")

    def options(self, **overrides) -> dict:
        """The defaults updated with ``overrides``; an unknown key, or a value outside an
        option's ``option_choices``, raises a ``ValueError`` naming it."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"model {self.name!r} has no option(s) {sorted(unknown)}; "
                f"known options: {sorted(self.defaults)}"
            )
        self._check_choices(overrides)
        return {**self.defaults, **overrides}

    def _check_choices(self, values: dict, what: str = "") -> None:
        for key, value in values.items():
            choices = self.option_choices.get(key)
            if choices is not None and value not in choices:
                raise ValueError(f"model {self.name!r}: {what}option {key} must be one of "
                                 f"{list(choices)}, got {value!r}")


_REGISTRY: dict[str, ModelSpec] = {}
_LOADED = False
_EXPERIMENTS_LOADED = False


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (re-registering a name replaces it) and return it."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model expects a ModelSpec, got {type(spec).__name__}")
    _REGISTRY[spec.name] = spec
    return spec


def load_builtin_models() -> None:
    """Import every module under :mod:`pyro_seqlatent.models` and entry-point plugins once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import pyro_seqlatent.models as pkg

    _import_submodules(pkg)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="pyro_seqlatent.models"):
            ep.load()
    except Exception:  # pragma: no cover - a broken third-party plugin must not break ours
        pass


#: environment variable naming user modules to import (``os.pathsep``-separated), as ``--import``
IMPORT_ENV = "PYRO_SEQLATENT_IMPORT"


class UserModuleError(ImportError):
    """A user module named by ``--import`` or :data:`IMPORT_ENV` could not be imported."""


def import_user_modules(names: Sequence[str] = (), *, from_env: bool = True,
                        export: bool = True) -> list:
    """Import the user modules that register models (``register_model(ModelSpec(...))``), so
    the ``pyro-seqlatent`` command sees a model that is not an installed package:
    ``pyro-seqlatent --import my_models train dmm``.

    :param names: each a dotted module name importable from ``sys.path`` (the current folder
        included, as with ``python -m``) or the path of a ``.py`` file (imported under its
        stem, e.g. ``my_models``).
    :param from_env: also import the modules named in :data:`IMPORT_ENV`
        (``os.pathsep``-separated), before ``names``.
    :param export: add ``names`` to :data:`IMPORT_ENV` (files as absolute paths), so the
        processes this one starts (``--nproc``'s torchrun workers) import them too.
    :returns: the imported modules, each once.
    :raises UserModuleError: naming the module that could not be found or that failed while
        importing (with the error it raised).
    """
    import os

    env = [n for n in os.environ.get(IMPORT_ENV, "").split(os.pathsep) if n.strip()]
    wanted = [*(env if from_env else []), *names]
    modules = []
    for name in dict.fromkeys(n.strip() for n in wanted):
        module = _import_user_module(name)
        if module not in modules:
            modules.append(module)
    if export and names:
        given = [str(os.path.abspath(n)) if _is_path(n) else n for n in names]
        os.environ[IMPORT_ENV] = os.pathsep.join(dict.fromkeys([*env, *given]))
    return modules


def _is_path(name: str) -> bool:
    import os

    return name.endswith(".py") or os.sep in name or (os.altsep or os.sep) in name


def _import_user_module(name: str):
    import importlib.util
    import os
    import sys
    from pathlib import Path

    if not _is_path(name):
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does; console scripts do not
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name) \
                    and (err.name == name or name.startswith(err.name + ".")):
                raise UserModuleError(
                    f"--import {name}: no module named {err.name!r} on sys.path (the current "
                    f"folder included); give a dotted module name or the path of a .py "
                    "file") from None
            raise UserModuleError(f"--import {name}: importing it failed: {err!r}") from err
        except Exception as err:  # the user's module raised while it ran
            raise UserModuleError(f"--import {name}: importing it failed: {err!r}") from err
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise UserModuleError(f"--import {name}: no such file ({path})")
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
            return module  # imported already (by name or path)
    module_name = path.stem if path.stem not in sys.modules else f"_user_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserModuleError(f"--import {name}: not a Python module (use a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise UserModuleError(f"--import {name}: importing it failed: {err!r}") from err
    return module


def _import_submodules(pkg) -> None:
    """Import every public module (name not starting with ``_``) of the package ``pkg``."""
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def load_experiments() -> None:
    """Import every module under :mod:`pyro_seqlatent.experiments` once: experiment drivers
    register their subcommands and demo sections when imported (the registry names none of
    them, so adding a driver file is enough)."""
    global _EXPERIMENTS_LOADED
    if _EXPERIMENTS_LOADED:
        return
    _EXPERIMENTS_LOADED = True
    import pyro_seqlatent.experiments as pkg

    _import_submodules(pkg)


def get_model(name: str) -> ModelSpec:
    load_builtin_models()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    load_builtin_models()
    return sorted(_REGISTRY)


@dataclass
class CommandSpec:
    """An extra ``pyro-seqlatent`` subcommand (e.g. ``compare-estimators``, ``em-vs-svi``).

    :param add_arguments: ``add_arguments(parser)`` declares its flags.
    :param run: ``run(args) -> int`` does the work (exit status).
    """

    name: str
    help: str
    add_arguments: Callable
    run: Callable


_COMMANDS: dict[str, CommandSpec] = {}


def register_command(spec: CommandSpec) -> CommandSpec:
    """Add a subcommand to the ``pyro-seqlatent`` CLI (call it at import time from a module under
    ``experiments/`` or ``models/``, which :func:`list_commands` imports)."""
    _COMMANDS[spec.name] = spec
    return spec


def list_commands() -> dict[str, CommandSpec]:
    """The registered subcommands, after importing the models and the experiment drivers."""
    load_builtin_models()
    load_experiments()
    return dict(_COMMANDS)


_DEMO_SECTIONS: dict[str, Callable] = {}


def register_demo_section(name: str, run: Callable) -> Callable:
    """Add a section to ``make demo``'s report that is not a registered model's training run
    (e.g. EM vs SVI). ``run(out_dir, data_root, device) -> str`` writes its files under
    ``out_dir`` and returns the section's Markdown (figures linked relative to ``out_dir``)."""
    _DEMO_SECTIONS[name] = run
    return run


def list_demo_sections() -> dict[str, Callable]:
    """The registered demo sections, after importing the models and the experiment drivers."""
    load_builtin_models()
    load_experiments()
    return dict(_DEMO_SECTIONS)
