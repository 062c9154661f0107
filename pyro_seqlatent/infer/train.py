r"""One SVI training loop for every model/guide pair of the project (and the user's own).

``train`` minimises the negative ELBO

.. math:: \mathcal L(\theta, \phi) = -\,\mathbb E_{q_\phi(z\mid x)}
          \bigl[\log p_\theta(x, z) - \log q_\phi(z \mid x)\bigr]

with any Pyro ELBO, a plain ``torch.optim`` optimizer over the parameters of the model and guide
modules (and of Pyro's param store), mini-batches from a torch ``DataLoader``, and:

* gradient-norm clipping applied *before* the optimizer step;
* learning-rate schedules (``cosine``, ``exponential``, ``step``, linear warm-up) with a floor
  ``lr_min_factor``;
* KL annealing: every latent (non-observed) site of model and guide is scaled by
  :math:`\beta_t = \beta_\mathrm{start} + (\beta_\mathrm{end} - \beta_\mathrm{start})
  \min(1, t / T)` at step :math:`t = 1, 2, \dots` (``kl_anneal_start``, ``kl_anneal_end``
  (default 1), ``kl_anneal_steps``; a ``poutine.scale`` restricted to latent sites), so the loss
  is :math:`-\mathbb E_q[\log p(x\mid z)] + \beta_t\,\mathrm{KL}`; with ``kl_anneal_steps=0``
  the weight is :math:`\beta_\mathrm{end}` throughout (``kl_anneal_end=0.01``: a β-VAE
  objective; 0 drops the KL and lets the guide's scale collapse). Validation always scores the
  ELBO itself (β = 1);
* validation every N steps with common random numbers, early stopping on the validation loss;
* Polyak averaging (``ema_decay`` :math:`= d > 0`): an exponential moving average of every
  trained parameter, :math:`\bar\theta_t = d_t\,\bar\theta_{t-1} + (1 - d_t)\,\theta_t` after
  each optimizer step, with :math:`d_t = \min(d, (1 + t) / (10 + t))` so that the first steps
  are not dominated by the initial values; validation, the best checkpoint and the modules
  handed back at the end hold :math:`\bar\theta`, while the optimizer keeps stepping
  :math:`\theta` (the periodic checkpoint holds both, so a resumed run goes on exactly;
  :func:`restore_modules` and ``load_run`` load the average). Buffers (e.g. batch-norm running
  statistics) are not averaged: validation pairs the averaged parameters with the current
  buffers;
* atomic checkpoints and exact resumption (same loss curve as an uninterrupted run);
* a guard that stops at the first non-finite loss or gradient, naming the step and the last good
  checkpoint, which it leaves intact;
* metrics to ``metrics.jsonl`` and a tqdm progress bar with loss and throughput; a model or
  guide with function-evaluation counters (submodules with ``nfe`` and ``reset_nfe()``, as the ODE
  vector fields of :mod:`pyro_seqlatent.nn.ode`; see :mod:`pyro_seqlatent.infer.nfe`) adds each
  step's counts to its record:
  ``model_nfe_forward``, ``model_nfe_backward``, ``guide_nfe_forward``, ``guide_nfe_backward``
  (summed over the counters of each and, under DDP, over the processes; a module the model and
  guide share counts for the model; a logged step's own counts, like its loss; none with a JIT
  ELBO, whose compiled graph bypasses the counters).

The data order comes from a :class:`~torch.utils.data.DistributedSampler` seeded by
``(seed, epoch)``, so the same loop runs under ``torchrun`` with DDP without a second code path:
``batch_size`` is the *global* batch, each of the :math:`W` processes takes :math:`B/W` examples,
the ELBO module is wrapped in ``DistributedDataParallel`` (see
:mod:`pyro_seqlatent.infer.distributed`), the loss and batch size are summed over processes in
the same tensor that the NaN guard reads (still one host sync per step), and only rank 0 writes
checkpoints, metrics, the progress bar and calls the callbacks. Checkpoints store the global
step, so a run resumes with another number of processes.

Exact resumption holds for datasets whose items are deterministic, or with ``num_workers=0``: the
workers' seeds are a function of ``(seed, epoch)``, but a worker's random stream restarts when a
run resumes mid-epoch. A time budget (``max_time_s``) counts the training time of all sessions of
a run, so resume a budget-stopped run with a larger budget; an early-stopped run stays stopped.
A resumed run must keep the settings of the run it continues, except its length, budget and
bookkeeping, and ``lr`` and ``clip_norm``: the recovery of a run that diverged is to resume it
from its last good checkpoint with a lower learning rate (the restored schedule is rescaled to
it) or with clipping; ``state["resume_changes"]`` of later checkpoints records each change.
``time_budget="process"`` measures that budget (and the ``time_s`` of the metrics) in CPU seconds
of this process (``time.process_time``) instead of wall-clock seconds: with one thread per process
it is the fair budget when several benchmark rows share a machine with other load.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pyro_seqlatent.infer import distributed as ddp_tools
from pyro_seqlatent.infer.batches import batch_args, batch_size, to_device
from pyro_seqlatent.infer.checkpoint import (
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from pyro_seqlatent.infer.elbos import ELBOS, has_differentiable_loss, make_elbo
from pyro_seqlatent.infer.modes import eval_mode, mode_dependent_modules
from pyro_seqlatent.infer.nfe import nfe_counters, nfe_record, reset_counters

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"


class TrainingDiverged(RuntimeError):
    """Raised at the first non-finite loss or gradient; names the step and last checkpoint."""

    def __init__(self, step: int, what: str, checkpoint: Path | None, checkpoint_step: int | None):
        self.step = step
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        where = (
            f"the last good checkpoint is {checkpoint} (step {checkpoint_step}), left intact; "
            "resume from it with a lower learning rate or gradient clipping"
            if checkpoint is not None
            else "no checkpoint was written yet (pass run_dir=... and checkpoint_every=...)"
        )
        super().__init__(f"training diverged at step {step}: {what} is not finite; {where}")


@dataclass
class TrainConfig:
    """Settings of :func:`train` (all keyword arguments of ``train`` but the data and modules)."""

    elbo: Any = "Trace_ELBO"
    elbo_kwargs: dict = field(default_factory=dict)
    num_steps: int | None = None
    num_epochs: int | None = None
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    lr_schedule: str | None = None
    lr_decay: float = 0.1
    lr_step_size: int = 1000
    lr_warmup_steps: int = 0
    #: floor of the schedule: the learning rate never falls below ``lr_min_factor * lr``
    #: (e.g. the Latent ODE reference: ``lr_schedule="step"``, ``lr_step_size=1``,
    #: ``lr_decay=0.999``, ``lr_min_factor=0.1``)
    lr_min_factor: float = 0.0
    clip_norm: float | None = None
    kl_anneal_steps: int = 0
    kl_anneal_start: float = 0.0
    #: the KL weight the annealing ends at (and keeps), 1 for the ELBO itself
    kl_anneal_end: float = 1.0
    valid_every: int | None = None
    valid_max_batches: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    #: Polyak averaging of the parameters (0: off); see the module docstring
    ema_decay: float = 0.0
    checkpoint_every: int | None = None
    log_every: int = 1
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    shuffle: bool = True
    drop_last: bool = False
    max_time_s: float | None = None
    #: "wall" seconds or "process" CPU seconds for ``max_time_s`` and the metrics' ``time_s``
    time_budget: str = "wall"
    #: force Pyro's validation on/off in the training steps (None: Pyro's global setting). Off
    #: skips its per-site checks, each a host sync on a GPU; the NaN guard still stops a run.
    pyro_validation: bool | None = None
    progress: bool = True
    example_noise: bool = False

    def validate(self) -> None:
        if self.num_steps is None and self.num_epochs is None:
            raise ValueError("give num_steps or num_epochs (how long to train)")
        for name in ("num_steps", "num_epochs", "batch_size", "valid_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must lie in [0, 1) (0 turns the averaging off), got "
                             f"{self.ema_decay!r}")
        if not 0.0 <= self.lr_min_factor <= 1.0:
            raise ValueError(f"lr_min_factor must lie in [0, 1] (a fraction of lr), got "
                             f"{self.lr_min_factor!r}")
        if self.lr_schedule not in (None, "none", "cosine", "exponential", "step"):
            raise ValueError(
                f"lr_schedule={self.lr_schedule!r}: use None, 'cosine', 'exponential' or 'step'"
            )
        for name in ("kl_anneal_start", "kl_anneal_end"):
            value = getattr(self, name)
            try:
                ok = math.isfinite(float(value)) and float(value) >= 0.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{name} must be a finite KL weight >= 0, got {value!r}")
        if self.time_budget not in ("wall", "process"):
            raise ValueError(f"time_budget={self.time_budget!r}: use 'wall' (wall-clock seconds) "
                             "or 'process' (CPU seconds of this process)")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {sorted(_OPTIMIZERS)}")
        if isinstance(self.elbo, str) and self.elbo not in ELBOS:
            raise ValueError(f"elbo={self.elbo!r} is not one of {list(ELBOS)} nor a "
                             "pyro.infer.ELBO")
        elbo_name = self.elbo if isinstance(self.elbo, str) else type(self.elbo).__name__
        if (self.kl_anneal_steps > 0 or float(self.kl_anneal_end) != 1.0) \
                and elbo_name.startswith("Jit"):
            raise ValueError(
                f"kl_anneal_steps={self.kl_anneal_steps}, kl_anneal_end={self.kl_anneal_end} "
                f"cannot be used with {elbo_name}: a JIT ELBO compiles the model once, so it "
                "would freeze the KL weight and score validation with it too; use the non-JIT "
                "ELBO, or kl_anneal_steps=0 and kl_anneal_end=1 (the ELBO)"
            )
        if self.example_noise and elbo_name.startswith("Jit"):
            raise ValueError(f"example_noise=True cannot be used with {elbo_name}: the compiled "
                             "ELBO bypasses Pyro's handlers; use the non-JIT ELBO")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} was requested but "
                             "torch.cuda.is_available() is False")

    def to_json(self) -> dict:
        out = asdict(self)
        if not isinstance(self.elbo, str):
            out["elbo"] = type(self.elbo).__name__
        return out


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


_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adamax": torch.optim.Adamax,  # the Latent ODE reference's optimizer
}


class ScaleLatents(Messenger):
    """Multiply the log-density of every latent (non-observed) sample site by ``scale``.

    Wrapped around both model and guide it turns the ELBO into
    :math:`\\mathbb E_q[\\log p(x\\mid z)] - \\beta\\,\\mathrm{KL}(q\\,\\|\\,p)`: the KL-annealing
    form of Bowman et al. 2016 / Pyro's DMM, for any model without editing it.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded by ``seed + epoch``) that can start mid-epoch.

    Without ``torch.distributed`` it acts as one replica. ``skip`` drops the first indices of
    the epoch so a resumed run sees exactly the batches the interrupted one had not yet seen.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, drop_last: bool):
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def collect_parameters(*modules: nn.Module, param_names: set[str] | None = None
                       ) -> list[nn.Parameter]:
    """Unique trainable parameters of ``modules`` plus Pyro's param-store entries (only those
    named in ``param_names`` when given: the ``param`` sites a run's model and guide touch, so
    entries left by other models in the same process are not trained or checkpointed)."""
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for name, p in pyro.get_param_store().named_parameters():
        if param_names is not None and name not in param_names:
            continue
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _extra_store_params(modules: Sequence[nn.Module], param_names: set[str] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Param-store entries that are not parameters of ``modules`` (``pyro.param`` in user code),
    restricted to ``param_names`` when given."""
    module_ids = {id(p) for m in modules for p in m.parameters()}
    return {
        name: p
        for name, p in pyro.get_param_store().named_parameters()
        if id(p) not in module_ids and (param_names is None or name in param_names)
    }


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = max(0, int(cfg.lr_warmup_steps))
    schedule = cfg.lr_schedule if cfg.lr_schedule not in (None, "none") else None

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        f = 1.0
        if schedule == "cosine":
            f *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
        elif schedule == "exponential":
            f *= cfg.lr_decay ** (step / max(1, total_steps))
        elif schedule == "step":
            f *= cfg.lr_decay ** (step // max(1, cfg.lr_step_size))
        f = max(f, cfg.lr_min_factor)
        if warmup and step < warmup:
            f *= (step + 1) / warmup
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _kl_scale(cfg: TrainConfig, step: int) -> float:
    r""":math:`\beta_t = \beta_\mathrm{start} + (\beta_\mathrm{end} - \beta_\mathrm{start})
    \min(1, t / T)`, and :math:`\beta_\mathrm{end}` at every step when :math:`T = 0`."""
    end = float(cfg.kl_anneal_end)
    if cfg.kl_anneal_steps <= 0:
        return end
    frac = min(1.0, step / cfg.kl_anneal_steps)
    return cfg.kl_anneal_start + (end - cfg.kl_anneal_start) * frac


def _flow_caches(*modules: nn.Module) -> list[Any]:
    """Submodules with a transform cache (``clear_cache``), cleared after every step."""
    return [m for module in modules for m in module.modules() if hasattr(m, "clear_cache")]


def _annealed(fn: Callable, scale: float) -> Callable:
    return fn if scale == 1.0 else ScaleLatents(scale)(fn)


def elbo_loss(elbo, model, guide, batch, *, differentiable: bool) -> torch.Tensor:
    """The ELBO loss (a sum over the batch) for ``batch``; gradients are accumulated into
    ``.grad`` when ``differentiable`` is False (``loss_and_grads``), else the returned tensor
    is differentiable."""
    args, kwargs = batch_args(batch)
    if differentiable:
        return elbo.differentiable_loss(model, guide, *args, **kwargs)
    return torch.as_tensor(elbo.loss_and_grads(model, guide, *args, **kwargs))


_REGISTRATIONS = itertools.count()


def needs_param_sites(elbo) -> bool:
    """JIT ELBOs pass only ``param`` sites into the compiled function, and ``RenyiELBO``
    back-propagates only when a trace has one: the modules' parameters must appear as sites."""
    return type(elbo).__name__.startswith("Jit") or not has_differentiable_loss(elbo)


def registering(fn: Callable, name: str, module: nn.Module) -> Callable:
    """``fn`` preceded by ``pyro.module(name, module)`` so the parameters are ``param`` sites.

    Model and guide are registered together, once, as one module: networks they share (a VRNN's
    guide and model share theirs) then appear under a single name.
    """

    def wrapped(*args, **kwargs):
        pyro.module(name, module)
        return fn(*args, **kwargs)

    return wrapped


@torch.no_grad()
def mean_loss(
    model: Callable,
    guide: Callable,
    loader: Iterable,
    elbo,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    seed: int = 0,
) -> float:
    """Mean negative ELBO per data point over ``loader``, with a fixed noise seed (common random
    numbers: two calls at the same parameters give the same value) and the global RNG untouched;
    ``nn.Module`` model and guide in eval mode (dropout off), their modes restored after."""
    total, count = 0.0, 0
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model, guide):
        torch.manual_seed(seed)  # Pyro draws from torch's RNG only; python/numpy untouched
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, device)
            args, kwargs = batch_args(batch)
            if has_differentiable_loss(elbo):
                loss = float(elbo.differentiable_loss(model, guide, *args, **kwargs))
            else:
                loss = float(elbo.loss(model, guide, *args, **kwargs))
            total += loss
            count += batch_size(batch)
    if count == 0:
        raise ValueError("the validation data is empty")
    return total / count


def _resolve_run_dir(run_dir) -> Path | None:
    if run_dir is None:
        return None
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line:
                row = json.loads(line)
                if row.get("step", 0) <= upto_step:
                    rows.append(row)
    return rows


def train(
    model: nn.Module,
    guide: nn.Module,
    train_data: Dataset,
    *,
    valid_data: Dataset | None = None,
    collate_fn: Callable | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict, nn.Module, nn.Module], None]] = (),
    **config: Any,
) -> TrainResult:
    """Train ``model``/``guide`` by SVI on ``train_data``; see :class:`TrainConfig` for options.

    :param model: a ``PyroModule`` or ``nn.Module`` whose ``forward`` is the Pyro model.
    :param guide: the same for the guide (it may be an autoguide). Steps run in the modules'
        own modes (fresh modules are in train mode: dropout on; a submodule the caller put in
        eval mode stays there); validation runs in eval mode and gives each submodule its mode
        back.
    :param train_data: a torch ``Dataset``; batches are fed as ``model(*batch)`` (tuple),
        ``model(**batch)`` (dict) or ``model(batch)``.
    :param valid_data: optional validation ``Dataset`` (every ``valid_every`` steps and at the
        last step).
    :param run_dir: folder for ``checkpoint.pt``, ``best.pt``, ``metrics.jsonl`` and
        ``train_config.json``; without it nothing is written.
    :param resume: continue from ``run_dir/checkpoint.pt`` if it exists.
    :param callbacks: functions ``cb(record, model, guide)`` called after each logged step.
    :returns: :class:`TrainResult`.
    :raises TrainingDiverged: at the first non-finite loss or gradient norm.
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(config) - known
    if unknown:
        raise TypeError(f"train() got unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    cfg = TrainConfig(**config)
    cfg.validate()
    checks = (pyro.validation_enabled(cfg.pyro_validation) if cfg.pyro_validation is not None
              else contextlib.nullcontext())
    with checks:  # training steps, validation and the first trace alike
        return _train(model, guide, train_data, valid_data, collate_fn, run_dir, resume,
                      callbacks, cfg)


def _train(model, guide, train_data, valid_data, collate_fn, run_dir, resume, callbacks,
           cfg: TrainConfig) -> TrainResult:
    for name, module in (("model", model), ("guide", guide)):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{name} must be an nn.Module or PyroModule so that train() can see its "
                f"parameters, got {type(module).__name__}; wrap a function that calls "
                "pyro.module(...) in an nn.Module holding those networks"
            )
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    device = torch.device(cfg.device)  # cfg.validate() checked that CUDA is there if asked
    if ddp_tools.launched_with_many_processes():  # under torchrun: join the process group
        device = ddp_tools.init_distributed(device)
    rank, world_size = ddp_tools.world()
    local_batch = ddp_tools.local_batch_size(cfg.batch_size, world_size)
    main = _is_main_process()
    # every process reads (resume), only rank 0 writes
    run_path = Path(run_dir) if run_dir is not None else None
    write_path = _resolve_run_dir(run_dir) if main else None
    model.to(device)
    guide.to(device)
    pyro.set_rng_seed(cfg.seed)
    elbo = make_elbo(cfg.elbo, **cfg.elbo_kwargs)
    differentiable = has_differentiable_loss(elbo)
    moded = mode_dependent_modules(model, guide)
    if moded and valid_data is not None and type(elbo).__name__.startswith("Jit"):
        raise ValueError(
            f"{type(elbo).__name__} compiles the train-mode behaviour of {moded[0]} into its "
            "trace, so validation could not switch it off (eval mode); train with the non-JIT "
            f"ELBO ({type(elbo).__name__[3:]}) or without dropout/batch norm")

    sampler = ResumableSampler(train_data, cfg.shuffle, cfg.seed, cfg.drop_last)
    loader = DataLoader(
        train_data,
        batch_size=local_batch,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        drop_last=cfg.drop_last,
        generator=torch.Generator().manual_seed(cfg.seed),  # re-seeded every epoch below
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} with drop_last=True leaves no batch for "
            f"{len(train_data)} training examples ({world_size} process(es))"
        )
    total_steps = cfg.num_steps if cfg.num_steps is not None else cfg.num_epochs * steps_per_epoch
    if valid_data is None and (cfg.valid_every or cfg.early_stopping_patience):
        raise ValueError("valid_every / early_stopping_patience need valid_data=...")
    valid_loader = None
    if valid_data is not None:
        valid_loader = DataLoader(
            valid_data, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_fn
        )

    # Materialise lazily created parameters (autoguides, pyro.param) on a first batch, with
    # the global RNG untouched, then build the optimizer over every parameter.
    first = to_device(next(iter(DataLoader(train_data, batch_size=min(2, len(train_data)),
                                           collate_fn=collate_fn,
                                           generator=torch.Generator()))), device)
    with torch.random.fork_rng(devices=[]), poutine.block():
        args, kwargs = batch_args(first)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
    run_params = {name for trace in (guide_trace, model_trace)
                  for name, site in trace.nodes.items() if site["type"] == "param"}
    params = collect_parameters(model, guide, param_names=run_params)
    if not params:
        raise ValueError(
            "model and guide have no trainable parameters: build them as nn.Module/PyroModule"
        )
    opt_cls = _OPTIMIZERS[cfg.optimizer]
    opt_kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("adam", "adamw", "adamax"):
        opt_kwargs["betas"] = tuple(cfg.betas)
    optimizer = opt_cls(params, **opt_kwargs)
    scheduler = _make_scheduler(optimizer, cfg, total_steps)
    averaged = ([p.detach().clone() for p in params] if cfg.ema_decay > 0 else None)
    caches = _flow_caches(model, guide)
    # a JIT ELBO replays its compiled graph, which neither calls the fields' Python forward nor
    # keeps their backward hooks: its counts would be wrong, so it gets none
    counters = {} if type(elbo).__name__.startswith("Jit") else nfe_counters(model, guide)

    state = {
        "step": 0,
        "best_valid": None,
        "bad_validations": 0,
        "elapsed": 0.0,  # on the budget's clock
        "wall_elapsed": 0.0,
        "time_budget": cfg.time_budget,
        "last_loss": float("nan"),
        "stopped": "completed",
    }
    history: list[dict] = []
    ckpt_path = run_path / CHECKPOINT if run_path else None
    last_ckpt_step: int | None = None
    if resume:
        if ckpt_path is None:
            raise ValueError("resume=True needs run_dir=... holding a checkpoint.pt")
        ckpt = None
        if main and ckpt_path.exists():  # rank 0 reads it and sends it to the others
            ckpt = load_checkpoint(ckpt_path, map_location=device if world_size == 1 else "cpu")
        ckpt = ddp_tools.broadcast_object(ckpt)
        if ckpt is not None:
            saved_clock = ckpt["state"].get("time_budget", "wall")
            if saved_clock != cfg.time_budget:
                raise ValueError(
                    f"the run in {run_path} measured its time budget in {saved_clock!r} seconds; "
                    f"resume it with time_budget={saved_clock!r} (got {cfg.time_budget!r})")
            _check_resumed_config(ckpt.get("config"), cfg, run_path)
            _restore(ckpt, model, guide, optimizer, scheduler)
            if averaged is not None:
                _restore_average(ckpt, averaged, run_path)
            state.update(ckpt["state"])
            _apply_resumed_lr(optimizer, scheduler, cfg.lr)
            changes = _recovery_changes(ckpt.get("config"), cfg, state["step"])
            if changes:  # kept in every later checkpoint (train_config.json has the new values)
                state["resume_changes"] = [*state.get("resume_changes", []), *changes]
            last_ckpt_step = state["step"]
            if main:
                history = _read_metrics(run_path / METRICS, state["step"])
    if rank > 0:  # the processes' noise streams differ (rank 0 keeps the single-process stream)
        pyro.set_rng_seed(ddp_tools.derived_seed(cfg.seed, rank, state["step"]) % 2**32)
    if write_path is not None and not resume:  # a fresh run must not inherit an old run's files
        for stale in (BEST, CHECKPOINT):
            (write_path / stale).unlink(missing_ok=True)
    if write_path is not None:
        with open(write_path / TRAIN_CONFIG, "w") as handle:
            json.dump({**cfg.to_json(), "world_size": world_size}, handle, indent=2,
                      default=str)
        _rewrite_metrics(write_path / METRICS, history)

    # Data parallelism: DDP over the ELBO module for differentiable ELBOs (rank 0's parameters
    # are broadcast when it is built); gradients it does not own (loss_and_grads ELBOs, pyro.param
    # outside the modules) are all-reduced by hand. Backward runs on world_size * local loss.
    ddp_module = None
    manual_sync: list[torch.Tensor] = []
    if world_size > 1:
        extras = list(_extra_store_params([model, guide], run_params).values())
        ddp_tools.broadcast_([p.data for p in extras])
        if differentiable:
            ddp_module = ddp_tools.wrap_ddp(ddp_tools.ELBOModule(model, guide, elbo), device)
            manual_sync = extras
        else:
            ddp_tools.broadcast_([p.data for p in params])
            manual_sync = params
        if averaged is not None:  # rank 0's average (its initial or restored weights) for all
            ddp_tools.broadcast_(averaged)

    def _module_states() -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "guide": {k: v.detach().clone() for k, v in guide.state_dict().items()},
            "param_store": {
                k: v.detach().clone()
                for k, v in _extra_store_params([model, guide], run_params).items()
            },
        }

    def save(path: Path, holds_average: bool = False) -> None:
        """``holds_average``: the parameters hold the average now (the best checkpoint);
        otherwise the periodic checkpoint also stores the average, by name under
        ``"averaged"`` (what :func:`restore_modules` loads) and as the list ``"ema"`` that
        a resumed run restores."""
        named_average = None
        if averaged is not None and not holds_average:
            with _swapped(params, averaged):
                named_average = _module_states()
        atomic_save(
            {
                "model": model.state_dict(),
                "guide": guide.state_dict(),
                "param_store": {
                    k: v.detach().clone()
                    for k, v in _extra_store_params([model, guide], run_params).items()
                },
                "param_store_state": pyro.get_param_store().get_state(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "ema": None if holds_average else averaged,
                "averaged": named_average,
                "state": dict(state),
                "config": cfg.to_json(),
            },
            path,
        )

    model_fn: Callable = model
    guide_fn: Callable = guide
    prefix = None
    if needs_param_sites(elbo):
        prefix = f"_seqlatent_train{next(_REGISTRATIONS)}"
        guide_fn = registering(guide, prefix, nn.ModuleDict({"model": model, "guide": guide}))
    stopped = state["stopped"]  # an early-stopped run stays stopped when resumed
    if cfg.max_time_s is not None and state["elapsed"] >= cfg.max_time_s:
        stopped = "time_budget"  # a resumed run whose budget is spent takes no further step

    def check_parameters(step: int) -> None:
        """Before anything is saved: a finite step can still produce inf parameters."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingDiverged(step, "a parameter after the optimizer step",
                                   ckpt_path if last_ckpt_step else None, last_ckpt_step)

    clock = time.perf_counter if cfg.time_budget == "wall" else time.process_time
    start_time = clock() - state["elapsed"]
    wall_start = time.perf_counter() - state.get("wall_elapsed", 0.0)
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True)
    metrics_file = open(write_path / METRICS, "a") if write_path else None  # noqa: SIM115
    try:
        while state["step"] < total_steps and stopped == "completed":
            epoch, offset = divmod(state["step"], steps_per_epoch)
            sampler.set_epoch(epoch)
            sampler.skip = offset * local_batch
            loader.generator.manual_seed(cfg.seed + epoch)  # worker seeds: a function of epoch
            example_indices = _batched_indices(sampler, local_batch) if cfg.example_noise else None
            for i_batch, batch in enumerate(loader):
                step = state["step"] + 1
                t0 = time.perf_counter()
                batch = to_device(batch, device)
                n = batch_size(batch)
                beta = _kl_scale(cfg, step)
                optimizer.zero_grad(set_to_none=True)
                reset_counters(counters)
                noise = (ddp_tools.ExampleNoise(example_indices[i_batch], seed=cfg.seed, step=step)
                         if example_indices is not None else contextlib.nullcontext())
                try:
                    with noise:
                        if ddp_module is not None:
                            args, kwargs = batch_args(batch)
                            loss = ddp_module(_annealed(model_fn, beta), _annealed(guide_fn, beta),
                                              *args, **kwargs)
                        else:
                            loss = elbo_loss(
                                elbo, _annealed(model_fn, beta), _annealed(guide_fn, beta), batch,
                                differentiable=differentiable,
                            )
                except ValueError as err:
                    # Pyro's argument validation sees NaN/inf distribution parameters first.
                    if "Expected parameter" not in str(err) or state["step"] == 0:
                        raise
                    raise TrainingDiverged(
                        step, f"a distribution parameter ({str(err).splitlines()[0]})",
                        ckpt_path if last_ckpt_step else None, last_ckpt_step,
                    ) from err
                if differentiable:
                    (loss * world_size if ddp_module is not None else loss).backward()
                if manual_sync:  # DDP averaged world_size * grad; the rest is summed here
                    ddp_tools.all_reduce_gradients_(
                        manual_sync, 1.0 / world_size if ddp_module is not None else 1.0)
                max_norm = cfg.clip_norm if cfg.clip_norm is not None else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                over_time = (cfg.max_time_s is not None
                             and clock() - start_time >= cfg.max_time_s)
                totals = loss.detach().to(grad_norm)
                nfe = nfe_record(counters)  # this step's solves (validation runs after)
                if world_size > 1:  # global loss, batch, time flag, NFE: no host sync here
                    totals = torch.stack([totals, torch.full_like(grad_norm, n),
                                          torch.full_like(grad_norm, float(over_time)),
                                          *(torch.full_like(grad_norm, float(v))
                                            for v in nfe.values())])
                    ddp_tools.all_reduce_([totals])
                loss_value, *rest, norm_value = (
                    torch.cat([totals.reshape(-1), grad_norm.reshape(1)]).cpu().tolist()
                )
                if rest:
                    n, over_time = int(round(rest[0])), rest[1] > 0
                    nfe = dict(zip(nfe, (int(round(v)) for v in rest[2:]), strict=True))
                if not math.isfinite(loss_value) or not math.isfinite(norm_value):
                    what = "the loss" if not math.isfinite(loss_value) else "the gradient norm"
                    raise TrainingDiverged(step, what, ckpt_path if last_ckpt_step else None,
                                           last_ckpt_step)
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                if averaged is not None:
                    _update_average(averaged, params, cfg.ema_decay, step)
                for module in caches:
                    module.clear_cache()
                state["step"] = step
                state["last_loss"] = loss_value / n
                record = {
                    "step": step,
                    "epoch": epoch + (offset + 1) / steps_per_epoch,
                    "loss": loss_value / n,
                    "grad_norm": norm_value,
                    "lr": lr_used,  # the step's, not the next one's
                    "kl_scale": beta,
                    "time_s": clock() - start_time,
                    "examples_per_s": n / max(time.perf_counter() - t0, 1e-9),
                    **nfe,
                }
                offset += 1
                # the final state is validated too, so that the best checkpoint can be the last
                # one (the steps after the last periodic validation are not thrown away)
                final = step >= total_steps or over_time
                if valid_loader is not None and cfg.valid_every and (
                        step % cfg.valid_every == 0 or final):
                    with _swapped(params, averaged):
                        valid = mean_loss(model, guide, valid_loader, elbo, device,
                                          cfg.valid_max_batches, seed=cfg.seed)
                    record["valid_loss"] = valid
                    if not math.isfinite(valid):
                        raise TrainingDiverged(step, "the validation loss",
                                               ckpt_path if last_ckpt_step else None,
                                               last_ckpt_step)
                    best = state["best_valid"]
                    if best is None or valid < best - cfg.early_stopping_min_delta:
                        state["best_valid"] = valid
                        state["bad_validations"] = 0
                        if write_path is not None:
                            check_parameters(step)
                            state["elapsed"] = clock() - start_time
                            state["wall_elapsed"] = time.perf_counter() - wall_start
                            with _swapped(params, averaged):  # the weights validated
                                save(write_path / BEST, holds_average=True)
                    else:
                        state["bad_validations"] += 1
                        if (cfg.early_stopping_patience is not None
                                and state["bad_validations"] >= cfg.early_stopping_patience):
                            stopped = state["stopped"] = "early_stopping"
                if step % max(1, cfg.log_every) == 0 or "valid_loss" in record:
                    history.append(record)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    for callback in callbacks if main else ():
                        callback(record, model, guide)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}",
                                    ex_s=f"{record['examples_per_s']:.0f}", refresh=False)
                if over_time:  # decided before the sync, so every process agrees
                    stopped = "time_budget"
                is_last = step >= total_steps or stopped != "completed"
                if write_path is not None and (
                    is_last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                ):
                    check_parameters(step)
                    state["elapsed"] = clock() - start_time
                    state["wall_elapsed"] = time.perf_counter() - wall_start
                    save(ckpt_path)
                    last_ckpt_step = step
                if is_last:
                    break
        if averaged is not None:  # hand back the averaged weights, which validation scored
            with torch.no_grad():
                for p, a in zip(params, averaged, strict=True):
                    p.copy_(a)
    finally:
        if prefix is not None:  # the registrations were only for this run's ELBO
            store = pyro.get_param_store()
            for name in [n for n in store.keys() if n.startswith(prefix)]:
                del store[name]
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return TrainResult(
        history=history,
        step=state["step"],
        final_loss=state["last_loss"],
        best_valid=state["best_valid"],
        stopped=stopped,
        run_dir=write_path if main else run_path,
        wall_time_s=time.perf_counter() - wall_start,
        budget_time_s=clock() - start_time,
    )


#: settings a resumed run may change: its length, budget and bookkeeping, and the two knobs
#: that recover a diverged run from its last good checkpoint (``lr``, which rescales the restored
#: schedule, see :func:`_apply_resumed_lr`, and ``clip_norm``), not what it computes
RESUMABLE_CHANGES = frozenset({"num_steps", "num_epochs", "max_time_s", "progress", "log_every",
                               "checkpoint_every", "num_workers", "pyro_validation", "device",
                               "early_stopping_patience", "early_stopping_min_delta",
                               "lr", "clip_norm"})


def _default_settings() -> dict:
    """The default value of every :class:`TrainConfig` field that has one."""
    out = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _check_resumed_config(saved: dict | None, cfg: TrainConfig, run_path) -> None:
    """A resumed run must train as the run it continues: the same optimizer, schedule, batch
    size, seed, ELBO, annealing, validation...; only :data:`RESUMABLE_CHANGES` may differ (a new
    batch size would misplace the run in its epoch). ``lr`` and ``clip_norm`` may change: see
    :func:`_apply_resumed_lr` and :func:`_recovery_changes`."""
    if not saved:
        return
    new = json.loads(json.dumps(cfg.to_json(), default=str))
    # a setting the saved run predates had its default value then (the behaviour before the
    # setting existed), so it is compared against that default
    old = json.loads(json.dumps({**_default_settings(), **saved}, default=str))
    changed = sorted(k for k in old if k not in RESUMABLE_CHANGES and old[k] != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"resume: the run in {run_path} was trained with other settings ({diffs}); resume "
            "it with its own settings (train_config.json), or train a new run in another folder")


def _batched_indices(sampler: ResumableSampler, size: int) -> list[list[int]]:
    """The dataset indices of this process's batches, in the order the loader yields them (the
    sampler is deterministic given its epoch and skip)."""
    indices = list(iter(sampler))
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _rewrite_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _restore_store_extras(ckpt: dict) -> None:
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


def _update_average(averaged: list[torch.Tensor], params: list[torch.Tensor], decay: float,
                    step: int) -> None:
    r""":math:`\bar\theta \leftarrow d_t\bar\theta + (1 - d_t)\theta` with
    :math:`d_t = \min(d, (1 + t) / (10 + t))` after optimizer step :math:`t`."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for a, p in zip(averaged, params, strict=True):
            a.lerp_(p.detach(), 1.0 - d)


@contextlib.contextmanager
def _swapped(params: list[torch.Tensor], averaged: list[torch.Tensor] | None):
    """Inside: the parameters hold the averaged values; on exit, their own values again."""
    if averaged is None:
        yield
        return
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, a in zip(params, averaged, strict=True):
            p.copy_(a)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, o in zip(params, own, strict=True):
                p.copy_(o)


def _restore_average(ckpt: dict, averaged: list[torch.Tensor], run_path) -> None:
    saved = ckpt.get("ema")
    if saved is None or len(saved) != len(averaged):
        raise ValueError(f"the checkpoint in {run_path} holds no parameter average for these "
                         "parameters; resume it with the ema_decay it was trained with")
    with torch.no_grad():
        for a, s in zip(averaged, saved, strict=True):
            a.copy_(s)


def _restore(ckpt: dict, model: nn.Module, guide: nn.Module, optimizer, scheduler) -> None:
    model.load_state_dict(ckpt["model"])
    guide.load_state_dict(ckpt["guide"])
    _restore_store_extras(ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])


#: the resumable settings that change what a run computes (the recovery of a diverged run);
#: a resume that changes them is recorded in the checkpoint's ``state["resume_changes"]``
RECOVERY_SETTINGS = ("lr", "clip_norm")


def _recovery_changes(saved: dict | None, cfg: TrainConfig, step: int) -> list[dict]:
    """``{"step", "setting", "from", "to"}`` for each of :data:`RECOVERY_SETTINGS` that a resume
    at ``step`` changes (compared like :func:`_check_resumed_config`: a setting the saved run
    predates had its default)."""
    if not saved:
        return []
    old = {**_default_settings(), **saved}
    new = cfg.to_json()
    return [{"step": step, "setting": k, "from": old.get(k), "to": new.get(k)}
            for k in RECOVERY_SETTINGS if old.get(k) != new.get(k)]


def _apply_resumed_lr(optimizer, scheduler, lr: float) -> float | None:
    r"""Make a resumed run train at base learning rate ``lr`` where its checkpoint had another.

    The restored optimizer and scheduler carry the old base rate :math:`\eta_\mathrm{old}`; the
    schedule's factors :math:`f(t)` (warm-up, decay, floor) are kept, so every later step uses
    :math:`\eta_t = \eta_\mathrm{new} f(t)` and the step right after the checkpoint
    :math:`\eta_\mathrm{new} f(t_\mathrm{ckpt})`. Returns the old base rate, or None when
    it was ``lr`` already."""
    old = [float(b) for b in scheduler.base_lrs]
    if all(b == lr for b in old):
        return None
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, base in zip(optimizer.param_groups, old, strict=True):
        group["initial_lr"] = lr
        group["lr"] = group["lr"] * (lr / base)  # = lr * f(t_ckpt)
    return old[0]


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
    model.load_state_dict(source["model"])
    guide.load_state_dict(source["guide"])
    _restore_store_extras(source)
    return ckpt
