r"""Coupling flows: NICE's additive coupling and diagonal scaling, RealNVP's affine coupling.

The input is split by a binary mask ``b`` into an identity part ``A`` (``b = 1``) and a
transformed part ``B``; the network sees only ``x_A`` (and an optional context ``h``):

.. math::
    \text{additive (NICE):}\quad & y_A = x_A,\quad y_B = x_B + m(x_A),
        \qquad \log|\det J| = 0, \\
    \text{affine (RealNVP):}\quad & y_A = x_A,\quad y_B = x_B \odot e^{s(x_A)} + t(x_A),
        \qquad \log|\det J| = \textstyle\sum_B s(x_A),

with ``s = 5 tanh(s_raw / 5)`` (a soft clamp: bounded scale, gradients everywhere). The inverse is
exact and costs one network pass: ``x_B = (y_B − t(y_A)) ⊙ e^{−s(y_A)}``. NICE's scaling layer is
``y = x ⊙ e^{s}`` with ``log|det J| = Σ s``.

Masks: vectors use ``"half"`` (``A`` = the first ``split`` coordinates) or ``"alternating"``
(even coordinates; the vector checkerboard); images ``(C, H, W)`` use RealNVP's spatial
``"checkerboard"`` (``b = (h + w) mod 2 = 0``) or ``"channel"`` (first ``⌊C/2⌋`` channels).
``flip=True`` swaps ``A`` and ``B``; stacks alternate it so every coordinate is transformed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransformModule,
)
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import nn
from torch.distributions import constraints

from pyro_seqlatent.nn import MLP
from pyro_seqlatent.transforms._base import (
    Flow,
    cat_context,
    check_context,
    check_input_dim,
    soft_clamp,
)

VECTOR_MASKS = ("half", "alternating")
IMAGE_MASKS = ("checkerboard", "channel")


def default_hidden_dims(input_dim: int) -> tuple[int, int]:
    width = max(32, 2 * input_dim)
    return (width, width)


def vector_mask(
    input_dim: int, mask="alternating", flip: bool = False, split: int | None = None
) -> torch.Tensor:
    """Boolean mask of the identity part ``A`` of a vector coupling (see module docstring)."""
    D = check_input_dim(input_dim)
    if torch.is_tensor(mask):
        b = mask.detach().to(torch.bool).cpu()
        if b.shape != (D,):
            raise ValueError(f"mask has shape {tuple(b.shape)} but input_dim={D}: pass ({D},)")
    elif mask == "half":
        split = D // 2 if split is None else split
        if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= D - 1:
            raise ValueError(f"split must be an int in 1..{D - 1} (input_dim={D}), got {split!r}")
        b = torch.arange(D) < split
    elif mask == "alternating":
        if split is not None:
            raise ValueError("split applies only to mask='half'")
        b = torch.arange(D) % 2 == 0
    else:
        raise ValueError(f"mask must be one of {VECTOR_MASKS} or a bool tensor, got {mask!r}")
    if flip:
        b = ~b
    if b.all() or not b.any():
        raise ValueError("mask must leave at least one coordinate on each side of the coupling")
    return b


def image_mask(shape: Sequence[int], mask="checkerboard", flip: bool = False) -> torch.Tensor:
    """Float mask ``b`` of shape ``(C, H, W)``: RealNVP's spatial checkerboard or channel mask."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image shape must be (C, H, W) of positive ints, got {tuple(shape)}")
    C, H, W = (int(s) for s in shape)
    if torch.is_tensor(mask):
        b = mask.detach().to(torch.float32).cpu()
        if b.shape != (C, H, W):
            raise ValueError(f"mask has shape {tuple(b.shape)} but the image is {(C, H, W)}")
    elif mask == "checkerboard":
        if H * W < 2:
            raise ValueError("a checkerboard mask needs at least 2 pixels")
        hw = torch.arange(H)[:, None] + torch.arange(W)[None, :]
        b = (hw % 2 == 0).float().expand(C, H, W).clone()
    elif mask == "channel":
        if C < 2:
            raise ValueError(f"a channel mask needs at least 2 channels, the image has C={C}")
        b = (torch.arange(C) < C // 2).float()[:, None, None].expand(C, H, W).clone()
    else:
        raise ValueError(f"mask must be one of {IMAGE_MASKS} or a (C, H, W) tensor, got {mask!r}")
    if flip:
        b = 1.0 - b
    if b.all() or not b.any():
        raise ValueError("mask must leave at least one pixel on each side of the coupling")
    return b


def mask_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx_a, idx_b, inv_perm)`` of a bool mask: the identity part's indices, the transformed
    part's, and the permutation that puts ``cat([x_A, x_B])`` back in the original order."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    idx_a = torch.nonzero(mask).flatten()
    idx_b = torch.nonzero(~mask).flatten()
    return idx_a, idx_b, torch.argsort(torch.cat([idx_a, idx_b]))


class ConditionedCoupling(Flow):
    r"""Vector coupling with a given network ``param_fn(x_A) -> (t,)`` (additive) or
    ``(t, s_raw)`` (affine), each of size ``|B|``; see the module docstring for the equations."""

    def __init__(
        self, mask: torch.Tensor, param_fn: Callable, affine: bool = True, cache_size: int = 1,
        indices: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__(cache_size=cache_size)
        self._set_mask(mask, indices)
        self.param_fn = param_fn
        self.affine = bool(affine)

    def _set_mask(self, mask: torch.Tensor, indices=None) -> None:
        """Keep the mask and its index form (``idx_a``, ``idx_b``, ``inv_perm``). ``indices``
        precomputed by :func:`mask_indices` skip ``nonzero`` (a host sync on a GPU); modules
        hold them as buffers so that they move with ``.to(device)``."""
        # a bool tensor (the buffer of the module that builds this transform) is kept as it is:
        # no copy per call, and no constant in a JIT trace
        if not (torch.is_tensor(mask) and mask.dtype == torch.bool):
            mask = torch.as_tensor(mask, dtype=torch.bool)
        names = ("idx_a", "idx_b", "inv_perm")
        values = mask_indices(mask) if indices is None else indices
        if isinstance(self, torch.nn.Module):
            self.register_buffer("mask", mask, persistent=False)
            for name, value in zip(names, values):
                self.register_buffer(name, value, persistent=False)
        else:
            self.mask = mask
            for name, value in zip(names, values):
                setattr(self, name, value)

    def _split(self, x):
        dev = x.device
        return x[..., self.idx_a.to(dev)], x[..., self.idx_b.to(dev)]

    def _join(self, a, b):
        a = a.expand(b.shape[:-1] + a.shape[-1:])
        return torch.cat([a, b], dim=-1)[..., self.inv_perm.to(b.device)]

    def _shift_log_scale(self, x_a):
        params = self.param_fn(x_a)
        shift = params[0]
        if not self.affine:
            return shift, None
        return shift, soft_clamp(params[1])

    def _forward(self, x):
        x_a, x_b = self._split(x)
        shift, log_scale = self._shift_log_scale(x_a)
        if log_scale is None:
            y_b = x_b + shift
            ldj = y_b.new_zeros(y_b.shape[:-1])
        else:
            y_b = x_b * torch.exp(log_scale) + shift
            ldj = log_scale.sum(-1)
        return self._join(x_a, y_b), ldj

    def _inverse_and_ldj(self, y):
        y_a, y_b = self._split(y)
        shift, log_scale = self._shift_log_scale(y_a)
        if log_scale is None:
            x_b = y_b - shift
            ldj = x_b.new_zeros(x_b.shape[:-1])
        else:
            x_b = (y_b - shift) * torch.exp(-log_scale)
            ldj = log_scale.sum(-1)
        return self._join(y_a, x_b), ldj


class _VectorCoupling(ConditionedCoupling, TransformModule):
    affine_coupling = True

    def __init__(self, input_dim, hidden_dims=None, mask="alternating", flip=False, split=None,
                 activation="relu", cache_size=1):
        b = vector_mask(input_dim, mask, flip, split)
        super().__init__(b, self._params, affine=self.affine_coupling, cache_size=cache_size)
        self.input_dim = input_dim
        hidden_dims = default_hidden_dims(input_dim) if hidden_dims is None else hidden_dims
        n_a, n_b = int(b.sum()), int((~b).sum())
        n_out = (2 if self.affine else 1) * n_b
        self.net = MLP(n_a, hidden_dims, n_out, activation=activation, zero_last=True)

    def _params(self, x_a):
        return self.net(x_a).chunk(2 if self.affine else 1, dim=-1)


class AdditiveCoupling(_VectorCoupling):
    r"""NICE's additive coupling ``y_B = x_B + m(x_A)`` (log-det 0) with a learnable MLP ``m``.

    :param int input_dim: ``D ≥ 2``. :param hidden_dims: hidden sizes of ``m``.
    :param mask: ``"alternating"`` (default), ``"half"`` or a bool tensor (True = identity part).
    :param bool flip: swap the two parts. :param int split: size of ``A`` for ``mask="half"``.
    """

    affine_coupling = False


class AffineCoupling(_VectorCoupling):
    r"""RealNVP's affine coupling ``y_B = x_B ⊙ exp(s(x_A)) + t(x_A)`` with a learnable MLP.
    Arguments as :class:`AdditiveCoupling`."""

    affine_coupling = True


class _ConditionalVectorCoupling(ConditionalTransformModule):
    affine_coupling = True

    def __init__(self, input_dim, context_dim, hidden_dims=None, mask="alternating", flip=False,
                 split=None, activation="relu"):
        super().__init__()
        mask = vector_mask(input_dim, mask, flip, split)
        self.register_buffer("mask", mask, persistent=False)
        for name, value in zip(("idx_a", "idx_b", "inv_perm"), mask_indices(mask)):
            self.register_buffer(name, value, persistent=False)
        self.input_dim = input_dim
        self.context_dim = check_input_dim(context_dim, "context_dim", minimum=1)
        hidden_dims = default_hidden_dims(input_dim) if hidden_dims is None else hidden_dims
        n_a, n_b = int(self.mask.sum()), int((~self.mask).sum())
        n_out = (2 if self.affine_coupling else 1) * n_b
        self.net = MLP(n_a + context_dim, hidden_dims, n_out, activation=activation,
                       zero_last=True)

    def condition(self, context: torch.Tensor) -> ConditionedCoupling:
        check_context(context, self.context_dim, type(self).__name__)
        chunks = 2 if self.affine_coupling else 1

        def param_fn(x_a):
            return self.net(cat_context(x_a, context)).chunk(chunks, dim=-1)

        return ConditionedCoupling(self.mask, param_fn, affine=self.affine_coupling,
                                   indices=(self.idx_a, self.idx_b, self.inv_perm))


class ConditionalAdditiveCoupling(_ConditionalVectorCoupling):
    """NICE coupling whose network also sees a context: ``y_B = x_B + m([x_A, h])``."""

    affine_coupling = False


class ConditionalAffineCoupling(_ConditionalVectorCoupling):
    """RealNVP coupling conditioned on ``h``: ``y_B = x_B ⊙ exp(s([x_A, h])) + t([x_A, h])``."""

    affine_coupling = True


class ConditionedDiagonalScaling(Flow):
    r"""``y = x ⊙ exp(s)``, ``log|det J| = Σ_i s_i`` (NICE's scaling layer) for a given ``s``."""

    def __init__(self, log_scale_fn: Callable[[], torch.Tensor], cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.log_scale_fn = log_scale_fn

    def _forward(self, x):
        s = self.log_scale_fn()
        y = x * torch.exp(s)
        return y, s.sum(-1).expand(y.shape[:-1])

    def _inverse_and_ldj(self, y):
        s = self.log_scale_fn()
        x = y * torch.exp(-s)
        return x, s.sum(-1).expand(x.shape[:-1])


class DiagonalScaling(ConditionedDiagonalScaling, TransformModule):
    """NICE's learnable diagonal scaling ``y = x ⊙ exp(s)`` (``s`` initialised to 0)."""

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(lambda: self.log_scale, cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim, minimum=1)
        self.log_scale = nn.Parameter(torch.zeros(input_dim))


class ConvCouplingNet(nn.Module):
    """``[b ⊙ x, b] -> (t, s_raw)`` with 3×3 / 1×1 / 3×3 convolutions (last layer zero)."""

    def __init__(self, channels: int, hidden_channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 2 * channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, masked_x: torch.Tensor, mask: torch.Tensor):
        event = masked_x.shape[-3:]
        flat = masked_x.reshape((-1,) + event)
        inp = torch.cat([flat, mask.expand_as(flat)], dim=-3)
        out = self.net(inp).reshape(masked_x.shape[:-3] + (2 * event[0],) + event[1:])
        return out.chunk(2, dim=-3)


class ImageAffineCoupling(Flow, TransformModule):
    r"""RealNVP affine coupling on images ``(..., C, H, W)`` with a spatial checkerboard or a
    channel mask ``b``:

    .. math:: y = b ⊙ x + (1 − b) ⊙ \big(x ⊙ e^{s(b ⊙ x)} + t(b ⊙ x)\big),\qquad
        \log|\det J| = \textstyle\sum (1 − b) ⊙ s.

    :param shape: ``(C, H, W)``. :param mask: ``"checkerboard"``, ``"channel"`` or a tensor.
    :param bool flip: use ``1 − b``. :param int hidden_channels: width of the conv net.
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self, shape, mask="checkerboard", flip=False, hidden_channels=32, cache_size=1):
        super().__init__(cache_size=cache_size)
        self.shape = tuple(int(s) for s in shape)
        self.register_buffer("mask", image_mask(self.shape, mask, flip))
        self.net = ConvCouplingNet(self.shape[0], hidden_channels)

    def _check(self, x):
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"expected images (..., {self.shape}), got {tuple(x.shape)}")

    def _shift_log_scale(self, x):
        b = self.mask.to(dtype=x.dtype)
        shift, raw = self.net(x * b, b)
        return b, shift * (1 - b), soft_clamp(raw) * (1 - b)

    def _forward(self, x):
        self._check(x)
        b, shift, log_scale = self._shift_log_scale(x)
        y = x * b + (1 - b) * (x * torch.exp(log_scale) + shift)
        return y, log_scale.sum((-3, -2, -1))

    def _inverse_and_ldj(self, y):
        self._check(y)
        b, shift, log_scale = self._shift_log_scale(y)
        x = y * b + (1 - b) * ((y - shift) * torch.exp(-log_scale))
        return x, log_scale.sum((-3, -2, -1))


def _check_num_couplings(num_couplings) -> None:
    if isinstance(num_couplings, bool) or not isinstance(num_couplings, int) or num_couplings < 1:
        raise ValueError(f"num_couplings must be a positive int, got {num_couplings!r}")


def nice(input_dim, num_couplings: int = 4, hidden_dims=None, mask="alternating",
         scaling: bool = True, activation="relu") -> ComposeTransformModule:
    """NICE (Dinh et al. 2014): ``num_couplings`` additive couplings with alternating parts,
    then the diagonal scaling layer ``exp(s)``. Returns a :class:`ComposeTransformModule`."""
    check_input_dim(input_dim)
    _check_num_couplings(num_couplings)
    parts = [
        AdditiveCoupling(input_dim, hidden_dims, mask=mask, flip=k % 2 == 1,
                         activation=activation)
        for k in range(num_couplings)
    ]
    if scaling:
        parts.append(DiagonalScaling(input_dim))
    return ComposeTransformModule(parts)


def real_nvp(input_dim, num_couplings: int = 4, hidden_dims=None, mask=None,
             activation="relu", hidden_channels: int = 32) -> ComposeTransformModule:
    """RealNVP (Dinh et al. 2017): affine couplings with alternating masks.

    ``input_dim`` an int: vector couplings (``mask`` ``"alternating"`` by default, or ``"half"``).
    ``input_dim`` a ``(C, H, W)`` tuple: image couplings (``mask`` ``"checkerboard"`` by default,
    or ``"channel"``) with conv nets of ``hidden_channels`` channels."""
    _check_num_couplings(num_couplings)
    if isinstance(input_dim, (tuple, list, torch.Size)):
        mask = "checkerboard" if mask is None else mask
        parts = [ImageAffineCoupling(input_dim, mask=mask, flip=k % 2 == 1,
                                     hidden_channels=hidden_channels)
                 for k in range(num_couplings)]
    else:
        check_input_dim(input_dim)
        mask = "alternating" if mask is None else mask
        parts = [AffineCoupling(input_dim, hidden_dims, mask=mask, flip=k % 2 == 1,
                                activation=activation)
                 for k in range(num_couplings)]
    return ComposeTransformModule(parts)


def conditional_nice(input_dim, context_dim, num_couplings: int = 4, hidden_dims=None,
                     mask="alternating", scaling: bool = True,
                     activation="relu") -> ConditionalComposeTransformModule:
    """NICE whose coupling networks also see a context ``h``; ``.condition(h)`` gives the flow."""
    check_input_dim(input_dim)
    _check_num_couplings(num_couplings)
    parts = [
        ConditionalAdditiveCoupling(input_dim, context_dim, hidden_dims, mask=mask,
                                    flip=k % 2 == 1, activation=activation)
        for k in range(num_couplings)
    ]
    if scaling:
        parts.append(DiagonalScaling(input_dim))
    return ConditionalComposeTransformModule(parts, cache_size=1)


def conditional_real_nvp(input_dim, context_dim, num_couplings: int = 4, hidden_dims=None,
                         mask="alternating",
                         activation="relu") -> ConditionalComposeTransformModule:
    """RealNVP (vector couplings) conditioned on a context ``h``."""
    check_input_dim(input_dim)
    _check_num_couplings(num_couplings)
    parts = [
        ConditionalAffineCoupling(input_dim, context_dim, hidden_dims, mask=mask,
                                  flip=k % 2 == 1, activation=activation)
        for k in range(num_couplings)
    ]
    return ConditionalComposeTransformModule(parts, cache_size=1)
