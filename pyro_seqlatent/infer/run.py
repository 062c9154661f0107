"""Finished runs in Python: ``load_run(path)`` gives back the trained model and guide.

A run folder written by ``pyro-seqlatent train`` (or
:func:`pyro_seqlatent.experiments.systems.train_system`) holds ``config.json`` (registered model
name and its options), ``train_config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (last) and
``best.pt`` (best validation loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyro_seqlatent.infer.checkpointing import BEST, CHECKPOINT, TRAIN_CONFIG, restore_modules
from pyro_seqlatent.infer.config import TrainConfig
from pyro_seqlatent.infer.metrics_log import METRICS
from pyro_seqlatent.infer.run_files import read_json, read_jsonl

RUN_CONFIG = "config.json"


@dataclass
class Run:
    """A trained model/guide pair with its configuration and learning curve."""

    path: Path
    model: nn.Module
    guide: nn.Module
    options: dict
    #: the run's training settings by flat name (``lr``, ``batch_size``, ...)
    train_config: dict
    metrics: list[dict]
    checkpoint: Path
    spec: Any = None
    extra: dict = field(default_factory=dict)

    def datasets(self, root: str | os.PathLike | None = None) -> dict:
        """The run's train/valid/test datasets (rebuilt from its options)."""
        if self.spec is None:
            raise ValueError("this run was not made from a registered model; load data yourself")
        return self.spec.datasets(self.options, root)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    return read_jsonl(path)


def load_run(
    path: str | os.PathLike,
    *,
    which: str = "best",
    model: nn.Module | None = None,
    guide: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> Run:
    """Rebuild a run's model and guide and load their trained parameters.

    :param path: the run folder.
    :param which: ``"best"`` (best validation loss, falling back to the last checkpoint when the
        run had no validation) or ``"last"``.
    :param model, guide: modules to load into, for runs of models that are not registered
        (``train(..., run_dir=...)`` from Python); registered runs rebuild them from
        ``config.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    if which not in ("best", "last"):
        raise ValueError(f"which={which!r}: use 'best' or 'last'")
    ckpt = path / (BEST if which == "best" else CHECKPOINT)
    if not ckpt.exists():
        ckpt = path / CHECKPOINT
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint in {path} (expected {BEST} or {CHECKPOINT})")
    config: dict = {}
    if (path / RUN_CONFIG).exists():
        config = read_json(path / RUN_CONFIG)
    spec = None
    options = config.get("options", {})
    if model is None or guide is None:
        if "model" not in config:
            raise ValueError(
                f"{path / RUN_CONFIG} does not name a registered model; pass model= and guide="
            )
        from pyro_seqlatent.registry import get_model

        spec = get_model(config["model"])
        model, guide = spec.build(spec.options(**options))
    model.to(device)
    guide.to(device)
    restore_modules(ckpt, model, guide, map_location=device)
    model.eval()
    guide.eval()
    train_config = {}
    if (path / TRAIN_CONFIG).exists():
        # by flat setting name, whether the file is grouped (schema 2) or an older flat one
        train_config = TrainConfig.flatten(read_json(path / TRAIN_CONFIG))
    return Run(path, model, guide, options, train_config, read_metrics(path), ckpt, spec,
               extra=config)
