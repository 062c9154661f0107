"""Launch ``pyro-seqlatent train`` as several data-parallel processes on this machine.

``pyro-seqlatent train MODEL --nproc N ...`` re-runs the same command under ``torchrun
--standalone --nproc_per_node N`` (one machine); for several machines run ``torchrun ... -m
pyro_seqlatent.cli train ...`` yourself (docs: "Training on many GPUs or machines").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["relaunch", "torchrun_command"]


def torchrun_command(argv: list[str], nproc: int, run_dir: str | Path) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m pyro_seqlatent.cli
    train MODEL ...`` for ``train`` arguments ``argv`` (``--nproc`` removed, ``--run-dir`` fixed
    so that every process writes to, and resumes from, the same folder)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc" or arg == "--run-dir":
            skip = True
        elif not arg.startswith(("--nproc=", "--run-dir=")):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "pyro_seqlatent.cli", "train", *rest,
            "--run-dir", str(run_dir)]


#: seconds torchrun gets to stop its workers after a forwarded signal before all are killed
GRACE_S = 30.0


def relaunch(argv: list[str], nproc: int, run_dir: str | Path, grace_s: float = GRACE_S) -> int:
    """Run :func:`torchrun_command` and return its exit status.

    SIGINT and SIGTERM sent to this process are forwarded to torchrun (which stops its workers)
    and this process waits for it; whatever is still running ``grace_s`` seconds after the
    first forwarded signal (torchrun and its workers run in their own process group) is
    killed, so stopping the launcher never leaves processes behind."""
    child = subprocess.Popen(torchrun_command(argv, nproc, run_dir), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    deadline = None
    try:
        while True:
            try:
                return child.wait(timeout=0.5)  # short waits: the handler runs in between
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(child.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _kill_group(child.pid)


def _kill_group(pgid: int) -> None:
    """Kill what is left of the launched process group (workers whose parent died)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
