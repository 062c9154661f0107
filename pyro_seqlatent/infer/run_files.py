"""The JSON files of a run folder (``config.json``, ``train_config.json``, ``metrics.jsonl``),
written atomically and read with errors that name the file and say what to do."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from pyro_seqlatent.infer.checkpoint import RunFileError, atomic_write_bytes


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """``obj`` as indented JSON, through a temporary file and an atomic rename."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write_bytes(text.encode(), path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; :class:`RunFileError` naming it when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(
            f"{path} cannot be read: it is not valid JSON ({type(err).__name__}: "
            f"{str(err)[:120]}). Restore it from a copy of the run folder, or train the run "
            "again in a new folder.") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file. A torn last line (a write the process did not finish)
    is left out with a warning; any other line that is not JSON raises :class:`RunFileError`
    naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise RunFileError(f"{path} cannot be read: it is not text. Delete it (the run's "
                           "checkpoints do not need it) or restore it from a copy.") from None
    rows = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for k, (number, line) in enumerate(numbered):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                warnings.warn(f"{path}: line {number} is incomplete (an interrupted write) and "
                              "was left out", stacklevel=2)
                break
            raise RunFileError(f"{path} cannot be read: line {number} is not JSON. Delete the "
                               "file (the run's checkpoints do not need it) or restore it from a "
                               "copy.") from None
    return rows
