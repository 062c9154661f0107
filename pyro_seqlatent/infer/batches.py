"""How a collated batch is fed to a model/guide pair, moved between devices and counted.

Convention used everywhere in the project: a tuple/list batch is splatted (``model(*batch)``),
a dict is passed as keywords (``model(**batch)``), anything else is the single argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def batch_args(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for calling a model or guide on ``batch``."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device`` (nested dicts/tuples/lists kept)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Number of data points in ``batch``: the leading size of its first tensor."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (tuple, list)) or isinstance(batch, Mapping):
        for value in values:
            if torch.is_tensor(value) and value.dim() > 0:
                return int(value.shape[0])
    raise TypeError(
        f"cannot tell the batch size of a {type(batch).__name__}: a batch must be a tensor or a "
        "tuple/list/dict holding at least one tensor whose first dimension indexes data points"
    )
