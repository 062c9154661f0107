"""Train, evaluate and sample a registered system: where a model, its data and inference meet.

The command line (:mod:`pyro_seqlatent.cli`) parses its arguments and calls these; Python users
and benchmark scripts call them directly::

    from pyro_seqlatent.experiments.systems import evaluate_run, train_system

    result, model, guide, datasets = train_system("vae", {"latent_dim": 2}, "runs/vae",
                                                  num_steps=100)
    scores = evaluate_run("runs/vae", num_samples=100, max_points=500)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_seqlatent.infer import evaluate, load_run, train
from pyro_seqlatent.infer.run import RUN_CONFIG
from pyro_seqlatent.infer.run_files import read_json, write_json
from pyro_seqlatent.registry import get_model

__all__ = ["default_run_dir", "evaluate_run", "run_summary", "sample_run", "train_system"]


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<date>-<time>``: the run folder of a run that names none."""
    return Path(f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_resumed_options(run_dir: Path, name: str, options: dict) -> None:
    """Resuming continues the same model on the same data: refuse other model options."""
    from pyro_seqlatent.infer.train import CHECKPOINT

    path = run_dir / RUN_CONFIG
    if not (path.exists() and (run_dir / CHECKPOINT).exists()):
        return  # nothing to continue: a fresh run
    saved = read_json(path)
    new = json.loads(json.dumps(options, default=str))
    old = saved.get("options", {})
    changed = sorted(k for k in old if k in new and old[k] != new[k])
    if saved.get("model", name) != name or changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed)
        raise ValueError(
            f"resume: {run_dir} holds a {saved.get('model')!r} run with other options "
            f"({diffs or 'another model'}); resume it with its own options (config.json) or "
            "train in another folder")


def _absolute_data(options: dict) -> dict:
    """``options`` with the ``data`` file (docs/own-data.md) as an absolute path, so that
    ``config.json`` finds it again from any folder (``evaluate``, ``load_run``)."""
    if options.get("data"):
        options = {**options, "data": str(Path(str(options["data"])).expanduser().resolve())}
    return options


def train_system(
    name: str,
    options: dict | None = None,
    run_dir: str | Path | None = None,
    *,
    data_root: str | None = None,
    resume: bool = False,
    **train_kwargs: Any,
):
    """Build the registered system ``name``, load its data and train it with
    :func:`~pyro_seqlatent.infer.train` (its ``ModelSpec.train_defaults`` under
    ``train_kwargs``).

    Writes ``config.json`` (model name and options) beside the trainer's files so that
    :func:`~pyro_seqlatent.infer.load_run` can rebuild it. Returns ``(result, model, guide,
    datasets)``.

    Your own data: the option ``data`` (``--data FILE`` on the command line) of the systems
    that take one (``vae``, ``sbn``, ``flow_density``, ``vrnn``, ``rnn``, ``latent_ode``,
    ``ode_rnn``, ``rnn_dt``) names a ``.npz`` / ``.pt`` file
    (:mod:`pyro_seqlatent.data.user_files`, docs/own-data.md); it is stored as an absolute
    path, and ``evaluate_run`` / ``load_run`` read the same file.
    """
    spec = get_model(name)
    options = spec.options(**_absolute_data(options or {}))
    run_dir = Path(run_dir or default_run_dir(name))
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {**spec.train_defaults, **train_kwargs}
    pyro.clear_param_store()
    pyro.set_rng_seed(settings.get("seed", 0))
    datasets = spec.datasets(options, data_root)
    model, guide = spec.build(options)
    if resume:
        _check_resumed_options(run_dir, name, options)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        write_json({"model": name, "options": options, "data_root": data_root},
                   run_dir / RUN_CONFIG)
    settings.setdefault("elbo", spec.elbo)
    result = train(model, guide, datasets["train"], valid_data=datasets.get("valid"),
                   collate_fn=spec.collate_fn, run_dir=run_dir, resume=resume, **settings)
    return result, model, guide, datasets


def run_summary(result) -> dict:
    """The one-line JSON summary ``pyro-seqlatent train`` prints of a
    :class:`~pyro_seqlatent.infer.TrainResult`; with ``collapse_every``, the last collapse
    diagnostics (KL per data point, active units) and a ``warning`` when the latent is
    unused (:mod:`pyro_seqlatent.infer.collapse`)."""
    from pyro_seqlatent.parallel import world

    out = {"run_dir": str(result.run_dir), "steps": result.step,
           "final_loss": result.final_loss, "best_valid": result.best_valid,
           "state": result.state, "best_step": result.best_step, "stopped": result.stopped,
           "wall_time_s": round(result.wall_time_s, 1),
           "processes": world()[1]}
    last = next((r["collapse"] for r in reversed(result.history) if "collapse" in r), None)
    if last is not None:
        out["collapse"] = {k: last[k] for k in ("kl", "active_units", "num_units")}
        if last["collapsed"]:
            out["warning"] = ("posterior collapse: the latent is unused (KL per dimension and "
                              "step below the threshold or no active unit; see collapse in "
                              "metrics.jsonl)")
    return out


def _run_datasets(run, data_root: str | None, data: str | None) -> dict:
    """The run's splits; with ``data``, those of that file of yours, read with the run's own
    options (docs/own-data.md)."""
    if data is None:
        return run.datasets(data_root)
    if run.spec is None or "data" not in run.spec.defaults:
        from pyro_seqlatent.data.user_files import UserDataError

        raise UserDataError(f"data={data}: the run's system {run.extra.get('model')!r} does "
                            "not read your files (docs/own-data.md)")
    return run.spec.datasets({**run.options, **_absolute_data({"data": data})}, data_root)


def evaluate_run(run_dir: str | Path, *, split: str = "test", num_samples: int = 1000,
                 max_points: int | None = None, batch_size: int = 100, device: str = "cpu",
                 data_root: str | None = None, seed: int = 0, progress: bool = False,
                 data: str | None = None) -> dict:
    """Importance-sampled log-likelihood and ELBO of a trained run on one split, or on
    ``split="all"`` of them (``max_points``: a fixed random subset,
    :func:`~pyro_seqlatent.data.subsets.fixed_subset`). ``data``: score that file of yours
    instead of the run's data (the same family and size of example; docs/own-data.md)."""
    from torch.utils.data import ConcatDataset

    from pyro_seqlatent.data.subsets import fixed_subset

    run = load_run(run_dir, device=device)
    splits = _run_datasets(run, data_root, data)
    if split == "all":
        chosen = ConcatDataset([splits[s] for s in ("train", "valid", "test")])
    elif split in splits:
        chosen = splits[split]
    else:
        raise ValueError(f"split={split!r}: use one of {sorted(splits)} or 'all'")
    data = fixed_subset(chosen, max_points)
    spec = run.spec
    out = evaluate(run.model, run.guide, data, num_samples=num_samples, batch_size=batch_size,
                   collate_fn=spec.collate_fn, batch_plate=spec.batch_plate, device=device,
                   seed=seed, progress=progress)
    return {k: v for k, v in out.items() if not k.endswith("per_point")}


def sample_run(run_dir: str | Path, num_samples: int = 16, *, out: str | Path | None = None,
               seed: int = 0, device: str = "cpu") -> Path:
    """Draw ``num_samples`` from a trained run's generative process (``ModelSpec.generate``)
    and save them to ``out`` (default ``RUN_DIR/samples.pt``); returns that path. A model
    without a generator raises ``ValueError``."""
    run = load_run(run_dir, device=device)
    if run.spec is None or run.spec.generate is None:
        raise ValueError(f"model {run.extra.get('model')!r} has no generator")
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        samples = run.spec.generate(run.model, num_samples, run.options)
    path = Path(out or Path(run_dir) / "samples.pt")
    torch.save(samples, path)
    return path
