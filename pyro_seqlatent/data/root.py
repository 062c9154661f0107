"""Where real data lives: the data root and clear errors for missing files.

Data never comes from the web. Every loader takes an optional ``root``; when it is not given,
the environment variable ``PYRO_SEQLATENT_DATA`` names the folder (the Makefile points it at
``../shared/data`` when that folder exists).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PYRO_SEQLATENT_DATA"


class DataNotFoundError(FileNotFoundError):
    """A data file the loader needs is not under the data root."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$PYRO_SEQLATENT_DATA``.

    Raises :class:`DataNotFoundError` naming the variable when neither is set.
    """
    if root is None:
        root = os.environ.get(ENV_VAR)
        if not root:
            raise DataNotFoundError(
                f"No data root: pass root=... or set the environment variable {ENV_VAR} to the "
                "folder that holds the benchmark data (for this project, ../shared/data; "
                "see its README.md)."
            )
    return Path(root).expanduser()


def data_file(relative: str, root: str | os.PathLike | None = None) -> Path:
    """The path of ``relative`` under the data root; raises if the file does not exist.

    The error names the missing file and the variable ``PYRO_SEQLATENT_DATA``.
    """
    path = data_root(root) / relative
    if not path.exists():
        raise DataNotFoundError(
            f"Data file not found: {path}. Set {ENV_VAR} (currently "
            f"{os.environ.get(ENV_VAR)!r}) or pass root=... to the folder that contains "
            f"{relative!r} (see ../shared/data/README.md)."
        )
    return path
