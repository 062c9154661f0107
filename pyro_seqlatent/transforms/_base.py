"""Shared machinery of the flows: a parameter-aware cache, argument checks, context broadcasting.

Every flow ``f`` of this package computes ``y = f(x)`` and ``log|det ∂f/∂x|`` in one pass
(:meth:`Flow._forward`) and, where it can, the inverse together with the same log-det
(:meth:`Flow._inverse`). With ``cache_size=1`` the last ``(x, y, log|det J|)`` is remembered,
so a :class:`~pyro.distributions.TransformedDistribution` scores the value it just sampled
without inverting. Unlike :class:`torch.distributions.Transform`'s cache, which compares only
the identity of ``x``, the cache here also stores the *versions* of the module's parameters:
after an optimiser step updates them in place the old entry is stale and is recomputed, so a
flow object can be reused across training steps without calling ``clear_cache``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Transform, constraints

#: Bound of the soft clamp applied to log-scales (coupling, IAF): ``b · tanh(s / b)``.
LOG_SCALE_BOUND = 5.0


def soft_clamp(raw: torch.Tensor, bound: float = LOG_SCALE_BOUND) -> torch.Tensor:
    r"""``bound · tanh(raw / bound)``: ≈ ``raw`` near 0, bounded, smooth gradients."""
    return bound * torch.tanh(raw / bound)


def check_input_dim(input_dim, name: str = "input_dim", minimum: int = 2) -> int:
    if isinstance(input_dim, bool) or not isinstance(input_dim, int):
        raise TypeError(f"{name} must be an int, got {type(input_dim).__name__}")
    if input_dim < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {input_dim}")
    return input_dim


def check_context(context: torch.Tensor, context_dim: int, owner: str) -> None:
    if not torch.is_tensor(context):
        raise TypeError(f"{owner}.condition expects a context tensor, got {type(context).__name__}")
    if torch.jit.is_tracing():  # a JIT trace would freeze the check (the untraced call ran it)
        return
    if context.dim() == 0 or context.shape[-1] != context_dim:
        shape = tuple(context.shape)
        raise ValueError(
            f"{owner} was built with context_dim={context_dim} but got a context of shape "
            f"{shape}; pass a tensor whose last dimension is {context_dim}"
        )


def cat_context(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``[x, context]`` along the last dim after broadcasting their batch shapes."""
    batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return torch.cat(
        [x.expand(batch + x.shape[-1:]), context.expand(batch + context.shape[-1:])], dim=-1
    )


class Flow(Transform):
    """Base of every bijection here: one-pass ``(y, log|det J|)`` and a parameter-aware cache.

    Subclasses implement ``_forward(x) -> (y, ldj)`` and ``_inverse_and_ldj(y) -> (x, ldj)``
    where ``ldj`` has the batch shape (the event dims already summed).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, cache_size: int = 1):
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        super().__init__(cache_size=cache_size)
        self._cached_key = None
        self._cached_ldj = None

    # -- subclass interface -------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _inverse_and_ldj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- torch Transform interface --------------------------------------------------------------
    def _state_key(self) -> tuple:
        """Versions of the parameters this flow reads: the cache is valid only while unchanged."""
        if isinstance(self, nn.Module):
            return tuple((p._version, p.data_ptr()) for p in self.parameters())
        return ()

    def _remember(self, x, y, ldj) -> None:
        self._cached_x_y = x, y
        self._cached_ldj = ldj
        self._cached_key = self._state_key()

    def _cache_valid(self) -> bool:
        return self._cached_key is not None and self._cached_key == self._state_key()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 0:
            return self._forward(x)[0]
        x_old, y_old = self._cached_x_y
        if x is x_old and self._cache_valid():
            return y_old
        y, ldj = self._forward(x)
        self._remember(x, y, ldj)
        return y

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 0:
            return self._inverse_and_ldj(y)[0]
        x_old, y_old = self._cached_x_y
        if y is y_old and self._cache_valid():
            return x_old
        x, ldj = self._inverse_and_ldj(y)
        self._remember(x, y, ldj)
        return x

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._inverse_and_ldj(y)[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 1:
            x_old, y_old = self._cached_x_y
            if x is x_old and y is y_old and self._cache_valid():
                return self._cached_ldj
        return self._forward(x)[1]

    def clear_cache(self) -> None:
        """Forget the cached ``(x, y, log|det J|)`` (never needed for correctness here)."""
        if self._cache_size == 1:
            self._cached_x_y = None, None
        self._cached_key = None
        self._cached_ldj = None

    def with_cache(self, cache_size: int = 1):
        if cache_size == self._cache_size:
            return self
        raise NotImplementedError(
            f"{type(self).__name__} was built with cache_size={self._cache_size}; "
            f"build a new one with cache_size={cache_size}"
        )

    def __hash__(self):
        return object.__hash__(self)
