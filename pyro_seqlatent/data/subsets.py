"""A fixed, representative subset of a dataset for evaluation under a budget."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset


def fixed_subset(data: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """``size`` items drawn without replacement by a generator seeded with ``seed`` (the same
    items on every call and machine), in dataset order; all of ``data`` when ``size`` is None or
    not smaller than it.

    Not the first ``size`` items: benchmark files can be sorted (the binarized MNIST test set
    comes in blocks of one digit class, so its first 1,000 images are nearly all zeros).
    """
    if size is None or size >= len(data):
        return data
    if size < 1:
        raise ValueError(f"size must be a positive number of items or None, got {size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(len(data), generator=gen)[:size].sort().values
    return Subset(data, picked.tolist())
