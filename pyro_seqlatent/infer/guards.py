r"""The divergence guard: a run stops at the first non-finite loss, gradient norm, distribution
parameter, parameter or validation loss, and at a loss that explodes while staying finite,
naming the step and the last good checkpoint, which it leaves intact.

*Explodes*: a step's loss per data point :math:`\ell_t` with

.. math:: \ell_t > \ell_1 + k \max(|\ell_1|, 1)
   \quad\text{or (after :data:`MIN_HISTORY` steps)}\quad
   \ell_t > h + k \max(h - l,\; 10^{-3} \max(1, |h|))

where :math:`\ell_1` is the first loss of the session (at the initial or resumed parameters),
:math:`l, h` are the lowest and highest of the last :data:`WINDOW` losses and :math:`k` is
``divergence_factor`` (10 by default; None turns the rule off). The first rule catches a run
that blows up in its first steps (a learning rate far too high), the second one later. Noise
and steady trends (a loss that falls, or rises with the KL weight) stay inside them; a blow-up
by orders of magnitude does not. The loss of step :math:`t` is computed at the parameters of
step :math:`t - 1`, so the trainer writes a periodic checkpoint only once the next step's loss
has passed the guard.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch


class TrainingDiverged(RuntimeError):
    """Raised at the first non-finite loss or gradient; names the step and last checkpoint."""

    def __init__(self, step: int, what: str, checkpoint: Path | None, checkpoint_step: int | None,
                 problem: str = "is not finite", folder: Path | None = None):
        self.step = step
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        if checkpoint is not None:
            where = (f"the last good checkpoint is {checkpoint} (step {checkpoint_step}), left "
                     "intact; resume from it with a lower learning rate or gradient clipping")
        elif folder is not None:
            where = (f"no checkpoint from before it was kept in {folder}; train again with a "
                     "lower learning rate or gradient clipping (clip_norm)")
        else:
            where = "no checkpoint was written (pass run_dir=... and checkpoint_every=...)"
        super().__init__(f"training diverged at step {step}: {what} {problem}; {where}")


#: losses the explosion rule compares a step's loss with, and how many it needs first
WINDOW, MIN_HISTORY = 50, 20


class DivergenceGuard:
    """Builds :class:`TrainingDiverged` with the last good checkpoint of the run.

    :param path: the run's ``checkpoint.pt`` (None without a run folder).
    :param last_step: the step of the checkpoint on disk (None before the first one).
    :param factor: :math:`k` of the explosion rule (None: only non-finite losses stop a run).
    """

    def __init__(self, path: Path | None, last_step: int | None = None,
                 factor: float | None = 10.0):
        self.path = path
        self.last_step = last_step
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.first: float | None = None

    def saved(self, step: int) -> None:
        """A checkpoint of ``step`` has been written."""
        self.last_step = step

    def diverged(self, step: int, what: str, problem: str = "is not finite"
                 ) -> TrainingDiverged:
        return TrainingDiverged(step, what, self.path if self.last_step else None,
                                self.last_step, problem,
                                self.path.parent if self.path is not None else None)

    def check_step(self, step: int, loss: float, grad_norm: float) -> None:
        """Before the optimizer step: the loss (per data point) and the gradient norm are
        finite, and the loss has not exploded."""
        if not math.isfinite(loss):
            raise self.diverged(step, "the loss")
        if not math.isfinite(grad_norm):
            raise self.diverged(step, "the gradient norm")
        if self.factor is not None:
            self._check_explosion(step, loss)
        if self.first is None:
            self.first = loss
        self.recent.append(loss)

    def _check_explosion(self, step: int, loss: float) -> None:
        k = self.factor
        if self.first is not None and loss > self.first + k * max(abs(self.first), 1.0):
            raise self.diverged(
                step, f"the loss {loss:.6g}",
                f"exploded (above {self.first + k * max(abs(self.first), 1.0):.6g}: the first "
                f"loss of the run was {self.first:.6g}; divergence_factor={k:g})")
        if len(self.recent) >= MIN_HISTORY:
            lo, hi = min(self.recent), max(self.recent)
            limit = hi + k * max(hi - lo, 1e-3 * max(1.0, abs(hi)))
            if loss > limit:
                raise self.diverged(
                    step, f"the loss {loss:.6g}",
                    f"exploded (above {limit:.6g}: the last {len(self.recent)} steps' losses "
                    f"lay in [{lo:.6g}, {hi:.6g}]; divergence_factor={k:g})")

    def check_parameters(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """Before anything is saved: a finite step can still produce inf parameters."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise self.diverged(step, "a parameter after the optimizer step")

    def check_validation(self, step: int, valid: float) -> None:
        if not math.isfinite(valid):
            raise self.diverged(step, "the validation loss")

    def from_distribution_error(self, step: int, err: ValueError, first_step: bool) -> Exception:
        """Pyro's argument validation sees NaN/inf distribution parameters first: a
        ``ValueError("Expected parameter ...")`` after the first step is a divergence; anything
        else (or at the first step of a run: a broken model) is re-raised as it is."""
        if "Expected parameter" not in str(err) or first_step:
            return err
        return self.diverged(step, f"a distribution parameter ({str(err).splitlines()[0]})")
