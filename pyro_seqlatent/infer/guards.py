"""The divergence guard: a run stops at the first non-finite loss, gradient norm, distribution
parameter, parameter or validation loss, naming the step and the last good checkpoint, which it
leaves intact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


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


class DivergenceGuard:
    """Builds :class:`TrainingDiverged` with the last good checkpoint of the run.

    :param path: the run's ``checkpoint.pt`` (None without a run folder).
    :param last_step: the step of the checkpoint on disk (None before the first one).
    """

    def __init__(self, path: Path | None, last_step: int | None = None):
        self.path = path
        self.last_step = last_step

    def saved(self, step: int) -> None:
        """A checkpoint of ``step`` has been written."""
        self.last_step = step

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        return TrainingDiverged(step, what, self.path if self.last_step else None,
                                self.last_step)

    def check_step(self, step: int, loss: float, grad_norm: float) -> None:
        """Before the optimizer step: the loss and the gradient norm are finite."""
        if loss != loss or abs(loss) == float("inf"):
            raise self.diverged(step, "the loss")
        if grad_norm != grad_norm or abs(grad_norm) == float("inf"):
            raise self.diverged(step, "the gradient norm")

    def check_parameters(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """Before anything is saved: a finite step can still produce inf parameters."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise self.diverged(step, "a parameter after the optimizer step")

    def check_validation(self, step: int, valid: float) -> None:
        if valid != valid or abs(valid) == float("inf"):
            raise self.diverged(step, "the validation loss")

    def from_distribution_error(self, step: int, err: ValueError, first_step: bool) -> Exception:
        """Pyro's argument validation sees NaN/inf distribution parameters first: a
        ``ValueError("Expected parameter ...")`` after the first step is a divergence; anything
        else (or at the first step of a run: a broken model) is re-raised as it is."""
        if "Expected parameter" not in str(err) or first_step:
            return err
        return self.diverged(step, f"a distribution parameter ({str(err).splitlines()[0]})")
