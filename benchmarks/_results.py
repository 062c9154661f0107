"""Rows of a benchmark's JSON table, merged safely by several invocations running at once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` + ``.lock`` for the duration of the block."""
    with open(str(path) + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_rows(path: Path, new: list[dict], *, key: Callable[[dict], object] = lambda r: r["row"],
               order: Callable[[dict], object] | None = None) -> list[dict]:
    """Re-read ``path`` under the lock, replace the rows whose ``key`` matches a new row, add
    the rest, sort by ``order`` and write atomically (a per-process temporary file). Returns the
    merged rows."""
    path = Path(path)
    with locked(path):
        rows = json.loads(path.read_text()) if path.exists() else []
        fresh = {key(r) for r in new}
        merged = [r for r in rows if key(r) not in fresh] + list(new)
        if order is not None:
            merged.sort(key=order)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1, default=str))
        tmp.replace(path)
    return merged


def check_tag(parser, tag: str) -> None:
    """``parser.error`` unless ``tag`` (a ``--tag`` naming a variant row, used in folder and file
    names) is empty or a plain name."""
    if tag and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", tag):
        parser.error(f"--tag {tag!r}: use letters, digits, '_', '.', '-' only, not starting "
                     "with '.' or '-'")


def json_object(parser, flag: str, text: str, example: str) -> dict:
    """``text`` (the value of ``flag``) parsed as a JSON object, or ``parser.error`` with
    ``example`` as the fix."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f"{flag} is not JSON ({e}); e.g. {example}")
    if not isinstance(value, dict):
        parser.error(f"{flag} must be a JSON object, e.g. {example}")
    return value


def train_options(parser, text: str, fixed: set, fixed_hint: str,
                  defaults: tuple = ({},)) -> dict:
    """``--train-options`` (``text``) as a dict of :class:`TrainConfig` fields, or
    ``parser.error``: not a JSON object, a field the benchmark sets itself (``fixed``, which
    flags set them: ``fixed_hint``), an unknown field, a schedule whose horizon is ``num_steps``
    (these benchmarks stop on a time budget) or settings ``TrainConfig`` rejects once merged
    over each of ``defaults`` (the trained models' own training defaults)."""
    from pyro_seqlatent.infer.config import TrainConfig, settings

    extra = json_object(parser, "--train-options", text, "'{\"weight_decay\": 0.001}'")
    known = set(settings()) - set(fixed)
    bad = sorted(set(extra) - known)
    if bad:
        parser.error(f"--train-options: {bad} cannot be set here ({fixed_hint}); allowed: "
                     f"{sorted(known)}")
    if extra.get("lr_schedule") in ("cosine", "exponential"):
        parser.error(f"--train-options: lr_schedule={extra['lr_schedule']!r} spans num_steps, "
                     "which a time budget leaves unreached; use 'step' (lr_step_size, lr_decay, "
                     "lr_min_factor)")
    for base in defaults:
        try:
            TrainConfig(**{**base, **extra, "num_steps": 1}).validate()
        except (TypeError, ValueError) as e:
            parser.error(f"--train-options: {e}")
    return extra


def resume_changes(run_dir: Path) -> list[dict]:
    """The settings a resume changed (``lr``, ``clip_norm``: ``train`` keeps them in its
    checkpoint's state), so that a recovered row does not pass for one trained with its
    command's settings throughout."""
    from pyro_seqlatent.infer.checkpoint import load_checkpoint
    from pyro_seqlatent.infer.train import CHECKPOINT

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return []
    return list(load_checkpoint(path)["state"].get("resume_changes", []))


def describe_changes(changes: list[dict], scored_step: int | None = None) -> str:
    """``"; resumed at step N with lr X (was Y)"`` for each change, and whether the scored state
    predates it."""
    return "".join(
        f"; resumed at step {c['step']} with {c['setting']} {c['to']} (was {c['from']})"
        + (", after the scored state" if scored_step is not None and scored_step <= c["step"]
           else "")
        for c in changes)
