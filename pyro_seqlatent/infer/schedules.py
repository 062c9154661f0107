r"""Schedules of a run: the learning rate :math:`\eta_t` and the KL weight :math:`\beta_t`.

* Learning rate: :math:`\eta_t = \eta\, \max(f(t), f_\mathrm{min})\, w(t)` after :math:`t`
  optimizer steps, with :math:`f` the ``cosine`` (:math:`\tfrac12(1 + \cos(\pi t / T))`),
  ``exponential`` (:math:`d^{t/T}`) or ``step`` (:math:`d^{\lfloor t / s\rfloor}`) factor and
  :math:`w(t) = \min(1, (t + 1) / W)` a linear warm-up.
* KL weight: :math:`\beta_t = \beta_\mathrm{start} + (\beta_\mathrm{end} - \beta_\mathrm{start})
  \min(1, t / T_\beta)`, and :math:`\beta_\mathrm{end}` throughout when :math:`T_\beta = 0`;
  :class:`ScaleLatents` applies it to every latent site of model and guide, so the loss is
  :math:`-\mathbb E_q[\log p(x\mid z)] + \beta_t\,\mathrm{KL}(q\,\|\,p)` (Bowman et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.poutine.messenger import Messenger

from pyro_seqlatent.infer.config import Schedule


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


def annealed(fn: Callable, scale: float) -> Callable:
    """``fn`` with its latent sites scaled by ``scale`` (``fn`` itself at 1)."""
    return fn if scale == 1.0 else ScaleLatents(scale)(fn)


def kl_scale(schedule: Schedule, step: int) -> float:
    r""":math:`\beta_t` at step :math:`t = 1, 2, \dots`"""
    end = float(schedule.kl_anneal_end)
    if schedule.kl_anneal_steps <= 0:
        return end
    frac = min(1.0, step / schedule.kl_anneal_steps)
    return schedule.kl_anneal_start + (end - schedule.kl_anneal_start) * frac


def lr_factor(schedule: Schedule, step: int, total_steps: int) -> float:
    r""":math:`\eta_t / \eta` after ``step`` optimizer steps of ``total_steps``."""
    kind = schedule.lr_schedule if schedule.lr_schedule not in (None, "none") else None
    f = 1.0
    if kind == "cosine":
        f *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    elif kind == "exponential":
        f *= schedule.lr_decay ** (step / max(1, total_steps))
    elif kind == "step":
        f *= schedule.lr_decay ** (step // max(1, schedule.lr_step_size))
    f = max(f, schedule.lr_min_factor)
    warmup = max(0, int(schedule.lr_warmup_steps))
    if warmup and step < warmup:
        f *= (step + 1) / warmup
    return f


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor is :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, step, total_steps))


def apply_resumed_lr(optimizer, scheduler, lr: float) -> float | None:
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
