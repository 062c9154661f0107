r"""Polyak averaging of the trained parameters.

After optimizer step :math:`t`,
:math:`\bar\theta_t = d_t\,\bar\theta_{t-1} + (1 - d_t)\,\theta_t` with
:math:`d_t = \min(d, (1 + t) / (10 + t))`, so that the first steps are not dominated by the
initial values. Validation, the best checkpoint and the modules :func:`train` hands back hold
:math:`\bar\theta`; the optimizer keeps stepping :math:`\theta`. Buffers (batch-norm statistics)
are not averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class ParameterAverage:
    """The running average :math:`\\bar\\theta` of ``params`` (a copy, updated in place)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.values = [p.detach().clone() for p in self.params]

    def update(self, step: int) -> None:
        r""":math:`\bar\theta \leftarrow d_t\bar\theta + (1 - d_t)\theta` after step :math:`t`."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for a, p in zip(self.values, self.params, strict=True):
                a.lerp_(p.detach(), 1.0 - d)

    def load(self, saved: Sequence[torch.Tensor] | None, where: object) -> None:
        """Take the values of a checkpoint's ``"ema"`` list."""
        if saved is None or len(saved) != len(self.values):
            raise ValueError(f"the checkpoint in {where} holds no parameter average for these "
                             "parameters; resume it with the ema_decay it was trained with")
        with torch.no_grad():
            for a, s in zip(self.values, saved, strict=True):
                a.copy_(s)

    def copy_to_params(self) -> None:
        """Give the parameters the averaged values for good (the end of a run)."""
        with torch.no_grad():
            for p, a in zip(self.params, self.values, strict=True):
                p.copy_(a)


@contextlib.contextmanager
def swapped(average: ParameterAverage | None) -> Iterator[None]:
    """Inside: the parameters hold the averaged values; on exit, their own values again (a
    no-op without an average)."""
    if average is None:
        yield
        return
    own = [p.detach().clone() for p in average.params]
    average.copy_to_params()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, o in zip(average.params, own, strict=True):
                p.copy_(o)
