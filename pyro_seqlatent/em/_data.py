"""Input checks and chunked iteration shared by the EM estimators.

Every estimator accepts a torch tensor (CPU or CUDA: computations stay on its device), a NumPy
array (including a ``np.memmap`` larger than memory: it is converted one chunk at a time), or a
zero-argument callable that returns a fresh iterable of chunks on each call (for data streamed
from disk). The working dtype is float64 unless the estimator is given another one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def resolve_dtype(dtype: torch.dtype | None, X: Any) -> torch.dtype:
    """``dtype`` if given, else the floating dtype of ``X`` (float64 for non-float input)."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if isinstance(X, torch.Tensor) and X.dtype.is_floating_point:
        return X.dtype
    return torch.float64


def resolve_device(device: Any, X: Any) -> torch.device:
    """``device`` if given, else the device of ``X`` when it is a tensor, else the CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(X, torch.Tensor):
        return X.device
    return torch.device("cpu")


def as_tensor(X: Any, *, name: str, dtype: torch.dtype, device: torch.device,
              allow_nan: bool = False, ndim: int = 2) -> torch.Tensor:
    """``X`` as a ``dtype`` tensor on ``device`` with ``ndim`` dims; NaN/inf give a ValueError."""
    if isinstance(X, torch.Tensor):
        t = X.detach().to(device=device, dtype=dtype)
    elif isinstance(X, np.ndarray | list | tuple):
        arr = np.asarray(X)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}")
        t = torch.as_tensor(arr, dtype=dtype, device=device)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array (or, for fit, a callable returning "
            f"an iterable of chunks), got {type(X).__name__}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if not allow_nan and not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} contains NaN or inf; remove or impute those entries first"
            + (" (or pass a mask)" if ndim == 3 else "")
        )
    if allow_nan and bool(torch.isinf(t).any()):
        raise ValueError(f"{name} contains inf; mark missing values with NaN instead")
    return t


class ChunkSource:
    """Re-iterable chunks of rows of a data matrix.

    :param X: tensor, array/memmap, or callable returning a fresh iterable of 2-D chunks.
    :param chunk_size: rows per chunk for tensors/arrays (``None``: all rows at once).
    """

    def __init__(self, X: Any, *, chunk_size: int | None, dtype: torch.dtype,
                 device: torch.device, name: str = "X", allow_nan: bool = False):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.X, self.chunk_size, self.dtype, self.device = X, chunk_size, dtype, device
        self.name, self.allow_nan = name, allow_nan
        self.streamed = callable(X) and not isinstance(X, torch.Tensor | np.ndarray)
        if not self.streamed:
            if not isinstance(X, torch.Tensor | np.ndarray | list | tuple):
                raise TypeError(
                    f"{name} must be a torch.Tensor or numpy array, or a callable returning an "
                    f"iterable of 2-D chunks, got {type(X).__name__}"
                )
            shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
            if len(shape) != 2:
                raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {shape}")
            self.n_rows, self.n_features = shape

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.streamed:
            chunks: Iterable = self.X()
            for chunk in chunks:
                yield self._convert(chunk)
            return
        step = self.chunk_size or max(self.n_rows, 1)
        for start in range(0, self.n_rows, step):
            yield self._convert(self.X[start:start + step])

    def _convert(self, chunk: Any) -> torch.Tensor:
        return as_tensor(chunk, name=self.name, dtype=self.dtype, device=self.device,
                         allow_nan=self.allow_nan)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` rows (or fewer), concatenated over chunks: used for initialisation."""
        parts, got = [], 0
        for chunk in self:
            parts.append(chunk[: n - got])
            got += parts[-1].shape[0]
            if got >= n:
                break
        if not parts:
            raise ValueError(f"{self.name} yielded no data")
        return torch.cat(parts)
