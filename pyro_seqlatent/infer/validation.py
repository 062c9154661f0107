"""Validation: the mean negative ELBO on held-out data with common random numbers, and the
early-stopping rule that reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pyro_seqlatent.infer.batches import batch_args, batch_size, to_device
from pyro_seqlatent.infer.config import Validation
from pyro_seqlatent.infer.elbos import has_differentiable_loss
from pyro_seqlatent.infer.modes import eval_mode


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


class Validator:
    """Scores the validation data every ``valid_every`` steps (and at the final step) and keeps
    the early-stopping count in the loop state (``best_valid``, ``bad_validations``)."""

    def __init__(self, loader: Iterable, elbo, device, settings: Validation, seed: int):
        self.loader = loader
        self.elbo = elbo
        self.device = device
        self.settings = settings
        self.seed = seed

    def due(self, step: int, final: bool) -> bool:
        every = self.settings.valid_every
        return bool(every) and (step % every == 0 or final)

    def score(self, model, guide) -> float:
        return mean_loss(model, guide, self.loader, self.elbo, self.device,
                         self.settings.valid_max_batches, seed=self.seed)

    def judge(self, state: dict, valid: float) -> str:
        """``"best"`` (a new best: the caller saves it), ``"worse"`` or ``"stop"`` (the patience
        is used up); updates ``state``."""
        best = state["best_valid"]
        if best is None or valid < best - self.settings.early_stopping_min_delta:
            state["best_valid"] = valid
            state["bad_validations"] = 0
            return "best"
        state["bad_validations"] += 1
        patience = self.settings.early_stopping_patience
        return "stop" if patience is not None and state["bad_validations"] >= patience else "worse"
