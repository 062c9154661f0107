"""Atomic checkpoints that load without running code, with everything needed to continue a run
bit for bit.

A checkpoint holds the model's and guide's ``state_dict``, the ``pyro.param`` values outside
those modules, the optimizer and scheduler states, the global random-number generators (python,
numpy, torch CPU and CUDA) and the loop counters. The data order is a function of
``(seed, epoch)`` and the step, so it needs no state of its own. It is written to a temporary
file in the same folder and then renamed over the old one (``os.replace``), so a crash while
writing never leaves a torn file (and the temporary file is removed, or, after a kill, removed
when the run starts again: :func:`remove_temporary_files`).

**Safety.** A checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only, plus an explicit allow-list of Pyro's and torch's constraint
classes (:data:`SAFE_GLOBALS`, the constraints of ``pyro.param`` sites). Nothing in a file can run
code, whoever wrote it. Checkpoints of format 1 (written before December 2026) pickled numpy's
RNG state and cannot be read that way: :func:`load_checkpoint` refuses them with
:class:`UnsafeCheckpointError`, and :func:`convert_checkpoint` (``pyro-seqlatent convert-run RUN
--trust``) rewrites a folder you trust in the safe format, after which it resumes bit for bit.
"""

from __future__ import annotations

import inspect
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions.constraints as pyro_constraints
import torch
from torch.distributions import constraints as torch_constraints

#: ``checkpoint["format"]`` of the files :func:`atomic_save` callers write now; format 1 files
#: (no ``"format"`` key) pickled numpy objects
FORMAT = 2


def _constraint_classes() -> list[type]:
    found = {obj for module in (torch_constraints, pyro_constraints)
             for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, torch_constraints.Constraint)}
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


#: the only classes (besides tensors and plain containers) a checkpoint may hold: constraints
SAFE_GLOBALS = _constraint_classes()


class RunFileError(ValueError):
    """A file of a run folder that cannot be read; the message names the file and what to do
    (the command line prints it as one line)."""


class CheckpointError(RunFileError):
    """A checkpoint file that cannot be read; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds Python objects a safe load refuses (an old format, or a file
    someone tampered with); nothing in it was run."""


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain values (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (or a format-1 state with numpy's own tuple)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                 saved["has_gauss"], saved["cached"])
    np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename; on any failure
    the temporary file is removed and the old ``path`` is left as it was."""
    return _atomic(path, lambda handle: torch.save(obj, handle))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` (e.g. a checkpoint serialised earlier) as :func:`atomic_save` does."""
    return _atomic(path, lambda handle: handle.write(data))


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_save` left in ``folder``."""
    removed = []
    for stale in Path(folder).glob(".*.pt.*.tmp"):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True`` with :data:`SAFE_GLOBALS`).

    :raises FileNotFoundError: no such file.
    :raises UnsafeCheckpointError: the file holds other Python objects (format 1, or tampered).
    :raises CheckpointError: the file is truncated or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or "Unsupported class" in str(err):  # an object, not damage
            raise UnsafeCheckpointError(_unsafe_message(path, err)) from None
        raise CheckpointError(_corrupt_message(path, err)) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(_corrupt_message(path, err)) from None


def _unsafe_message(path: Path, err: Exception) -> str:
    detail = next((line.strip() for line in str(err).splitlines()
                   if "GLOBAL" in line), "")
    detail = f" ({detail})" if detail else ""
    return (f"{path} holds Python objects that a safe load refuses{detail}; nothing in it was "
            "run. A checkpoint written by pyro_seqlatent before format 2 "
            "(numpy RNG objects) can be converted, if and only if you trust where the folder "
            f"came from: `pyro-seqlatent convert-run {path.parent} --trust` (Python: "
            "pyro_seqlatent.infer.checkpoint.convert_checkpoint(path, trust=True)). A file from "
            "elsewhere may be hostile: do not convert it.")


def _corrupt_message(path: Path, err: Exception) -> str:
    reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return (f"{path} cannot be read: it is truncated or corrupt ({type(err).__name__}: {reason})."
            " Re-run the training (or resume from another checkpoint of the run, e.g. "
            "checkpoint.pt instead of best.pt), or copy the run folder again.")


def convert_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Path:
    """Rewrite a format-1 checkpoint in the safe format, in place (atomically).

    This unpickles the file with ``weights_only=False``, which runs whatever code it holds:
    ``trust=True`` says that you know where the file comes from. Returns ``path``.
    """
    path = Path(path)
    if not trust:
        raise ValueError(f"convert_checkpoint({str(path)!r}) unpickles the file, which runs any "
                         "code it holds: pass trust=True only for a file whose origin you trust")
    try:
        load_checkpoint(path)
        return path  # already safe
    except UnsafeCheckpointError:
        pass
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    rng = dict(ckpt["rng"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    rng["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    atomic_save({**ckpt, "rng": rng, "format": FORMAT}, path)
    load_checkpoint(path)  # it must now load safely
    return path
