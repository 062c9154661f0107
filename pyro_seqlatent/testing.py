"""Helpers for tests and benchmarks: count host syncs, run a function in several local processes.

Nothing in the library calls these; they live in the package so that the test suite, the
benchmarks and your own checks share one implementation. Torch only (plus
:mod:`pyro_seqlatent.parallel` for the process group).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.multiprocessing as mp

from pyro_seqlatent.parallel import shutdown

# ------------------------------------------------------------------------------ host syncs
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_syncs() -> Iterator[dict[str, int]]:
    """Count calls that copy a tensor's value to the host (``.item()``, ``.tolist()``,
    ``.cpu()``, ``.numpy()``, ``bool``/``float``/``int`` of a tensor): on CUDA each one waits for
    the GPU. Yields a dict ``{method: count}`` filled while the block runs. (On the CPU nothing
    waits; the count says what *would* wait on a GPU.)"""
    counts = dict.fromkeys(_SYNC_METHODS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# ------------------------------------------------------------------------------ local launcher
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(local_rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update({
        "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        fn(local_rank, *args)
    finally:
        shutdown()


def run_local(fn: Callable, nprocs: int, *args: Any, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes on this machine with the launcher's
    environment set (loopback rendezvous), as ``torchrun --standalone`` would; for tests and
    benchmarks. The first process to fail stops the others and its traceback is raised here
    (``torch.multiprocessing.ProcessRaisedException``); after ``timeout_s`` every process is
    killed and a ``TimeoutError`` is raised. ``fn`` must be importable (a module-level function).
    """
    port = free_port()
    context = mp.start_processes(_entry, args=(fn, nprocs, port, args), nprocs=nprocs,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{nprocs} processes of {getattr(fn, '__name__', fn)} did "
                                   f"not finish within {timeout_s:.0f} s; they were killed")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
