r"""The settings of :func:`~pyro_seqlatent.infer.train`, in groups.

:class:`TrainConfig` holds one small dataclass per concern; each setting has a help text (the
command line shows it) and belongs to exactly one group:

* :class:`Optimization`: the ELBO, the optimizer, its learning rate, clipping and averaging;
* :class:`Schedule`: the learning-rate schedule and the KL weight :math:`\beta_t`;
* :class:`Length`: how long to train (steps, epochs, a time budget);
* :class:`Batching`: batch size, data order, seeds, device;
* :class:`Validation`: validation and early stopping;
* :class:`Checkpointing` and :class:`Diagnostics`: what is written and shown.

``train(..., lr=1e-3, num_steps=100)`` and ``TrainConfig(lr=1e-3, num_steps=100)`` take the flat
names; ``TrainConfig(optim=Optimization(lr=1e-3), length=Length(num_steps=100))`` the groups.
``train_config.json`` is written grouped (``"schema": 2``); :meth:`TrainConfig.from_json` reads
both that and the flat files that runs wrote before the groups existed.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from pyro_seqlatent.infer.elbos import check_elbo_name, lab_estimators, make_elbo

#: version of the ``train_config.json`` layout written by :meth:`TrainConfig.to_json`
SCHEMA = 2
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adamax": torch.optim.Adamax,  # the Latent ODE reference's optimizer
}
LR_SCHEDULES = (None, "none", "cosine", "exponential", "step")


def _opt(default: Any = MISSING, help: str = "", factory: Any = MISSING):
    meta = {"help": help}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Optimization:
    elbo: Any = _opt("Trace_ELBO", "a Pyro ELBO: a name of pyro_seqlatent.infer.ELBOS or of "
                     "the estimator lab (vimco, reinforce_loo, ...), or an instance")
    elbo_kwargs: dict = _opt(help="keyword arguments of the ELBO (num_particles, ...)",
                             factory=dict)
    optimizer: str = _opt("adam", f"torch optimizer: one of {sorted(OPTIMIZERS)}")
    lr: float = _opt(1e-3, "learning rate (the schedule's base rate)")
    weight_decay: float = _opt(0.0, "the optimizer's weight decay")
    betas: tuple = _opt((0.9, 0.999), "Adam's betas")
    clip_norm: float | None = _opt(None, "clip the gradient norm to this before each step")
    ema_decay: float = _opt(0.0, "Polyak averaging of the parameters with this decay (0: off)")


@dataclass
class Schedule:
    lr_schedule: str | None = _opt(None, "learning-rate schedule: cosine, exponential or step")
    lr_decay: float = _opt(0.1, "decay factor of the exponential and step schedules")
    lr_step_size: int = _opt(1000, "steps between two decays of the step schedule")
    lr_warmup_steps: int = _opt(0, "linear learning-rate warm-up over this many steps")
    lr_min_factor: float = _opt(0.0, "floor of the schedule, a fraction of lr")
    kl_anneal_steps: int = _opt(0, "steps over which the KL weight moves from its start to "
                                "its end")
    kl_anneal_start: float = _opt(0.0, "KL weight at step 0 of the annealing")
    kl_anneal_end: float = _opt(1.0, "KL weight the annealing ends at and keeps (1: the ELBO)")


@dataclass
class Length:
    num_steps: int | None = _opt(None, "optimizer steps to take")
    num_epochs: int | None = _opt(None, "epochs to train (when num_steps is not given)")
    max_time_s: float | None = _opt(None, "time budget in seconds, over all sessions of a run")
    time_budget: str = _opt("wall", "clock of the budget: wall (seconds) or process (CPU "
                            "seconds of this process)")


@dataclass
class Batching:
    batch_size: int = _opt(64, "examples per step (the global batch under DDP)")
    seed: int = _opt(0, "seed of the data order, the noise and the initialisation draws")
    device: str = _opt("cpu", "where the modules and batches live")
    num_workers: int = _opt(0, "DataLoader worker processes")
    shuffle: bool = _opt(True, "shuffle the training data every epoch")
    drop_last: bool = _opt(False, "drop the last incomplete batch of each epoch")
    example_noise: bool = _opt(False, "per-example noise streams (the same draws for every "
                               "number of processes)")
    ddp_timeout_s: float = _opt(300.0, "DDP: how long a collective waits for the other "
                                "processes before the run fails")
    health_check_s: float = _opt(30.0, "DDP: how long every process has to join the start-up "
                                 "health check, which names the ranks that did not")


@dataclass
class Validation:
    valid_every: int | None = _opt(None, "validate every this many steps (and at the end)")
    valid_max_batches: int | None = _opt(None, "validate on at most this many batches")
    early_stopping_patience: int | None = _opt(None, "stop after this many validations "
                                               "without improvement")
    early_stopping_min_delta: float = _opt(0.0, "improvement that resets the patience")
    return_best: bool = _opt(False, "hand back the parameters of the best validation (what "
                             "best.pt holds) instead of the last iterate; TrainResult.state "
                             "says which")


@dataclass
class Checkpointing:
    checkpoint_every: int | None = _opt(None, "write checkpoint.pt every this many steps (and "
                                        "at the end)")


@dataclass
class Diagnostics:
    log_every: int = _opt(1, "keep a metrics record every this many steps")
    progress: bool = _opt(True, "show a progress bar")
    pyro_validation: bool | None = _opt(None, "force Pyro's validation on/off (None: Pyro's "
                                        "global setting)")
    divergence_factor: float | None = _opt(10.0, "stop when a step's loss explodes: above the "
                                           "first loss by this many times its size, or above "
                                           "the highest of the last 50 by this many times "
                                           "their range (None: only non-finite losses stop a "
                                           "run)")
    collapse_every: int | None = _opt(None, "posterior-collapse diagnostics (KL per latent "
                                      "dimension and per step, active units; "
                                      "infer.collapse) on the validation data at every this "
                                      "many validations and the last, logged under "
                                      "'collapse'; a warning when the latent is unused "
                                      "(None: off)")


#: group attribute of :class:`TrainConfig` -> its dataclass
GROUPS = {
    "optim": Optimization,
    "schedule": Schedule,
    "length": Length,
    "batching": Batching,
    "validation": Validation,
    "checkpointing": Checkpointing,
    "diagnostics": Diagnostics,
}
#: flat setting name -> the group that holds it
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class Setting:
    """One setting as the command line and the docs show it."""

    name: str
    group: str
    default: Any
    help: str
    type: Any


def settings() -> dict[str, Setting]:
    """Every setting by its flat name, with its group, default, help text and type."""
    out = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            out[f.name] = Setting(f.name, group, default, f.metadata.get("help", ""), f.type)
    return out


@dataclass(init=False)
class TrainConfig:
    """Settings of :func:`~pyro_seqlatent.infer.train`: one dataclass per group.

    ``TrainConfig(**flat)`` takes the flat names (``lr=...``), groups (``optim=Optimization()``)
    or both; an unknown name raises ``TypeError`` naming the known ones.
    """

    optim: Optimization
    schedule: Schedule
    length: Length
    batching: Batching
    validation: Validation
    checkpointing: Checkpointing
    diagnostics: Diagnostics

    def __init__(self, **kwargs: Any):
        unknown = set(kwargs) - set(GROUPS) - set(GROUP_OF)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} of the training settings; "
                            f"known: {sorted(GROUP_OF)} (or the groups {sorted(GROUPS)})")
        for group, cls in GROUPS.items():
            value = kwargs.get(group, cls())
            if not isinstance(value, cls):
                raise TypeError(f"{group} must be a {cls.__name__}, got {type(value).__name__}")
            setattr(self, group, value)
        for name, value in kwargs.items():
            if name in GROUP_OF:
                setattr(getattr(self, GROUP_OF[name]), name, value)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name."""
        return {name: getattr(getattr(self, group), name) for name, group in GROUP_OF.items()}

    def to_json(self) -> dict:
        """The grouped, JSON-ready form written to ``train_config.json``."""
        out: dict[str, Any] = {"schema": SCHEMA}
        for group in GROUPS:
            values = getattr(self, group)
            out[group] = {f.name: getattr(values, f.name) for f in fields(values)}
        out["optim"]["elbo"] = elbo_name(self)
        return out

    @staticmethod
    def flatten(saved: dict) -> dict[str, Any]:
        """The settings of a ``train_config.json`` (grouped or the older flat layout) by flat
        name; keys that are no setting (``world_size``) are kept as they are."""
        if saved.get("schema", 1) == 1:
            return dict(saved)
        out = {k: v for k, v in saved.items() if k not in GROUPS and k != "schema"}
        for group in GROUPS:
            out.update(saved.get(group) or {})
        return out

    @classmethod
    def from_json(cls, saved: dict) -> TrainConfig:
        """The config of a ``train_config.json``, grouped or flat (runs before schema 2)."""
        flat = cls.flatten(saved)
        return cls(**{k: v for k, v in flat.items() if k in GROUP_OF})

    def validate(self) -> None:
        """Refuse inconsistent settings with an error that names them."""
        _validate_lengths(self)
        _validate_numbers(self)
        _validate_choices(self)
        _validate_jit(self)


def _validate_lengths(cfg: TrainConfig) -> None:
    if cfg.length.num_steps is None and cfg.length.num_epochs is None:
        raise ValueError("give num_steps or num_epochs (how long to train)")
    flat = cfg.flat()
    for name in ("num_steps", "num_epochs", "batch_size", "valid_every", "checkpoint_every",
                 "collapse_every"):
        value = flat[name]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _validate_numbers(cfg: TrainConfig) -> None:
    o, s = cfg.optim, cfg.schedule
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ValueError(f"lr must be a positive finite number, got {o.lr!r}")
    if o.clip_norm is not None and not o.clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {o.clip_norm!r}")
    if not (isinstance(o.ema_decay, (int, float)) and 0.0 <= o.ema_decay < 1.0):
        raise ValueError(f"ema_decay must lie in [0, 1) (0 turns the averaging off), got "
                         f"{o.ema_decay!r}")
    for name in ("ddp_timeout_s", "health_check_s"):
        value = getattr(cfg.batching, name)
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    k = cfg.diagnostics.divergence_factor
    if k is not None and not (isinstance(k, (int, float)) and k > 0 and math.isfinite(k)):
        raise ValueError(f"divergence_factor must be a positive number or None, got {k!r}")
    if not 0.0 <= s.lr_min_factor <= 1.0:
        raise ValueError(f"lr_min_factor must lie in [0, 1] (a fraction of lr), got "
                         f"{s.lr_min_factor!r}")
    for name in ("kl_anneal_start", "kl_anneal_end"):
        value = getattr(s, name)
        try:
            ok = math.isfinite(float(value)) and float(value) >= 0.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite KL weight >= 0, got {value!r}")


def _validate_choices(cfg: TrainConfig) -> None:
    if cfg.schedule.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={cfg.schedule.lr_schedule!r}: use None, 'cosine', "
                         "'exponential' or 'step'")
    if cfg.length.time_budget not in ("wall", "process"):
        raise ValueError(f"time_budget={cfg.length.time_budget!r}: use 'wall' (wall-clock "
                         "seconds) or 'process' (CPU seconds of this process)")
    if cfg.optim.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optim.optimizer!r} is not one of {sorted(OPTIMIZERS)}")
    if isinstance(cfg.optim.elbo, str):
        check_elbo_name(cfg.optim.elbo)
        if cfg.optim.elbo in lab_estimators():  # K and keywords checked now, not at step 1
            make_elbo(cfg.optim.elbo, **cfg.optim.elbo_kwargs)
    device = cfg.batching.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but torch.cuda.is_available() is "
                         "False")


def elbo_name(cfg: TrainConfig) -> str:
    elbo = cfg.optim.elbo
    return elbo if isinstance(elbo, str) else type(elbo).__name__


def _validate_jit(cfg: TrainConfig) -> None:
    name, s = elbo_name(cfg), cfg.schedule
    if not name.startswith("Jit"):
        return
    if s.kl_anneal_steps > 0 or float(s.kl_anneal_end) != 1.0:
        raise ValueError(
            f"kl_anneal_steps={s.kl_anneal_steps}, kl_anneal_end={s.kl_anneal_end} cannot be "
            f"used with {name}: a JIT ELBO compiles the model once, so it would freeze the KL "
            "weight and score validation with it too; use the non-JIT ELBO, or "
            "kl_anneal_steps=0 and kl_anneal_end=1 (the ELBO)")
    if cfg.batching.example_noise:
        raise ValueError(f"example_noise=True cannot be used with {name}: the compiled ELBO "
                         "bypasses Pyro's handlers; use the non-JIT ELBO")
