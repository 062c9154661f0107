r"""Checks of time grids, shared by the ODE solvers (:mod:`pyro_seqlatent.nn.ode`) and the
irregular-series data (:mod:`pyro_seqlatent.data.irregular`); torch only.

A time grid is either one shared grid ``(N,)``, strictly increasing,
:math:`t_0 < t_1 < \dots < t_{N-1}`, or per-sequence grids ``(B, N)`` whose rows are strictly
increasing and may end in padding that repeats the row's last time.
"""

from __future__ import annotations

import torch


def validate_times(times, name: str = "times", shared: bool | None = None,
                   allow_padding: bool = True) -> torch.Tensor:
    """Check a time tensor and return it.

    ``shared=True``: one strictly increasing grid ``(N,)``. ``shared=False``: per-sequence grids
    ``(B, N)``, each row strictly increasing, then optionally constant (padding repeats the last
    time) when ``allow_padding``. ``None`` accepts either. Raises ``TypeError``/``ValueError``
    naming ``name`` and the fix for non-tensors, integer dtypes, wrong shapes, NaN/inf, unsorted
    or duplicate times.
    """
    if not torch.is_tensor(times):
        raise TypeError(f"{name} must be a torch tensor, got {type(times).__name__}")
    if not times.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {times.dtype}; "
                        f"convert with {name}.float()")
    dims = {True: (1,), False: (2,), None: (1, 2)}[shared]
    if times.dim() not in dims:
        want = {(1,): "(N,)", (2,): "(B, N)", (1, 2): "(N,) or (B, N)"}[dims]
        raise ValueError(f"{name} must have shape {want}, got {tuple(times.shape)}")
    if times.shape[-1] == 0:
        raise ValueError(f"{name} is empty: a sequence needs at least one time point")
    if not torch.isfinite(times).all():
        raise ValueError(f"{name} contains NaN or inf; drop those observations first")
    diffs = times[..., 1:] - times[..., :-1]
    if (diffs < 0).any():
        raise ValueError(f"{name} must be sorted in increasing order; sort each sequence by time "
                         "(and its values and masks with it)")
    zero = diffs == 0
    if zero.any():
        if times.dim() == 1 or not allow_padding:
            raise ValueError(f"{name} has duplicate time points; merge observations that share a "
                             "time into one row (masks mark the observed features)")
        # padding: once a row repeats its time it must stay constant to the end
        if (zero[..., :-1] & ~zero[..., 1:]).any():
            raise ValueError(f"{name} has duplicate time points inside a sequence; only trailing "
                             "padding (repeating the last time) may repeat")
    return times
