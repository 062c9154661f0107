"""Launch ``pyro-seqlatent train`` as several data-parallel processes on this machine.

``pyro-seqlatent train MODEL --nproc N ...`` re-runs the same command under ``torchrun
--standalone --nproc_per_node N`` (one machine); for several machines run ``torchrun ... -m
pyro_seqlatent.cli train ...`` yourself (docs: "Training on many GPUs or machines").
"""

from __future__ import annotations

import subprocess
import sys
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


def relaunch(argv: list[str], nproc: int, run_dir: str | Path) -> int:
    """Run :func:`torchrun_command` and return its exit status."""
    return subprocess.call(torchrun_command(argv, nproc, run_dir))
