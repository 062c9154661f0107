r"""One SVI step's loss and gradients, on one process or many.

For a batch :math:`B` the step computes the negative ELBO :math:`\sum_{n\in B} -\mathrm{ELBO}_n`
with latent sites scaled by :math:`\beta_t` (see :mod:`~pyro_seqlatent.infer.schedules`), its
gradients (``differentiable_loss`` + ``backward`` where the ELBO has it, ``loss_and_grads``
otherwise), clips their norm, and reads the loss, batch size and norm in one host sync. Under
DDP the ELBO module is wrapped in ``DistributedDataParallel``; gradients it does not own (a
``loss_and_grads`` ELBO, ``pyro.param`` outside the modules) are all-reduced by hand, and the
figures are summed over processes in the same tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pyro_seqlatent.infer import distributed as ddp_tools
from pyro_seqlatent.infer.batches import batch_args, batch_size
from pyro_seqlatent.infer.elbos import has_differentiable_loss
from pyro_seqlatent.infer.guards import DivergenceGuard
from pyro_seqlatent.infer.nfe import nfe_record, reset_counters
from pyro_seqlatent.infer.params import (
    extra_store_params,
    forget_registrations,
    needs_param_sites,
    registering,
    registration_prefix,
)
from pyro_seqlatent.infer.schedules import annealed


@dataclass
class StepFigures:
    """A step's figures, summed over processes: the loss (a sum over the global batch), the
    number of examples, the gradient norm (after clipping's measurement), whether a process ran
    out of time, and the function-evaluation counts."""

    loss: float
    n: int
    grad_norm: float
    over_time: bool
    nfe: dict = field(default_factory=dict)


def elbo_loss(elbo, model, guide, batch, *, differentiable: bool) -> torch.Tensor:
    """The ELBO loss (a sum over the batch) for ``batch``; gradients are accumulated into
    ``.grad`` when ``differentiable`` is False (``loss_and_grads``), else the returned tensor
    is differentiable."""
    args, kwargs = batch_args(batch)
    if differentiable:
        return elbo.differentiable_loss(model, guide, *args, **kwargs)
    return torch.as_tensor(elbo.loss_and_grads(model, guide, *args, **kwargs))


class SVIStep:
    """Loss and gradients of one step (the optimizer step itself is the caller's).

    :param params: the trained parameters (clipped, and synced under DDP).
    :param run_params: names of the run's ``param`` sites (for ``pyro.param`` extras).
    :param counters: function-evaluation counters (:mod:`pyro_seqlatent.infer.nfe`).
    """

    def __init__(self, model: nn.Module, guide: nn.Module, elbo, params: Sequence[torch.Tensor],
                 run_params: set[str], *, clip_norm: float | None, device, world_size: int,
                 counters: dict, guard: DivergenceGuard):
        self.elbo = elbo
        self.params = list(params)
        self.differentiable = has_differentiable_loss(elbo)
        self.clip_norm = clip_norm if clip_norm is not None else float("inf")
        self.world_size = world_size
        self.counters = counters
        self.guard = guard
        self.model_fn: Callable = model
        self.guide_fn: Callable = guide
        self.ddp_module = None
        self.manual_sync: list[torch.Tensor] = []
        if world_size > 1:
            self._distribute(model, guide, run_params, device)
        self.prefix = None
        if needs_param_sites(elbo):
            self.prefix = registration_prefix()
            modules = {k: m for k, m in (("model", model), ("guide", guide))
                       if isinstance(m, nn.Module)}
            if modules:
                self.guide_fn = registering(guide, self.prefix, nn.ModuleDict(modules))

    def _distribute(self, model, guide, run_params, device) -> None:
        """DDP over the ELBO module for differentiable ELBOs (rank 0's parameters are broadcast
        when it is built); the other gradients are all-reduced by hand."""
        if not (isinstance(model, nn.Module) and isinstance(guide, nn.Module)):
            raise TypeError("under DDP, model and guide must be nn.Modules (PyroModules): "
                            "DistributedDataParallel wraps them; a plain-function model or "
                            "guide trains in one process")
        extras = list(extra_store_params([model, guide], run_params).values())
        ddp_tools.broadcast_([p.data for p in extras])
        if self.differentiable:
            self.ddp_module = ddp_tools.wrap_ddp(ddp_tools.ELBOModule(model, guide, self.elbo),
                                                 device)
            self.manual_sync = extras
        else:
            ddp_tools.broadcast_([p.data for p in self.params])
            self.manual_sync = self.params

    def _loss(self, batch, beta: float) -> torch.Tensor:
        model, guide = annealed(self.model_fn, beta), annealed(self.guide_fn, beta)
        if self.ddp_module is not None:
            args, kwargs = batch_args(batch)
            return self.ddp_module(model, guide, *args, **kwargs)
        return elbo_loss(self.elbo, model, guide, batch, differentiable=self.differentiable)

    def __call__(self, batch, *, step: int, beta: float, first: bool,
                 noise: contextlib.AbstractContextManager, out_of_time: Callable[[], bool]
                 ) -> StepFigures:
        """Zero, compute and clip the gradients of ``batch`` (by their global norm, as
        ``torch.nn.utils.clip_grad_norm_``); raise
        :class:`~pyro_seqlatent.infer.guards.TrainingDiverged` when they or the loss are not
        finite. ``first``: the first step of a fresh run (a distribution error then is a broken
        model, not a divergence); ``out_of_time()`` is asked before the sync so every process
        agrees."""
        for p in self.params:
            p.grad = None
        reset_counters(self.counters)
        try:
            with noise:
                loss = self._loss(batch, beta)
        except ValueError as err:
            raise self.guard.from_distribution_error(step, err, first) from err
        if self.differentiable:
            (loss * self.world_size if self.ddp_module is not None else loss).backward()
        if self.manual_sync:  # DDP averaged world_size * grad; the rest is summed here
            ddp_tools.all_reduce_gradients_(
                self.manual_sync, 1.0 / self.world_size if self.ddp_module is not None else 1.0)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        figures = self._read(loss, batch_size(batch), grad_norm, out_of_time())
        self.guard.check_step(step, figures.loss / max(figures.n, 1), figures.grad_norm)
        # clip_grad_norm_'s rule (scale by max / (norm + 1e-6) when below 1), applied only when
        # it changes something: no pass over the gradients to multiply them by 1
        if figures.grad_norm + 1e-6 > self.clip_norm:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, grad_norm)
        return figures

    def _read(self, loss, n: int, grad_norm, over_time: bool) -> StepFigures:
        """One host sync: the loss and norm (and, under DDP, the global batch, the time flag and
        the counts, all-reduced in the same tensor)."""
        totals = loss.detach().to(grad_norm)
        nfe = nfe_record(self.counters)  # this step's solves (validation runs after)
        if self.world_size > 1:
            totals = torch.stack([totals, torch.full_like(grad_norm, n),
                                  torch.full_like(grad_norm, float(over_time)),
                                  *(torch.full_like(grad_norm, float(v)) for v in nfe.values())])
            ddp_tools.all_reduce_([totals])
        loss_value, *rest, norm_value = (
            torch.cat([totals.reshape(-1), grad_norm.reshape(1)]).cpu().tolist())
        if rest:
            n, over_time = int(round(rest[0])), rest[1] > 0
            nfe = dict(zip(nfe, (int(round(v)) for v in rest[2:]), strict=True))
        return StepFigures(loss_value, n, norm_value, over_time, nfe)

    def close(self) -> None:
        """Forget the param-store registrations made for this run's ELBO."""
        forget_registrations(self.prefix)
