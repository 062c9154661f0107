r"""Data-parallel SVI with PyTorch's own machinery: ``torchrun``, DDP and ``DistributedSampler``.

:func:`~pyro_seqlatent.infer.train` runs unchanged under ``torchrun --nproc_per_node N``: it calls
:func:`init_distributed` when the launcher's environment (``WORLD_SIZE`` > 1) is present, shards
the data with its ``DistributedSampler``, and wraps the ELBO as an ``nn.Module``
(:class:`ELBOModule`) in ``DistributedDataParallel``. With :math:`W` processes, global batch
:math:`B` and per-process batch :math:`b = B/W`, process :math:`r` computes the summed loss
:math:`L_r = -\sum_{n \in \text{batch}_r} \mathrm{ELBO}_n`; it back-propagates :math:`W L_r` and
DDP averages the gradients, so every process holds

.. math:: \frac1W \sum_r \nabla (W L_r) = \nabla \sum_r L_r ,

the gradient of the global batch's summed loss: the same update as one process with batch
:math:`B` (up to the noise, see :class:`ExampleNoise`, and the float summation order).

:class:`ExampleNoise` makes the reparameterised noise a function of ``(seed, step, site, example
index)``, so a run with :math:`W` processes sees the very same :math:`\varepsilon` as a run with
one: that is how the tests check the equivalence above to float tolerance.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution

#: default time a collective may wait for the other processes before failing (seconds)
DEFAULT_TIMEOUT_S = 300.0


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


# ------------------------------------------------------------------------------ reductions
def all_reduce_(tensors: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """Sum ``tensors`` over the processes in place (one collective on a flat buffer), then
    multiply by ``scale``. Does nothing but the scaling without a process group."""
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


# ------------------------------------------------------------------------------ the ELBO module
class ELBOModule(nn.Module):
    """The ELBO as an ``nn.Module`` so that ``DistributedDataParallel`` can wrap it: its
    parameters are those of ``model`` and ``guide``; ``forward(model_fn, guide_fn, *args)``
    returns ``elbo.differentiable_loss(model_fn, guide_fn, *args)`` (a sum over the local batch).

    ``model_fn``/``guide_fn`` are the modules themselves or callables running them (KL annealing,
    ``pyro.module`` registration), so the trainer's wrappers keep working under DDP.
    """

    def __init__(self, model: nn.Module, guide: nn.Module, elbo):
        super().__init__()
        if not callable(getattr(elbo, "differentiable_loss", None)):
            raise ValueError(f"{type(elbo).__name__} has no differentiable_loss; it cannot be "
                             "wrapped for DDP (its gradients are all-reduced by hand instead)")
        self.model, self.guide = model, guide
        self.elbo = elbo

    def forward(self, model_fn: Callable, guide_fn: Callable, *args, **kwargs) -> torch.Tensor:
        return self.elbo.differentiable_loss(model_fn, guide_fn, *args, **kwargs)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` on ``device``; rank 0's parameters and buffers are
    broadcast to every process at construction. ``find_unused_parameters`` is on so that model
    parts that a step does not reach (e.g. generation-only heads) do not stall the reduction."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


# ------------------------------------------------------------------------------ example noise
def _reparameterised(fn, shape: torch.Size, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A reparameterised draw from ``fn`` built from standard-normal ``noise()`` of ``shape``:
    ``loc + scale * eps`` for a Normal, pushed through the transforms of a
    ``TransformedDistribution``; ``Independent`` and masks do not change the draw."""
    if isinstance(fn, Independent | MaskedDistribution):
        return _reparameterised(fn.base_dist, shape, noise)
    if isinstance(fn, TransformedDistribution):
        x = _reparameterised(fn.base_dist, shape, noise)
        for transform in fn.transforms:
            x = transform(x)
        return x
    if isinstance(fn, Delta):
        return fn.rsample()
    if isinstance(fn, Normal):
        leaf = fn.batch_shape + fn.event_shape
        if torch.broadcast_shapes(leaf, shape) != shape:
            raise ValueError(f"ExampleNoise: a Normal of shape {tuple(leaf)} under a site of "
                             f"shape {tuple(shape)}: only shape-preserving transforms are handled")
        return fn.loc + fn.scale * noise()
    raise TypeError(
        f"ExampleNoise handles Normal-based sites (Normal, Independent, masked, transformed by "
        f"flows) and Delta, not {type(fn).__name__}; train without example_noise"
    )


class ExampleNoise(Messenger):
    r"""Draw the noise of every reparameterised latent site from ``(seed, step, site, example)``.

    At a site inside the plate ``plate`` whose batch of ``len(indices)`` examples carries the
    dataset indices ``indices``, the value is :math:`\mu + \sigma\varepsilon` (then the flows of a
    transformed distribution), where the slice of :math:`\varepsilon` of example ``i`` comes from a
    generator seeded with ``derived_seed(seed, step, site, i)``. Sites outside the plate are
    seeded with ``(seed, step, site)``. So the noise an example sees does not depend on which
    process holds it, on its position in the batch, nor on the batch size: one process with
    global batch :math:`B` and :math:`W` processes with :math:`B/W` each draw the same
    :math:`\varepsilon`.

    What it guarantees: the same reparameterised noise for the same (seed, step, site, example),
    on the same device type (CPU and CUDA generators give different streams). What it does not
    cover: non-reparameterised sites (discrete latents, score-function terms) keep the global RNG,
    and it only understands Normal-based distributions (it raises a ``TypeError`` otherwise). It
    costs one generator reseed per example and site, which is fine for tests and diagnostics;
    ordinary training does not need it. Use it outermost (around the ELBO call), so that sites
    the ELBO replays from the guide trace are left alone.
    """

    def __init__(self, indices: Sequence[int], *, seed: int, step: int, plate: str = "data"):
        super().__init__()
        self.indices = [int(i) for i in indices]
        self.seed, self.step, self.plate = int(seed), int(step), plate

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if (msg["is_observed"] or msg["done"] or msg["value"] is not None
                or not getattr(fn, "has_rsample", False)):
            return
        shape = fn.batch_shape + fn.event_shape
        frames = [f for f in msg["cond_indep_stack"] if f.name == self.plate]
        pos = len(fn.batch_shape) + frames[0].dim if frames else None
        if pos is not None and shape[pos] != len(self.indices):
            raise ValueError(
                f"ExampleNoise: site {msg['name']!r} has {shape[pos]} examples in plate "
                f"{self.plate!r} but {len(self.indices)} example indices were given"
            )
        ref = _first_tensor(fn)
        msg["value"] = _reparameterised(
            fn, shape, lambda: self._noise(msg["name"], shape, pos, ref.dtype, ref.device))
        msg["done"] = True

    def _noise(self, name: str, shape: torch.Size, pos: int | None, dtype, device) -> torch.Tensor:
        gen = torch.Generator(device=device)
        if pos is None:
            gen.manual_seed(derived_seed(self.seed, self.step, name))
            return torch.randn(shape, generator=gen, dtype=dtype, device=device)
        row = shape[:pos] + shape[pos + 1:]
        rows = []
        for index in self.indices:
            gen.manual_seed(derived_seed(self.seed, self.step, name, index))
            rows.append(torch.randn(row, generator=gen, dtype=dtype, device=device))
        return torch.stack(rows, dim=pos)


def _first_tensor(fn) -> torch.Tensor:
    while not isinstance(fn, Normal | Delta):
        fn = fn.base_dist
    return fn.loc if isinstance(fn, Normal) else fn.v


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
