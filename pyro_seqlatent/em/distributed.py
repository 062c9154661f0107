r"""EM over data sharded across processes: the sufficient statistics are all-reduced.

The E-step statistics of :class:`~pyro_seqlatent.em.GaussianMixture` and
:class:`~pyro_seqlatent.em.PPCA` are sums over rows, so for shards :math:`X_1, \dots, X_W`

.. math:: \mathrm{stats}(X) = \sum_{r=1}^{W} \mathrm{stats}(X_r),

computed by one ``torch.distributed.all_reduce`` per iteration (on a flat buffer, on the data's
device: gloo on the CPU, NCCL on GPUs). Every process then runs the same closed-form M-step on the
same sums, so all hold the same parameters, equal to the single-process fit on the concatenated
data up to float summation order. The collectives are those of the torch-only
:mod:`pyro_seqlatent.parallel`, so this module, like all of :mod:`pyro_seqlatent.em`, does not
load Pyro.

The initialisation is rank 0's (computed on its shard, then broadcast, together with the GMM's
centring shift :math:`c`, which all processes must share for their sums to add up). It equals
the single-process initialisation when rank 0's shard starts with the same
``init_max_samples`` rows (GMM; 100,000 for PPCA), as with the contiguous shards of
:func:`shard_rows`. Launch with ``torchrun`` and call
:func:`~pyro_seqlatent.parallel.init_distributed` first (every process must hold at least
``n_components`` rows).
"""

from __future__ import annotations

from typing import Any

from pyro_seqlatent.em.gmm import GaussianMixture, GMMStatistics
from pyro_seqlatent.em.ppca import PPCA, PPCAStatistics
from pyro_seqlatent.parallel import all_reduce_, broadcast_, world


def all_reduce_statistics(stats: GMMStatistics | PPCAStatistics):
    """``stats`` summed over all processes, in place (one collective); returns ``stats``."""
    all_reduce_(stats.tensors())
    return stats


def shard_rows(n_rows: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """The contiguous block of rows of process ``rank`` out of ``world_size`` (default: this
    process in the current group): sizes differ by at most one, rank 0 holds the first rows."""
    if rank is None or world_size is None:
        rank, world_size = world()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    base, extra = divmod(int(n_rows), world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class _ShardedEM:
    """Mixin: statistics all-reduced across processes, initial parameters from rank 0."""

    _SHARED: tuple[str, ...] = ()

    def accumulate_statistics(self, X: Any):
        return all_reduce_statistics(super().accumulate_statistics(X))

    def _initialize(self, source) -> None:
        super()._initialize(source)
        for name in self._SHARED:  # collectives need contiguous tensors
            setattr(self, name, getattr(self, name).contiguous())
        broadcast_([getattr(self, name) for name in self._SHARED])


class DistributedGaussianMixture(_ShardedEM, GaussianMixture):
    """:class:`~pyro_seqlatent.em.GaussianMixture` whose ``fit(X_shard)`` runs EM over the union
    of every process's shard (same arguments; see the module docstring). In one process it is
    exactly a ``GaussianMixture``."""

    _SHARED = ("shift_", "weights_", "means_", "covariances_", "precisions_cholesky_",
               "precisions_")


class DistributedPPCA(_ShardedEM, PPCA):
    """:class:`~pyro_seqlatent.em.PPCA` whose ``fit(X_shard)`` runs EM over the union of every
    process's shard (NaN = missing, as in ``PPCA``). In one process it is exactly a ``PPCA``."""

    _SHARED = ("mean_", "components_", "noise_variance_")
