"""The order of the training data: epochs of a ``DistributedSampler`` seeded by
``(seed, epoch)``, so that a run resumed at any step sees exactly the batches an uninterrupted
run would have seen, under any number of processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from pyro_seqlatent.infer.batches import to_device
from pyro_seqlatent.infer.config import Batching
from pyro_seqlatent.infer.loader import make_loader


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded by ``seed + epoch``) that can start mid-epoch.

    Without ``torch.distributed`` it acts as one replica. ``skip`` drops the first indices of
    the epoch so a resumed run sees exactly the batches the interrupted one had not yet seen.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, drop_last: bool):
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def batched_indices(sampler: ResumableSampler, size: int) -> list[list[int]]:
    """The dataset indices of this process's batches, in the order the loader yields them (the
    sampler is deterministic given its epoch and skip)."""
    indices = list(iter(sampler))
    return [indices[i:i + size] for i in range(0, len(indices), size)]


class Epochs:
    """Batches of ``data`` for one process, epoch after epoch, from any step on.

    :param local_batch: this process's share of the global batch.
    """

    def __init__(self, data: Dataset, batching: Batching, local_batch: int,
                 collate_fn: Callable | None = None, world_size: int = 1):
        if len(data) == 0:
            raise ValueError("train_data is empty")
        self.data = data
        self.collate_fn = collate_fn
        self.batching = batching
        self.local_batch = local_batch
        self.sampler = ResumableSampler(data, batching.shuffle, batching.seed,
                                        batching.drop_last)
        self.loader = make_loader(  # in-memory tensors: batched by index, no per-row collate
            data, batch_size=local_batch, sampler=self.sampler, collate_fn=collate_fn,
            num_workers=batching.num_workers, drop_last=batching.drop_last,
            generator=torch.Generator().manual_seed(batching.seed),  # re-seeded every epoch
        )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={batching.batch_size} with drop_last=True leaves no batch for "
                f"{len(data)} training examples ({world_size} process(es))")

    def total_steps(self, num_steps: int | None, num_epochs: int | None) -> int:
        return num_steps if num_steps is not None else num_epochs * self.steps_per_epoch

    def probe(self, device) -> Any:
        """The first (at most) two examples as one batch, for a first trace."""
        loader = make_loader(self.data, batch_size=min(2, len(self.data)),
                             collate_fn=self.collate_fn, generator=torch.Generator())
        return to_device(next(iter(loader)), device)

    def from_step(self, step: int) -> Iterator[tuple[float, Any, list[int] | None]]:
        """``(epoch, batch, indices)`` for steps ``step + 1, step + 2, ...`` without end;
        ``epoch`` is fractional (the epochs completed after this batch) and ``indices`` the
        batch's dataset indices when ``example_noise`` needs them."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.skip = offset * self.local_batch
            self.loader.generator.manual_seed(self.batching.seed + epoch)  # worker seeds
            indices = (batched_indices(self.sampler, self.local_batch)
                       if self.batching.example_noise else None)
            for i, batch in enumerate(self.loader):
                offset += 1
                yield (epoch + offset / self.steps_per_epoch, batch,
                       indices[i] if indices is not None else None)
            epoch, offset = epoch + 1, 0
