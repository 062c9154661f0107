"""Where real data lives: the data root and clear errors for missing files.

Data never comes from the web. Every loader takes an optional ``root``; when it is not given,
the environment variable ``PYRO_SEQLATENT_DATA`` names the folder (the Makefile points it at
``../shared/data`` when that folder exists).

A file that is there but cannot be read (truncated, corrupt, not the expected format) raises
:class:`DataFileError`, whose one-line message names the file, says what is wrong and what to
do; the loaders read their files inside :func:`reading_data_file`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV_VAR = "PYRO_SEQLATENT_DATA"

#: what to do about a damaged data file
RECOPY_ADVICE = ("Copy the data folder again (../shared/data; its README.md lists the sha256 of "
                 f"every file) or point {ENV_VAR} / --data-root at a good copy.")


class DataNotFoundError(FileNotFoundError):
    """A data file the loader needs is not under the data root."""


class DataFileError(DataNotFoundError, ValueError):
    """A data or cache file that exists but cannot be read: truncated, corrupt or not the
    expected format. The message (one line) names the file, what is wrong and what to do.

    A :class:`DataNotFoundError`, so whoever reports a missing data file (the command line
    prints it as one line, exit status 2) reports this one the same way, and a
    :class:`ValueError` (the file's content is wrong).
    """


def describe_error(err: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 200 characters of it)."""
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def data_file_error(path: str | os.PathLike, problem: str, err: BaseException | None = None,
                    advice: str = RECOPY_ADVICE) -> DataFileError:
    """A :class:`DataFileError` saying ``"{path} cannot be read: {problem} ({err}). {advice}"``."""
    cause = f" ({describe_error(err)})" if err is not None else ""
    return DataFileError(f"{path} cannot be read: {problem}{cause}. {advice}")


@contextmanager
def reading_data_file(path: str | os.PathLike, problem: str,
                      advice: str = RECOPY_ADVICE) -> Iterator[None]:
    """Turn any error raised while reading ``path`` into a :class:`DataFileError` naming it
    (a :class:`DataFileError` raised inside passes unchanged); keep only the parsing of the
    file inside the block."""
    try:
        yield
    except DataFileError:
        raise
    except Exception as err:  # a damaged file fails in the parser's own way: EOF, zlib, struct
        raise data_file_error(path, problem, err, advice) from err


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
