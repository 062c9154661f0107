"""Inference: the one training loop, the one evaluation path, and loading finished runs."""

from pyro_seqlatent.infer.elbos import ELBOS, DeviceTrace_ELBO, make_elbo
from pyro_seqlatent.infer.evaluate import MarginalEstimate, evaluate, log_marginal
from pyro_seqlatent.infer.modes import eval_mode
from pyro_seqlatent.infer.run import Run, load_run
from pyro_seqlatent.infer.train import (
    ScaleLatents,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    mean_loss,
    train,
)

__all__ = [
    "ELBOS",
    "DeviceTrace_ELBO",
    "MarginalEstimate",
    "Run",
    "ScaleLatents",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "eval_mode",
    "evaluate",
    "load_run",
    "log_marginal",
    "make_elbo",
    "mean_loss",
    "train",
]
