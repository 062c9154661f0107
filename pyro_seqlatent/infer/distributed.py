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

The process group and the collectives (:func:`init_distributed`, :func:`world`,
:func:`all_reduce_`, :func:`broadcast_`, ...) are those of the torch-only
:mod:`pyro_seqlatent.parallel`, which sharded EM shares; they are re-exported here. The test
launcher and the host-sync counter are in :mod:`pyro_seqlatent.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution

# The torch-only process-group helpers live in pyro_seqlatent.parallel (EM uses them too);
# they are re-exported here so that the trainer finds everything it needs in one place.
from pyro_seqlatent.parallel import (
    DEFAULT_TIMEOUT_S,
    all_reduce_,
    all_reduce_gradients_,
    broadcast_,
    broadcast_object,
    derived_seed,
    init_distributed,
    is_distributed,
    launched_with_many_processes,
    local_batch_size,
    shutdown,
    world,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ELBOModule",
    "ExampleNoise",
    "all_reduce_",
    "all_reduce_gradients_",
    "broadcast_",
    "broadcast_object",
    "derived_seed",
    "init_distributed",
    "is_distributed",
    "launched_with_many_processes",
    "local_batch_size",
    "shutdown",
    "world",
    "wrap_ddp",
]


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
