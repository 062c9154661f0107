r"""One SVI training loop for every model/guide pair of the project (and the user's own).

``train`` minimises the negative ELBO

.. math:: \mathcal L(\theta, \phi) = -\,\mathbb E_{q_\phi(z\mid x)}
          \bigl[\log p_\theta(x, z) - \log q_\phi(z \mid x)\bigr]

with any Pyro ELBO and a plain ``torch.optim`` optimizer over the parameters of the model and
guide modules (and of Pyro's param store). The loop below reads top to bottom; each job it does
lives in a part of its own:

* :mod:`~pyro_seqlatent.infer.config`: the settings, in groups (:class:`TrainConfig`);
* :mod:`~pyro_seqlatent.infer.epochs`: the data order, a ``DistributedSampler`` seeded by
  ``(seed, epoch)`` that can start mid-epoch;
* :mod:`~pyro_seqlatent.infer.step`: one SVI step's loss and gradients, clipping, and the one
  host sync per step (under DDP the figures of all processes);
* :mod:`~pyro_seqlatent.infer.guards`: the first non-finite loss, gradient, distribution
  parameter, parameter or validation loss stops the run naming the step and the last good
  checkpoint, left intact (:class:`TrainingDiverged`);
* :mod:`~pyro_seqlatent.infer.schedules`: the learning-rate schedule and the KL weight
  :math:`\beta_t` (validation always scores the ELBO, :math:`\beta = 1`);
* :mod:`~pyro_seqlatent.infer.averaging`: Polyak averaging (``ema_decay``);
* :mod:`~pyro_seqlatent.infer.validation`: validation with common random numbers, early stopping;
* :mod:`~pyro_seqlatent.infer.checkpointing`: what checkpoints hold, atomic writes and the resume
  rules (a resumed run reproduces an uninterrupted one bit for bit);
* :mod:`~pyro_seqlatent.infer.metrics_log`: ``metrics.jsonl``, callbacks, the progress bar;
* :mod:`~pyro_seqlatent.infer.budget`: the time budget (``max_time_s``, wall or CPU seconds);
* :mod:`~pyro_seqlatent.infer.distributed`: the same loop under ``torchrun``: ``batch_size`` is
  the global batch, each of the :math:`W` processes takes :math:`B/W` examples and only rank 0
  writes checkpoints, metrics, the progress bar and calls the callbacks.

A step's record holds the loss per data point, the gradient norm, the lr and KL weight used, the
time and throughput, and, for a model or guide with function-evaluation counters (the ODE vector
fields, :mod:`pyro_seqlatent.infer.nfe`), ``model_nfe_forward``, ``model_nfe_backward``,
``guide_nfe_forward``, ``guide_nfe_backward`` (none with a JIT ELBO, whose compiled graph
bypasses the counters).

Exact resumption holds for datasets whose items are deterministic, or with ``num_workers=0``: the
workers' seeds are a function of ``(seed, epoch)``, but a worker's random stream restarts when a
run resumes mid-epoch. A time budget counts the training time of all sessions of a run, so
resume a budget-stopped run with a larger budget; an early-stopped run stays stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn
from torch.utils.data import Dataset

from pyro_seqlatent.infer import distributed as ddp_tools
from pyro_seqlatent.infer.averaging import ParameterAverage, swapped
from pyro_seqlatent.infer.batches import to_device
from pyro_seqlatent.infer.budget import Budget
from pyro_seqlatent.infer.checkpoint import load_checkpoint, remove_temporary_files
from pyro_seqlatent.infer.checkpointing import (
    BEST,
    CHECKPOINT,
    RECOVERY_SETTINGS,
    RESUMABLE_CHANGES,
    TRAIN_CONFIG,
    RunCheckpoints,
    new_state,
    recovery_changes,
    remove_stale,
    restore_modules,
    restore_store_extras,
)
from pyro_seqlatent.infer.collapse import CollapseWatch
from pyro_seqlatent.infer.config import OPTIMIZERS, Batching, TrainConfig
from pyro_seqlatent.infer.elbos import make_elbo
from pyro_seqlatent.infer.epochs import Epochs, ResumableSampler
from pyro_seqlatent.infer.guards import DivergenceGuard, TrainingDiverged
from pyro_seqlatent.infer.loader import make_loader
from pyro_seqlatent.infer.metrics_log import METRICS, MetricsLog, read_metrics_upto
from pyro_seqlatent.infer.modes import mode_dependent_modules
from pyro_seqlatent.infer.nfe import nfe_counters
from pyro_seqlatent.infer.params import (
    collect_parameters,
    extra_store_params,
    flow_caches,
    load_state,
    modules_among,
    needs_param_sites,
    registering,
    state_of,
    traced_param_names,
)
from pyro_seqlatent.infer.run_files import write_json
from pyro_seqlatent.infer.schedules import ScaleLatents, apply_resumed_lr, kl_scale, make_scheduler
from pyro_seqlatent.infer.step import SVIStep, elbo_loss
from pyro_seqlatent.infer.validation import Validator, mean_loss
from pyro_seqlatent.parallel import health_check

__all__ = [
    "BEST", "CHECKPOINT", "METRICS", "RECOVERY_SETTINGS", "RESUMABLE_CHANGES", "TRAIN_CONFIG",
    "ResumableSampler", "ScaleLatents", "TrainConfig", "TrainResult", "TrainingDiverged",
    "collect_parameters", "elbo_loss", "mean_loss", "needs_param_sites", "registering",
    "restore_modules", "train",
]


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    history: list[dict]
    step: int
    final_loss: float
    best_valid: float | None
    stopped: str
    run_dir: Path | None
    #: wall-clock seconds of training, all sessions of a resumed run included
    wall_time_s: float
    #: the same on the clock of ``time_budget`` (equal to ``wall_time_s`` for "wall")
    budget_time_s: float
    #: which parameters the modules hold: ``"last"`` (the last iterate, or its average with
    #: ``ema_decay``) or ``"best"`` (the best validation's, with ``return_best=True``)
    state: str = "last"
    #: the step of the best validation (``None`` without validation)
    best_step: int | None = None


def train(
    model: Callable,
    guide: Callable,
    train_data: Dataset,
    *,
    valid_data: Dataset | None = None,
    collate_fn: Callable | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict, nn.Module, nn.Module], None]] = (),
    config: TrainConfig | None = None,
    **settings: Any,
) -> TrainResult:
    """Train ``model``/``guide`` by SVI on ``train_data``.

    :param model: the Pyro model: a ``PyroModule`` / ``nn.Module`` whose ``forward`` is the
        model, or a plain function whose parameters come from ``pyro.module`` / ``pyro.param``
        (as with ``pyro.infer.SVI``; they are trained and checkpointed as param-store entries).
    :param guide: the same for the guide (it may be an autoguide). Steps run in the modules'
        own modes (fresh modules are in train mode: dropout on; a submodule the caller put in
        eval mode stays there); validation runs in eval mode and gives each submodule its mode
        back.
    :param train_data: a torch ``Dataset``; batches are fed as ``model(*batch)`` (tuple),
        ``model(**batch)`` (dict) or ``model(batch)``.
    :param valid_data: optional validation ``Dataset`` (every ``valid_every`` steps and at the
        last step). With ``return_best=True`` the modules end with the parameters of the best
        validation (``TrainResult.state == "best"``), otherwise with the last iterate.
    :param collate_fn: how to batch examples; ``None``: the model's ``collate_fn`` attribute
        where it has one (``pad_collate`` for the VRNN and RNN models, ``union_grid_collate``
        for the Latent ODE family), else torch's default collate (examples of different sizes
        are then a ``ValueError`` naming the fix).
    :param run_dir: folder for ``checkpoint.pt``, ``best.pt``, ``metrics.jsonl`` and
        ``train_config.json``; without it nothing is written.
    :param resume: continue from ``run_dir/checkpoint.pt`` if it exists.
    :param callbacks: functions ``cb(record, model, guide)`` called after each logged step.
    :param config: a :class:`TrainConfig`; ``settings`` (flat names such as ``lr=1e-3``,
        ``num_steps=100``) are applied over it.
    :returns: :class:`TrainResult`.
    :raises TrainingDiverged: at the first non-finite loss or gradient norm.
    """
    cfg = TrainConfig(**{**(config.flat() if config is not None else {}), **settings})
    cfg.validate()
    if collate_fn is None:  # the model's own (VRNNModel, LatentODEModel, ...), if it has one
        collate_fn = getattr(model, "collate_fn", None)
    flag = cfg.diagnostics.pyro_validation
    checks = pyro.validation_enabled(flag) if flag is not None else contextlib.nullcontext()
    with checks:  # training steps, validation and the first trace alike
        return _train(model, guide, train_data, valid_data, collate_fn, run_dir, resume,
                      callbacks, cfg)


def _train(model, guide, train_data, valid_data, collate_fn, run_dir, resume, callbacks,
           cfg: TrainConfig) -> TrainResult:
    _check_modules(model, guide)
    device, rank, world_size = _join_processes(cfg.batching)
    epochs = Epochs(train_data, cfg.batching,
                    ddp_tools.local_batch_size(cfg.batching.batch_size, world_size),
                    collate_fn, world_size)
    run_path = Path(run_dir) if run_dir is not None else None
    folder = _writable(run_path) if rank == 0 else None  # every process reads, rank 0 writes
    _to_device(device, model, guide)
    pyro.set_rng_seed(cfg.batching.seed)
    elbo = make_elbo(cfg.optim.elbo, **cfg.optim.elbo_kwargs)
    validator = _validator(valid_data, collate_fn, elbo, cfg, model, guide, device)
    collapse = CollapseWatch(validator, cfg.diagnostics.collapse_every)  # infer.collapse
    total_steps = epochs.total_steps(cfg.length.num_steps, cfg.length.num_epochs)

    run_params = traced_param_names(model, guide, epochs.probe(device))  # builds lazy params
    params = collect_parameters(model, guide, param_names=run_params)
    optimizer, scheduler = _optimizer(params, cfg, total_steps)
    average = ParameterAverage(params, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    guard = DivergenceGuard(run_path / CHECKPOINT if run_path else None,
                            factor=cfg.diagnostics.divergence_factor)
    checkpoints = RunCheckpoints(model, guide, optimizer, scheduler, average, run_params, cfg,
                                 folder, guard)
    best_state = BestState(model, guide, run_params, average, cfg.validation.return_best)
    state, history = new_state(cfg.length.time_budget), []
    if resume:
        state, history = _resume(checkpoints, run_path, device, world_size, cfg, rank == 0)
        guard.saved(state["step"])
    _start(folder, cfg, rank, world_size, state["step"], fresh=not resume)

    counters = {} if type(elbo).__name__.startswith("Jit") else nfe_counters(model, guide)
    svi_step = SVIStep(model, guide, elbo, params, run_params, clip_norm=cfg.optim.clip_norm,
                       device=device, world_size=world_size, counters=counters, guard=guard)
    if average is not None and world_size > 1:  # rank 0's average (initial or restored) for all
        ddp_tools.broadcast_(average.values)
    caches = flow_caches(model, guide)
    budget = Budget(cfg.length, state["elapsed"], state.get("wall_elapsed", 0.0))
    stopped = state["stopped"]  # an early-stopped run stays stopped when resumed
    if cfg.length.max_time_s is not None and state["elapsed"] >= cfg.length.max_time_s:
        stopped = "time_budget"  # a resumed run whose budget is spent takes no further step
    log = MetricsLog(folder, history, callbacks if rank == 0 else (),
                     (total_steps, state["step"]) if cfg.diagnostics.progress and rank == 0
                     else None)
    diverged = False
    try:
        batches = epochs.from_step(state["step"])
        while state["step"] < total_steps and stopped == "completed":
            epoch, batch, indices = next(batches)
            step, t0 = state["step"] + 1, time.perf_counter()
            batch = to_device(batch, device)
            beta = kl_scale(cfg.schedule, step)
            noise = (ddp_tools.ExampleNoise(indices, seed=cfg.batching.seed, step=step)
                     if indices is not None else contextlib.nullcontext())
            figures = svi_step(batch, step=step, beta=beta, first=state["step"] == 0,
                               noise=noise, out_of_time=budget.spent)
            checkpoints.confirm()  # the last step's parameters gave a sound loss: keep them
            lr_used = optimizer.param_groups[0]["lr"]  # the step's, not the next one's
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update(step)
            for module in caches:
                module.clear_cache()
            state["step"], state["last_loss"] = step, figures.loss / figures.n
            record = {"step": step, "epoch": epoch, "loss": figures.loss / figures.n,
                      "grad_norm": figures.grad_norm, "lr": lr_used, "kl_scale": beta,
                      "time_s": budget.elapsed(),
                      "examples_per_s": figures.n / max(time.perf_counter() - t0, 1e-9),
                      **figures.nfe}
            # the final state is validated too, so the best checkpoint can be the last one
            final = step >= total_steps or figures.over_time
            if validator is not None and validator.due(step, final):
                with swapped(average):
                    record["valid_loss"] = valid = validator.score(model, guide)
                    collapse.update(record, step, final, model, guide)
                guard.check_validation(step, valid)
                verdict = validator.judge(state, valid)
                if verdict == "best":
                    budget.record(state)
                    best_state.keep(step, state)
                    checkpoints.best(step, state)
                elif verdict == "stop":
                    stopped = state["stopped"] = "early_stopping"
            if _every(step, max(1, cfg.diagnostics.log_every)) or "valid_loss" in record:
                log.log(record, model, guide)
            log.tick(record)
            if figures.over_time:  # decided before the sync, so every process agrees
                stopped = "time_budget"
            is_last = final or stopped != "completed"
            if is_last or _every(step, cfg.checkpointing.checkpoint_every):
                budget.record(state)
                checkpoints.periodic(step, state, last=is_last)
        returned = best_state.hand_back(state, run_path)
    except TrainingDiverged:
        diverged = True
        raise
    finally:
        checkpoints.flush(diverged)
        svi_step.close()
        log.close()
    return TrainResult(history=log.history, step=state["step"], final_loss=state["last_loss"],
                       best_valid=state["best_valid"], stopped=stopped,
                       run_dir=folder if rank == 0 else run_path,
                       wall_time_s=budget.wall_elapsed(), budget_time_s=budget.elapsed(),
                       state=returned, best_step=state.get("best_step"))


class BestState:
    """The parameters a run hands back: the last iterate (its Polyak average with
    ``ema_decay``), or with ``return_best`` those of the best validation, kept in memory at each
    new best (a copy of the modules' and the param store's values, as ``best.pt`` holds them;
    a resumed run whose best came before the resume reads ``run_dir/best.pt``)."""

    def __init__(self, model, guide, run_params: set[str], average: ParameterAverage | None,
                 enabled: bool):
        self.model, self.guide, self.run_params = model, guide, run_params
        self.average, self.enabled = average, enabled
        self.values: dict | None = None

    def keep(self, step: int, state: dict) -> None:
        """A new best validation at ``step`` (the values validation scored)."""
        state["best_step"] = step
        if not self.enabled:
            return
        with swapped(self.average), torch.no_grad():
            self.values = {
                "model": {k: v.detach().clone() for k, v in state_of(self.model).items()},
                "guide": {k: v.detach().clone() for k, v in state_of(self.guide).items()},
                "param_store": {k: v.detach().clone() for k, v in extra_store_params(
                    [self.model, self.guide], self.run_params).items()}}

    def hand_back(self, state: dict, run_path: Path | None) -> str:
        """Give the modules the parameters to return; ``"best"`` or ``"last"``."""
        if self.enabled and self.values is not None:
            load_state(self.model, self.values["model"])
            load_state(self.guide, self.values["guide"])
            restore_store_extras(self.values)
            return "best"
        if self.enabled and run_path is not None and state.get("best_step") is not None \
                and (run_path / BEST).exists():  # the best came before this session resumed
            restore_modules(run_path / BEST, self.model, self.guide)
            return "best"
        if self.average is not None:  # hand back the averaged weights, which validation scored
            self.average.copy_to_params()
        return "last"


def _every(step: int, n: int | None) -> bool:
    return bool(n) and step % n == 0


def _to_device(device, *objects) -> None:
    for module in modules_among(*objects):
        module.to(device)


def _check_modules(model, guide) -> None:
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a Pyro model/guide: an nn.Module / PyroModule or a "
                            f"function, got {type(fn).__name__}")


def _join_processes(batching: Batching) -> tuple[torch.device, int, int]:
    """``(device, rank, world_size)``; under torchrun the process joins the process group and
    every process must pass a health check within ``health_check_s``."""
    device = torch.device(batching.device)  # cfg.validate() checked that CUDA is there if asked
    if ddp_tools.launched_with_many_processes():
        device = ddp_tools.init_distributed(device, timeout_s=batching.ddp_timeout_s)
    rank, world_size = ddp_tools.world()
    if world_size > 1:
        health_check(batching.health_check_s)
    return device, rank, world_size


def _writable(path: Path | None) -> Path | None:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _validator(valid_data, collate_fn, elbo, cfg: TrainConfig, model, guide, device
               ) -> Validator | None:
    v = cfg.validation
    moded = mode_dependent_modules(model, guide)
    if moded and valid_data is not None and type(elbo).__name__.startswith("Jit"):
        raise ValueError(
            f"{type(elbo).__name__} compiles the train-mode behaviour of {moded[0]} into its "
            "trace, so validation could not switch it off (eval mode); train with the non-JIT "
            f"ELBO ({type(elbo).__name__[3:]}) or without dropout/batch norm")
    if v.return_best and (valid_data is None or not v.valid_every):
        raise ValueError("return_best=True hands back the best validation's parameters: give "
                         "valid_data=... and valid_every=N (validate every N steps)")
    if valid_data is None:
        if v.valid_every or v.early_stopping_patience:
            raise ValueError("valid_every / early_stopping_patience need valid_data=...")
        return None
    loader = make_loader(valid_data, batch_size=cfg.batching.batch_size, collate_fn=collate_fn)
    return Validator(loader, elbo, device, v, cfg.batching.seed)


def _optimizer(params, cfg: TrainConfig, total_steps: int):
    if not params:
        raise ValueError(
            "model and guide have no trainable parameters: build them as nn.Module/PyroModule")
    o = cfg.optim
    kwargs: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.optimizer in ("adam", "adamw", "adamax"):
        kwargs["betas"] = tuple(o.betas)
    optimizer = OPTIMIZERS[o.optimizer](params, **kwargs)
    return optimizer, make_scheduler(optimizer, cfg.schedule, total_steps)


def _resume(checkpoints: RunCheckpoints, run_path: Path | None, device, world_size: int,
            cfg: TrainConfig, main: bool) -> tuple[dict, list[dict]]:
    """The loop state and history of the run in ``run_path`` (a fresh state when it holds no
    checkpoint yet); rank 0 reads the checkpoint and sends it to the others."""
    if run_path is None:
        raise ValueError("resume=True needs run_dir=... holding a checkpoint.pt")
    path = run_path / CHECKPOINT
    ckpt = None
    if main and path.exists():
        ckpt = load_checkpoint(path, map_location=device if world_size == 1 else "cpu")
    ckpt = ddp_tools.broadcast_object(ckpt)
    if ckpt is None:
        return new_state(cfg.length.time_budget), []
    state = {**new_state(cfg.length.time_budget), **checkpoints.restore(ckpt, run_path)}
    apply_resumed_lr(checkpoints.optimizer, checkpoints.scheduler, cfg.optim.lr)
    changes = recovery_changes(ckpt.get("config"), cfg, state["step"])
    if changes:  # kept in every later checkpoint (train_config.json has the new values)
        state["resume_changes"] = [*state.get("resume_changes", []), *changes]
    history = read_metrics_upto(run_path / METRICS, state["step"]) if main else []
    return state, history


def _start(folder: Path | None, cfg: TrainConfig, rank: int, world_size: int, step: int,
           fresh: bool) -> None:
    """The noise stream of this process, and ``train_config.json`` (a fresh run first removes
    an old run's checkpoints, any run the temporary files of an interrupted save)."""
    if rank > 0:  # the processes' noise streams differ (rank 0 keeps the single-process stream)
        pyro.set_rng_seed(ddp_tools.derived_seed(cfg.batching.seed, rank, step) % 2**32)
    if folder is None:
        return
    remove_temporary_files(folder)  # left by a save that was killed mid-write
    if fresh:
        remove_stale(folder)
    write_json({**cfg.to_json(), "world_size": world_size}, folder / TRAIN_CONFIG)
