"""Mini-batches of in-memory tensor datasets by indexing, the batches a ``DataLoader`` gives.

A ``DataLoader`` with the default collate fetches a batch of ``B`` examples one row at a time
(``dataset[i]`` for each index) and stacks the rows; for an in-memory tensor dataset that is
``B`` Python calls and a copy per row, a large share of a small model's step.
:func:`make_loader` returns, for such datasets, an iterable that gathers each batch with one
``index_select`` per tensor: the same values, dtypes and structure (a ``TensorDataset`` gives a
list of tensors, as ``default_collate`` does; a dataset of single tensors gives a tensor), in the
same order, with the same ``len()``; and it draws from ``generator`` (the global RNG without
one) on each iteration exactly as ``DataLoader`` does, so the random streams of a training run
do not change. Everything else (a custom ``collate_fn``, worker processes, other datasets) gets
a plain ``DataLoader`` with the same arguments.

Which datasets count as in-memory tensor datasets:

* a tensor (its rows are the examples);
* a ``torch.utils.data.TensorDataset`` (not a subclass that overrides ``__getitem__``);
* any map-style dataset with a ``tensors`` attribute, a tuple of tensors whose first
  dimensions index its examples, where ``dataset[i]`` is ``tuple(t[i] for t in tensors)`` or,
  with one tensor, ``tensors[0][i]`` (e.g. :class:`pyro_seqlatent.data.mnist.BinarizedMNIST`).
  That promise is checked on the first and last examples when the loader is built; a dataset
  that breaks it there gets a ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

RAGGED_FIX = (
    "pass collate_fn=pyro_seqlatent.data.sequences.pad_collate (regular sequences: a padded x "
    "and its mask), pyro_seqlatent.data.irregular.union_grid_collate (irregular series) or a "
    "collate of your own; a model with a collate_fn attribute (VRNNModel, RNNModel, "
    "LatentODEModel) gives train() its own")


def collate_or_explain(batch: Sequence[Any]) -> Any:
    """``torch.utils.data.default_collate(batch)``; a batch of examples of different sizes
    (ragged sequences), which it cannot stack, is a ``ValueError`` that says how to batch
    them (:data:`RAGGED_FIX`) instead of torch's ``stack expects each tensor to be equal
    size``."""
    try:
        return default_collate(batch)
    except RuntimeError as error:
        if "equal size" not in str(error) and "same size" not in str(error):
            raise
        shapes = sorted({tuple(x.shape) for x in batch if torch.is_tensor(x)})[:3]
        seen = f" (shapes {', '.join(map(str, shapes))}, ...)" if shapes else ""
        raise ValueError(f"the examples of a batch have different sizes{seen}, so the default "
                         f"collate cannot stack them: {RAGGED_FIX}") from error


def in_memory_tensors(dataset: Any) -> tuple[tuple[torch.Tensor, ...], bool] | None:
    """``(tensors, as_tuple)`` when ``dataset[i]`` is ``tuple(t[i] for t in tensors)``
    (``as_tuple``) or ``tensors[0][i]``; ``None`` for any other dataset."""
    if isinstance(dataset, IterableDataset):
        return None
    if torch.is_tensor(dataset):  # a tensor used as the dataset: its rows are the examples
        tensors, trusted = (dataset,), True
    elif isinstance(dataset, TensorDataset):
        if type(dataset).__getitem__ is not TensorDataset.__getitem__:
            return None  # a subclass that changes the items
        tensors, trusted = tuple(dataset.tensors), True
    else:
        tensors, trusted = getattr(dataset, "tensors", None), False
        if not isinstance(tensors, (tuple, list)):
            return None
        tensors = tuple(tensors)
    try:
        n = len(dataset)
    except TypeError:
        return None
    if not tensors or n == 0 or not all(
            torch.is_tensor(t) and t.layout == torch.strided and not t.is_nested
            and t.dim() > 0 and t.shape[0] == n for t in tensors):
        return None
    if trusted:
        return tensors, not torch.is_tensor(dataset)
    as_tuple = None
    for i in sorted({0, n - 1}):  # the promise, checked on the first and last examples
        item = dataset[i]
        if type(item) is tuple and len(item) == len(tensors):
            rows = item
        elif torch.is_tensor(item) and len(tensors) == 1:
            rows = (item,)
        else:
            return None
        if as_tuple is not None and as_tuple != (type(item) is tuple):
            return None
        as_tuple = type(item) is tuple
        for row, t in zip(rows, tensors):
            if not (torch.is_tensor(row) and type(row) is type(t[i]) and row.dtype == t.dtype
                    and row.device == t.device and row.shape == t.shape[1:]
                    and torch.equal(row, t[i])):
                return None
    return tensors, as_tuple


class IndexedBatches:
    """Batches of ``tensors`` gathered by index: what ``DataLoader(dataset, batch_size,
    sampler=sampler, drop_last=drop_last, generator=generator)`` yields for a dataset whose
    examples are rows of ``tensors``. Iterating again calls ``iter(sampler)`` again (a sampler
    may change between epochs). Built by :func:`make_loader`."""

    collate_fn = None
    num_workers = 0

    def __init__(self, dataset: Dataset, tensors: Sequence[torch.Tensor], as_tuple: bool,
                 batch_size: int, sampler: Sampler, drop_last: bool,
                 generator: torch.Generator | None):
        self.dataset = dataset
        self.tensors = tuple(tensors)
        self.as_tuple = as_tuple
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        self.generator = generator
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        # DataLoader draws its workers' base seed when an iteration starts, from the generator
        # or else the global RNG; drawing it too keeps every later random number the same
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        tensors, as_tuple = self.tensors, self.as_tuple
        devices = {t.device for t in tensors}
        for indices in self.batch_sampler:
            index = torch.as_tensor(indices, dtype=torch.long)
            on = {d: index if d.type == "cpu" else index.to(d) for d in devices}
            batch = [t.index_select(0, on[t.device]) for t in tensors]
            yield batch if as_tuple else batch[0]


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None = None,
                collate_fn: Callable | None = None, num_workers: int = 0,
                drop_last: bool = False, generator: torch.Generator | None = None, *,
                shuffle: bool = False) -> IndexedBatches | DataLoader:
    """Batches of ``dataset``: an :class:`IndexedBatches` for an in-memory tensor dataset (see
    the module docstring) with the default collate and no worker processes, otherwise
    ``DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
    collate_fn=collate_fn, num_workers=num_workers, drop_last=drop_last,
    generator=generator)``. Both yield the same batches in the same order and have the same
    ``len()`` and ``generator`` attribute. Without a ``collate_fn``, a batch of examples of
    different sizes is a ``ValueError`` naming the fix (:func:`collate_or_explain`).

    :param sampler: the order of the examples; ``None``: ``shuffle`` decides, as in
        ``DataLoader`` (a ``RandomSampler`` drawing from ``generator``, or sequential).
    """
    tensors = None
    if (collate_fn is None and num_workers == 0 and isinstance(batch_size, int)
            and not isinstance(batch_size, bool) and batch_size >= 1
            and (sampler is None or not shuffle)):
        tensors = in_memory_tensors(dataset)
    if tensors is None:
        if collate_fn is None and batch_size is not None:
            collate_fn = collate_or_explain
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                          collate_fn=collate_fn, num_workers=num_workers, drop_last=drop_last,
                          generator=generator)
    if sampler is None:
        sampler = (RandomSampler(dataset, generator=generator) if shuffle
                   else SequentialSampler(dataset))
    return IndexedBatches(dataset, tensors[0], tensors[1], batch_size, sampler, drop_last,
                          generator)
