"""Inference: the one training loop, the one evaluation path, and loading finished runs.

What users need, on purpose: :func:`train` and its settings (:class:`TrainConfig`, its groups
:class:`Optimization` ... :class:`Diagnostics` and :func:`settings`, each setting with its help
text), :func:`evaluate` / :func:`log_marginal` (per point, or the evidence of the whole batch
for global latents), :func:`posterior_check` (the guide against NUTS), the ELBOs, and finished
runs: :func:`load_run`, :func:`read_metrics`, and :func:`restore_modules` to load a checkpoint
(``CHECKPOINT``: the last, ``BEST``: the best validation) into a model and guide, and
:func:`score_sequences`: per-step and per-sequence −ELBO and NLL of sequence models.
"""

from pyro_seqlatent.infer.config import (
    Batching,
    Checkpointing,
    Diagnostics,
    Length,
    Optimization,
    Schedule,
    Validation,
    settings,
)
from pyro_seqlatent.infer.elbos import ELBOS, DeviceTrace_ELBO, make_elbo
from pyro_seqlatent.infer.evaluate import MarginalEstimate, evaluate, log_marginal
from pyro_seqlatent.infer.modes import eval_mode
from pyro_seqlatent.infer.posterior_check import PosteriorCheck, posterior_check
from pyro_seqlatent.infer.run import Run, load_run, read_metrics
from pyro_seqlatent.infer.scoring import SequenceScores, score_sequences
from pyro_seqlatent.infer.train import (
    BEST,
    CHECKPOINT,
    ScaleLatents,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    mean_loss,
    restore_modules,
    train,
)

__all__ = [
    "BEST",
    "CHECKPOINT",
    "ELBOS",
    "Batching",
    "Checkpointing",
    "DeviceTrace_ELBO",
    "Diagnostics",
    "Length",
    "MarginalEstimate",
    "Optimization",
    "PosteriorCheck",
    "Run",
    "ScaleLatents",
    "Schedule",
    "SequenceScores",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "Validation",
    "eval_mode",
    "evaluate",
    "load_run",
    "log_marginal",
    "make_elbo",
    "mean_loss",
    "posterior_check",
    "read_metrics",
    "restore_modules",
    "score_sequences",
    "settings",
    "train",
]
