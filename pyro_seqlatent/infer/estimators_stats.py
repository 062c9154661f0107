r"""Measure gradient estimators: variance and signal-to-noise ratio at fixed parameters, and
ELBO against steps and wall time when training with each.

For a parameter group with coordinates :math:`i = 1..P` and :math:`N` independent draws
:math:`g^{(1..N)}` of the estimator at fixed parameters (Welford's running moments, float64):

.. math:: \bar g_i = \frac1N \sum_n g^{(n)}_i,\qquad
          v_i = \frac{1}{N-1}\sum_n \bigl(g^{(n)}_i - \bar g_i\bigr)^2,\qquad
          \mathrm{SNR}_i = \frac{|\bar g_i|}{\sqrt{v_i}}

(Rainforth et al. 2018). Summaries per group: the mean per-coordinate variance
:math:`\frac1P\sum_i v_i`, the mean and median :math:`\mathrm{SNR}_i`, and the norm ratio
:math:`\lVert \bar g\rVert / \sqrt{\sum_i v_i}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from pyro_seqlatent.infer.batches import batch_args
from pyro_seqlatent.infer.elbos import has_differentiable_loss
from pyro_seqlatent.infer.estimators_elbos import clear_average_baselines
from pyro_seqlatent.infer.modes import eval_mode
from pyro_seqlatent.infer.train import train


@dataclass
class GroupStats:
    """Moments of one parameter group's gradient over the draws (flattened coordinates)."""

    name: str
    num_draws: int
    mean: torch.Tensor
    var: torch.Tensor

    @property
    def size(self) -> int:
        return self.mean.numel()

    @property
    def sem(self) -> torch.Tensor:
        """Standard error of :attr:`mean`, per coordinate."""
        return (self.var / self.num_draws).sqrt()

    @property
    def snr(self) -> torch.Tensor:
        """:math:`|\\bar g_i| / \\sqrt{v_i}` per coordinate (coordinates whose gradient is
        identically zero are NaN)."""
        std = self.var.sqrt()
        out = self.mean.abs() / std
        return torch.where((std == 0) & (self.mean == 0), torch.full_like(out, math.nan), out)

    @property
    def flag(self) -> str | None:
        """``"non-finite"`` (a NaN or inf in the mean or variance), ``"zero gradient"``
        (identically zero: never ranked), ``"exact"`` (zero variance, non-zero mean: an exact
        gradient such as enumeration's) or ``None``."""
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.var).all()):
            return "non-finite"
        if (self.var == 0).all():
            return "zero gradient" if (self.mean == 0).all() else "exact"
        return None

    def summary(self) -> dict[str, float]:
        snr = self.snr
        snr = snr[~snr.isnan()]
        total_var = float(self.var.sum())
        return {
            "size": self.size,
            "mean_variance": float(self.var.mean()),
            "mean_snr": float(snr.mean()) if snr.numel() else math.nan,
            "median_snr": float(snr.median()) if snr.numel() else math.nan,
            "norm_snr": float(self.mean.norm() / math.sqrt(total_var)) if total_var > 0
            else math.inf,
            "mean_grad_norm": float(self.mean.norm()),
        }


@dataclass
class GradientStats:
    """What :func:`gradient_stats` returns: per-group moments, the mean loss, seconds per draw."""

    groups: dict[str, GroupStats]
    loss_mean: float
    loss_std: float
    seconds_per_draw: float
    num_draws: int
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: g.summary() for name, g in self.groups.items()}


def parameter_groups(model: nn.Module, guide: nn.Module) -> dict[str, list[torch.Tensor]]:
    """``{"guide": …, "model": …, "shared": …}``: trainable parameters of the guide only, of the
    model only, and of both (empty groups are left out). For a VAE, *guide* is the encoder and
    *model* the decoder."""
    guide_ids = {id(p) for p in guide.parameters() if p.requires_grad}
    model_ids = {id(p) for p in model.parameters() if p.requires_grad}
    groups: dict[str, list[torch.Tensor]] = {"guide": [], "model": [], "shared": []}
    seen: set[int] = set()
    for module in (guide, model):
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            key = ("shared" if id(p) in guide_ids and id(p) in model_ids
                   else "guide" if id(p) in guide_ids else "model")
            groups[key].append(p)
    return {k: v for k, v in groups.items() if v}


def _resolve_groups(model, guide, groups) -> dict[str, list[torch.Tensor]]:
    if groups is None:
        resolved = parameter_groups(model, guide)
    elif isinstance(groups, Mapping):
        resolved = {str(k): list(v) for k, v in groups.items()}
    else:
        raise TypeError("groups must be None or a dict {name: iterable of parameters}, got "
                        f"{type(groups).__name__}")
    for name, params in resolved.items():
        if not params:
            raise ValueError(f"parameter group {name!r} is empty")
        for p in params:
            if not (torch.is_tensor(p) and p.requires_grad):
                raise TypeError(f"parameter group {name!r} holds something that is not a "
                                "trainable tensor")
    if not resolved:
        raise ValueError("model and guide have no trainable parameters")
    return resolved


def _materialize(model, guide, batch) -> None:
    """Run guide and model once (RNG untouched) so lazily created parameters exist."""
    args, kwargs = batch_args(batch)
    with torch.random.fork_rng(devices=[]), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_trace)(*args, **kwargs)


def gradient_stats(
    model: Callable,
    guide: Callable,
    data: Any,
    estimator: pyro.infer.ELBO,
    num_draws: int = 100,
    *,
    groups: Mapping[str, Iterable[torch.Tensor]] | None = None,
    warmup: int = 0,
    seed: int | None = 0,
) -> GradientStats:
    """Moments of ``estimator``'s gradient at the current (fixed) parameters.

    :param model, guide: the pair (``nn.Module`` s, or any callables with ``groups`` given).
    :param data: one batch, fed as ``model(*data)`` (tuple), ``model(**data)`` (dict) or
        ``model(data)``.
    :param estimator: any ``pyro.infer.ELBO`` (see :func:`make_estimator`); the gradient of one
        call is one draw (an estimator with ``num_particles=K`` averages K particles per draw).
    :param int num_draws: independent draws (≥ 2).
    :param groups: ``{name: parameters}``; default :func:`parameter_groups`.
    :param int warmup: draws taken first and discarded (lets stateful baselines adapt).
    :param seed: seed of the draws (``None``: leave the RNG alone); the global RNG is restored.
    """
    if not isinstance(estimator, pyro.infer.ELBO):
        raise TypeError(f"estimator must be a pyro.infer.ELBO, got {type(estimator).__name__}")
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    _materialize(model, guide, data)
    resolved = _resolve_groups(model, guide, groups)
    params = list({id(p): p for ps in resolved.values() for p in ps}.values())
    differentiable = has_differentiable_loss(estimator)
    moments = {name: None for name in resolved}
    losses = []
    with torch.random.fork_rng(devices=_cuda_devices(params)):
        if seed is not None:
            pyro.set_rng_seed(seed)
        clear_average_baselines()
        start = None
        for i in range(warmup + num_draws):
            if i == warmup:
                start = time.perf_counter()
            for p in params:
                p.grad = None
            loss = _draw(estimator, model, guide, data, differentiable)
            if i < warmup:
                continue
            losses.append(float(loss.detach()))
            for name, ps in resolved.items():
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                  .detach().reshape(-1).double() for p in ps])
                moments[name] = _welford(moments[name], flat)
        seconds = (time.perf_counter() - start) / num_draws
        for p in params:
            p.grad = None
    stats = {name: GroupStats(name, num_draws, m[1].float(), (m[2] / (num_draws - 1)).float())
             for name, m in moments.items()}
    loss_t = torch.tensor(losses, dtype=torch.float64)
    return GradientStats(stats, float(loss_t.mean()), float(loss_t.std()), seconds, num_draws)


_GRAD_FLAG = "_estimators_grad_flag"


def _with_param_site(guide: Callable) -> Callable:
    """``guide`` plus one unused ``pyro.param`` site: ``RenyiELBO.loss_and_grads`` (and other
    ELBOs without ``differentiable_loss``) only back-propagate when a trace has a param site."""

    def wrapped(*args, **kwargs):
        pyro.param(_GRAD_FLAG, lambda: torch.zeros(()))
        return guide(*args, **kwargs)

    return wrapped


def _draw(estimator, model, guide, batch, differentiable: bool) -> torch.Tensor:
    """One estimator call; gradients end up in ``.grad``; returns the loss."""
    args, kwargs = batch_args(batch)
    if differentiable:
        loss = estimator.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()
    return torch.as_tensor(estimator.loss_and_grads(model, _with_param_site(guide), *args,
                                                    **kwargs))


def _cuda_devices(params) -> list:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _welford(state, x: torch.Tensor):
    if state is None:
        return (1, x.clone(), torch.zeros_like(x))
    n, mean, m2 = state
    n += 1
    delta = x - mean
    mean = mean + delta / n
    m2 = m2 + delta * (x - mean)
    return (n, mean, m2)


# ----------------------------------------------------------------------------- run mode


@dataclass
class TrainingCurve:
    """ELBO (per data point, higher is better) of one estimator against steps and seconds."""

    estimator: str
    steps: list[int]
    seconds: list[float]
    elbo: list[float]
    train_seconds: float
    diverged: str | None = None

    def first_reaching(self, target: float) -> tuple[int | None, float | None]:
        """Step and training seconds at which the ELBO first reached ``target``."""
        for step, sec, value in zip(self.steps, self.seconds, self.elbo):
            if value >= target:
                return step, sec
        return None, None


def training_curve(
    name: str,
    build: Callable[[], tuple[nn.Module, nn.Module]],
    train_data,
    eval_batch: Any,
    estimator: pyro.infer.ELBO,
    *,
    num_steps: int,
    eval_every: int = 50,
    eval_elbo: pyro.infer.ELBO | None = None,
    seed: int = 0,
    **train_kwargs: Any,
) -> TrainingCurve:
    """Train a fresh ``build()`` pair with ``estimator`` by :func:`~pyro_seqlatent.infer.train`
    and record the ELBO per data point of ``eval_batch`` (``eval_elbo``, default a 10-particle
    ``Trace_ELBO`` with common random numbers) every ``eval_every`` steps. Seconds count training
    only (evaluation time is subtracted)."""
    from pyro_seqlatent.infer.batches import batch_size
    from pyro_seqlatent.infer.train import TrainingDiverged

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = build()
    eval_elbo = eval_elbo or pyro.infer.Trace_ELBO(num_particles=10, vectorize_particles=True)
    n_eval = batch_size(eval_batch)
    curve = TrainingCurve(name, [], [], [], 0.0)
    eval_time = [0.0]

    def evaluate(step: int, seconds: float) -> None:
        t0 = time.perf_counter()
        value = -_eval_loss(model, guide, eval_batch, eval_elbo, seed) / n_eval
        curve.steps.append(step)
        curve.seconds.append(seconds - eval_time[0])
        curve.elbo.append(value)
        eval_time[0] += time.perf_counter() - t0

    def callback(record, model_, guide_) -> None:
        if record["step"] % eval_every == 0 or record["step"] == num_steps:
            evaluate(record["step"], record["time_s"])

    clear_average_baselines()
    evaluate(0, 0.0)
    eval_time[0] = 0.0
    try:
        result = train(model, guide, train_data, elbo=estimator, num_steps=num_steps,
                       callbacks=[callback], progress=False, seed=seed, drop_last=True,
                       **train_kwargs)
        curve.train_seconds = result.wall_time_s - eval_time[0]
    except TrainingDiverged as err:
        curve.diverged = str(err).split(";")[0]
    return curve


def _eval_loss(model, guide, batch, elbo, seed: int) -> float:
    with torch.random.fork_rng(devices=[]), torch.no_grad(), eval_mode(model, guide):
        pyro.set_rng_seed(seed)
        args, kwargs = batch_args(batch)
        if has_differentiable_loss(elbo):
            return float(elbo.differentiable_loss(model, guide, *args, **kwargs))
        return float(elbo.loss(model, guide, *args, **kwargs))
