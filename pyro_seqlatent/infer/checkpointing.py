"""What a run folder's checkpoints hold, and the rules for resuming from them.

``checkpoint.pt`` (periodic and last) and ``best.pt`` (best validation) are dicts with the keys

* ``model``, ``guide``: the modules' ``state_dict``; ``param_store``: the ``pyro.param`` values
  outside them; ``param_store_state``: Pyro's param store (constraints);
* ``optimizer``, ``scheduler``: their ``state_dict``; ``rng``: every global RNG;
* ``ema``: the parameter average as a list (periodic checkpoint; what a resume restores) and
  ``averaged``: the same by name (what :func:`restore_modules` loads); ``best.pt`` holds the
  averaged weights themselves, so both are None there;
* ``state``: the loop counters (step, best validation, elapsed time, why it stopped, the
  settings resumes changed); ``config``: the run's settings (``TrainConfig.to_json``; flat in
  runs older than schema 2).

A resumed run must keep the settings of the run it continues, except its length, budget and
bookkeeping (:data:`RESUMABLE_CHANGES`), and ``lr`` and ``clip_norm``: the recovery of a run that
diverged is to resume it from its last good checkpoint with a lower learning rate (the restored
schedule is rescaled to it) or with clipping; ``state["resume_changes"]`` records each change.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from pyro_seqlatent.infer.averaging import ParameterAverage, swapped
from pyro_seqlatent.infer.checkpoint import (
    FORMAT,
    atomic_save,
    atomic_write_bytes,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from pyro_seqlatent.infer.config import TrainConfig, settings
from pyro_seqlatent.infer.guards import DivergenceGuard
from pyro_seqlatent.infer.params import extra_store_params, load_state, state_of

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
TRAIN_CONFIG = "train_config.json"

#: settings a resumed run may change: its length, budget and bookkeeping, and the two knobs
#: that recover a diverged run from its last good checkpoint (``lr``, which rescales the restored
#: schedule, see :func:`~pyro_seqlatent.infer.schedules.apply_resumed_lr`, and ``clip_norm``),
#: not what it computes
RESUMABLE_CHANGES = frozenset({"num_steps", "num_epochs", "max_time_s", "progress", "log_every",
                               "checkpoint_every", "num_workers", "pyro_validation", "device",
                               "early_stopping_patience", "early_stopping_min_delta",
                               "divergence_factor", "ddp_timeout_s", "health_check_s",
                               "lr", "clip_norm", "return_best",
                               "collapse_every"})
#: the resumable settings that change what a run computes (the recovery of a diverged run);
#: a resume that changes them is recorded in the checkpoint's ``state["resume_changes"]``
RECOVERY_SETTINGS = ("lr", "clip_norm")


def new_state(time_budget: str) -> dict:
    """The loop counters of a fresh run."""
    return {
        "step": 0,
        "best_valid": None,
        "bad_validations": 0,
        "elapsed": 0.0,  # on the budget's clock
        "wall_elapsed": 0.0,
        "time_budget": time_budget,
        "last_loss": float("nan"),
        "stopped": "completed",
    }


def _as_json(flat: dict) -> dict:
    return json.loads(json.dumps(flat, default=str))


def _saved_settings(saved: dict) -> dict:
    """A saved config by flat name, a setting the saved run predates at its default (the
    behaviour before the setting existed)."""
    defaults = {name: s.default for name, s in settings().items()}
    return _as_json({**defaults, **TrainConfig.flatten(saved)})


def check_resumed_config(saved: dict | None, cfg: TrainConfig, run_path) -> None:
    """A resumed run must train as the run it continues: the same optimizer, schedule, batch
    size, seed, ELBO, annealing, validation...; only :data:`RESUMABLE_CHANGES` may differ (a new
    batch size would misplace the run in its epoch)."""
    if not saved:
        return
    new = TrainConfig.flatten(_as_json(cfg.to_json()))
    old = _saved_settings(saved)
    changed = sorted(k for k in old if k not in RESUMABLE_CHANGES and old[k] != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"resume: the run in {run_path} was trained with other settings ({diffs}); resume "
            "it with its own settings (train_config.json), or train a new run in another folder")


def recovery_changes(saved: dict | None, cfg: TrainConfig, step: int) -> list[dict]:
    """``{"step", "setting", "from", "to"}`` for each of :data:`RECOVERY_SETTINGS` that a resume
    at ``step`` changes."""
    if not saved:
        return []
    old = _saved_settings(saved)
    new = cfg.flat()
    return [{"step": step, "setting": k, "from": old.get(k), "to": new.get(k)}
            for k in RECOVERY_SETTINGS if old.get(k) != new.get(k)]


def restore_store_extras(ckpt: dict) -> None:
    """Copy the saved ``pyro.param`` values (not module parameters) back, in place when the
    parameter exists (so an optimizer built over it keeps working), else by creating it."""
    extras = ckpt.get("param_store", {})
    constraints = (ckpt.get("param_store_state") or {}).get("constraints", {})
    current = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name, value in extras.items():
            if name in current:
                current[name].copy_(value)
            else:
                constraint = constraints.get(name, torch.distributions.constraints.real)
                pyro.param(name, torch.distributions.transform_to(constraint)(value),
                           constraint=constraint)


class RunCheckpoints:
    """Writes a run's checkpoints and restores a run from one.

    A periodic checkpoint of step :math:`t` is serialised at step :math:`t` but written only
    when step :math:`t + 1`'s loss, computed at its parameters, has passed the divergence guard
    (:meth:`confirm`): the last good checkpoint on disk is never one whose parameters already
    blew up. The last step's checkpoint is written at once; one still held when a run stops
    for another reason than a divergence (an interruption) is written then (:meth:`flush`).

    :param run_params: the ``param`` site names of the run (see
        :func:`~pyro_seqlatent.infer.params.traced_param_names`).
    :param folder: where to write (None: nothing is written, e.g. processes other than rank 0).
    :param guard: told about each checkpoint written (the last good one its errors name).
    """

    def __init__(self, model: nn.Module, guide: nn.Module, optimizer, scheduler,
                 average: ParameterAverage | None, run_params: set[str], cfg: TrainConfig,
                 folder: Path | None = None, guard: DivergenceGuard | None = None):
        self.model, self.guide = model, guide
        self.optimizer, self.scheduler = optimizer, scheduler
        self.average = average
        self.run_params = run_params
        self.cfg = cfg
        self.folder = folder
        self.guard = guard
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.pending: tuple[int, bytes] | None = None

    def _modules(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in state_of(self.model).items()},
            "guide": {k: v.detach().clone() for k, v in state_of(self.guide).items()},
            "param_store": {k: v.detach().clone() for k, v in extra_store_params(
                [self.model, self.guide], self.run_params).items()},
        }

    def payload(self, state: dict, holds_average: bool = False) -> dict:
        """``holds_average``: the parameters hold the average now (the best checkpoint);
        otherwise the average is stored too (``"averaged"`` by name, ``"ema"`` as a list)."""
        named_average = None
        if self.average is not None and not holds_average:
            with swapped(self.average):
                named_average = self._modules()
        return {
            **self._modules(),
            "param_store_state": pyro.get_param_store().get_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "ema": None if holds_average or self.average is None else self.average.values,
            "averaged": named_average,
            "state": dict(state),
            "config": self.cfg.to_json(),
            "format": FORMAT,
        }

    def save(self, path: Path, state: dict, holds_average: bool = False) -> None:
        atomic_save(self.payload(state, holds_average), path)

    def periodic(self, step: int, state: dict, last: bool) -> None:
        """The checkpoint of ``step``: written now when it is the ``last``, else held until the
        next step confirms it."""
        if self.folder is None:
            return
        self._check_parameters(step)
        if last:
            self.save(self.folder / CHECKPOINT, state)
            self._written(step)
            return
        buffer = io.BytesIO()
        torch.save(self.payload(state), buffer)
        self.pending = (step, buffer.getvalue())

    def best(self, step: int, state: dict) -> None:
        """``best.pt``: the weights validation scored (the average when there is one)."""
        if self.folder is None:
            return
        self._check_parameters(step)
        with swapped(self.average):
            self.save(self.folder / BEST, state, holds_average=True)

    def confirm(self) -> None:
        """The step after the held checkpoint passed the guard: write it."""
        if self.pending is not None:
            step, data = self.pending
            atomic_write_bytes(data, self.folder / CHECKPOINT)
            self.pending = None
            self._written(step)

    def flush(self, diverged: bool) -> None:
        """At the end of a run: write a held checkpoint unless the run diverged."""
        if diverged:
            self.pending = None
        self.confirm()

    def _check_parameters(self, step: int) -> None:
        if self.guard is not None:
            self.guard.check_parameters(step, self.params)

    def _written(self, step: int) -> None:
        if self.guard is not None:
            self.guard.saved(step)

    def restore(self, ckpt: dict, run_path) -> dict:
        """Load ``ckpt`` into the modules, param store, optimizer, scheduler, RNGs and average,
        after checking that it can be resumed with these settings; returns its loop state."""
        saved_clock = ckpt["state"].get("time_budget", "wall")
        if saved_clock != self.cfg.length.time_budget:
            raise ValueError(
                f"the run in {run_path} measured its time budget in {saved_clock!r} seconds; "
                f"resume it with time_budget={saved_clock!r} (got "
                f"{self.cfg.length.time_budget!r})")
        check_resumed_config(ckpt.get("config"), self.cfg, run_path)
        load_state(self.model, ckpt["model"])
        load_state(self.guide, ckpt["guide"])
        restore_store_extras(ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        if self.average is not None:
            self.average.load(ckpt.get("ema"), run_path)
        return dict(ckpt["state"])


def restore_modules(ckpt_path: str | os.PathLike, model: nn.Module, guide: nn.Module,
                    map_location: Any = "cpu", averaged: bool = True) -> dict:
    """Load a checkpoint's parameters into ``model`` and ``guide`` (no optimizer); returns it.

    A run trained with ``ema_decay > 0`` gets its averaged parameters (what its validation
    scored and what ``train`` handed back) unless ``averaged=False``, which loads the
    optimizer's own last iterate; the best checkpoint holds the average either way."""
    ckpt = load_checkpoint(ckpt_path, map_location=map_location)
    source = ckpt
    if averaged and ckpt.get("averaged"):
        source = {**ckpt["averaged"], "param_store_state": ckpt.get("param_store_state")}
    load_state(model, source["model"])
    load_state(guide, source["guide"])
    restore_store_extras(source)
    return ckpt


def remove_stale(folder: Path, names: Sequence[str] = (BEST, CHECKPOINT)) -> None:
    """A fresh run must not inherit an old run's checkpoints."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
