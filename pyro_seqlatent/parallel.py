r"""``torch.distributed`` helpers shared by data-parallel SVI and sharded EM; torch only.

The process group (:func:`init_distributed`, :func:`world`, :func:`shutdown`), the collectives
on lists of tensors (:func:`all_reduce_`, :func:`broadcast_`, :func:`broadcast_object`) and the
seeds and batch sizes every process must agree on (:func:`derived_seed`,
:func:`local_batch_size`). Without a process group (or with one process) every collective is the
identity, so the same code runs in one process unchanged.

:mod:`pyro_seqlatent.em.distributed` (sufficient statistics summed over shards) and
:mod:`pyro_seqlatent.infer.distributed` (DDP of the ELBO) both build on this module; it imports
neither Pyro nor any other part of the package.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

#: default time a collective may wait for the other processes before failing (seconds)
DEFAULT_TIMEOUT_S = 300.0
#: default time every process has to reach the health check (seconds)
HEALTH_CHECK_TIMEOUT_S = 30.0


class ProcessesNotResponding(RuntimeError):
    """Some processes of the group did not reach a collective in time; names them when known."""


# ------------------------------------------------------------------------------ process group
def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_with_many_processes() -> bool:
    """Whether ``torchrun`` (or an equivalent launcher) set ``WORLD_SIZE`` > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | torch.device = "cpu", *, backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group described by the launcher's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) if not done yet, and return
    the device this process works on: ``cuda:LOCAL_RANK`` for ``device="cuda"``, else ``device``.

    :param backend: ``None`` picks ``"nccl"`` for CUDA and ``"gloo"`` for the CPU.
    :param timeout_s: how long a collective waits for a missing process before it raises (so a
        process that dies makes the others fail instead of hang).
    """
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not is_distributed():
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"environment variable {name} is not set: launch with torchrun "
                    "(torchrun --nproc_per_node N script.py) or set RANK, WORLD_SIZE, "
                    "MASTER_ADDR and MASTER_PORT"
                )
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def health_check(timeout_s: float = HEALTH_CHECK_TIMEOUT_S) -> None:
    """Every process must reach this point within ``timeout_s`` seconds; otherwise rank 0 raises
    :class:`ProcessesNotResponding` naming the ranks that did not (the other ranks raise it
    without names). A barrier monitored by rank 0 over gloo (a gloo side group under NCCL); a
    no-op without a process group. Call it from every process, e.g. after
    :func:`init_distributed`, so that a process that hangs is reported in seconds instead of
    after the collective timeout."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    group = None if dist.get_backend() == "gloo" else _gloo_group()
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s),
                               wait_all_ranks=True)
    except RuntimeError as err:
        raise ProcessesNotResponding(_not_responding(str(err), timeout_s)) from None


_GLOO_GROUP = None


def _gloo_group():
    global _GLOO_GROUP
    if _GLOO_GROUP is None:
        _GLOO_GROUP = dist.new_group(backend="gloo")
    return _GLOO_GROUP


def _not_responding(message: str, timeout_s: float) -> str:
    import re

    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    rank = dist.get_rank()
    if found:
        ranks = ", ".join(r.strip() for r in found.group(1).split(",") if r.strip())
        return (f"process(es) of rank {ranks} did not reach the health check within "
                f"{timeout_s:g} s (seen from rank {rank}): they hang or died; stop the run "
                "and look at their output")
    return (f"rank {rank} lost the other processes at the health check ({timeout_s:g} s): "
            f"{message.splitlines()[0][:200]}")


def shutdown() -> None:
    """Leave the process group (if any): call once at the end of a ``torchrun`` script."""
    if is_distributed():
        dist.destroy_process_group()


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Per-process batch :math:`B / W`; the global batch must split evenly."""
    if global_batch % world_size:
        raise ValueError(
            f"batch_size={global_batch} (the global batch) is not divisible by the "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    return global_batch // world_size


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts``, the same in every process (unlike Python's ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ------------------------------------------------------------------------------ collectives
def all_reduce_(tensors: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    r"""Sum ``tensors`` over the processes in place (one collective on a flat buffer), then
    multiply by ``scale``: each becomes :math:`\text{scale} \cdot \sum_{r=1}^{W} t_r`. Does
    nothing but the scaling without a process group."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    if is_distributed() and dist.get_world_size() > 1:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    if scale != 1.0:
        for t in tensors:
            t.mul_(scale)


def all_reduce_gradients_(params: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """Sum the ``.grad`` of ``params`` over processes (missing gradients count as zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p in params], scale)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with those of process ``src`` (same shapes everywhere)."""
    if is_distributed() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` in every process (pickled; for small objects, e.g. a
    checkpoint loaded on rank 0 only)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]
