r"""Irregularly sampled multivariate time series: checks of items and batch collation.

Time grids are checked by :func:`pyro_seqlatent.nn.times.validate_times` (shared with the ODE
solvers; importable from here too).

An *item* is a dict ``{"times": (N_i,), "values": (N_i, D), "mask": (N_i, D)}`` plus optional
extra masks of the same shape as ``values`` (e.g. ``"obs_mask"``: what an encoder may see, while
``"mask"`` marks the entries a likelihood scores). Entries with mask 0 are ignored; their value
is stored as 0.

Two ways to batch sequences with different time stamps:

* :func:`union_grid_collate` — the sorted union :math:`\mathcal T = \bigcup_b \{t_{b,i}\}` of
  the batch's times as one shared grid ``(U,)``; values and masks scattered into ``(B, U, D)``
  (a sequence is unobserved at the others' times). torchdiffeq solves once on :math:`\mathcal T`
  (extra output times cost no extra evaluations of the vector field).
* :func:`padded_collate` — per-sequence times ``(B, N_max)`` padded by repeating each row's last
  time, for the time-rescaled solve :func:`pyro_seqlatent.nn.ode.odeint_rescaled`.

Batches are dicts whose first key is ``"values"`` (the trainer reads the batch size from the
leading dimension of the first tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from pyro_seqlatent.nn.times import validate_times

MASK_KEYS = ("mask", "obs_mask")


def validate_item(item: dict, index: int | None = None) -> None:
    """Check one item's keys, shapes and times (see the module docstring)."""
    where = "item" if index is None else f"item {index}"
    for key in ("times", "values", "mask"):
        if key not in item:
            raise ValueError(f"{where} has no {key!r}; items need 'times', 'values' and 'mask'")
    times, values = item["times"], item["values"]
    validate_times(times, name=f"{where}['times']", shared=True)
    if not torch.is_tensor(values) or values.dim() != 2 or values.shape[0] != times.shape[0]:
        raise ValueError(f"{where}['values'] must be (N, D) with N = len(times) = "
                         f"{times.shape[0]}, got {tuple(getattr(values, 'shape', ()))}")
    for key in MASK_KEYS:
        if key in item and tuple(item[key].shape) != tuple(values.shape):
            raise ValueError(f"{where}[{key!r}] has shape {tuple(item[key].shape)}, expected "
                             f"{tuple(values.shape)} like 'values'")


def union_grid_collate(items: Sequence[dict]) -> dict:
    """Collate items onto the sorted union of their times (vectorized scatter).

    Returns ``{"values": (B, U, D), "mask": (B, U, D), ["obs_mask": (B, U, D),] "times": (U,)}``.
    """
    if len(items) == 0:
        raise ValueError("union_grid_collate got an empty batch")
    for i, item in enumerate(items):
        validate_item(item, i)
    dims = {item["values"].shape[-1] for item in items}
    if len(dims) != 1:
        raise ValueError(f"items have different numbers of features {sorted(dims)}")
    d = dims.pop()
    lengths = torch.tensor([item["times"].shape[0] for item in items])
    all_times = torch.cat([item["times"] for item in items])
    grid, position = torch.unique(all_times, sorted=True, return_inverse=True)
    row = torch.repeat_interleave(torch.arange(len(items)), lengths).to(position.device)
    batch = {}
    keys = ["values", "mask"] + [k for k in MASK_KEYS[1:] if k in items[0]]
    for key in keys:
        flat = torch.cat([item[key] for item in items])
        out = flat.new_zeros(len(items), grid.shape[0], d)
        out[row, position] = flat
        batch[key] = out
    batch["times"] = grid
    return batch


def padded_collate(items: Sequence[dict]) -> dict:
    """Collate items with their own times: ``"times"`` ``(B, N_max)`` padded by repeating each
    row's last time, values/masks ``(B, N_max, D)`` zero-padded (masks 0 in the padding)."""
    if len(items) == 0:
        raise ValueError("padded_collate got an empty batch")
    for i, item in enumerate(items):
        validate_item(item, i)
    n_max = max(item["times"].shape[0] for item in items)
    batch = {}
    keys = ["values", "mask"] + [k for k in MASK_KEYS[1:] if k in items[0]]
    for key in keys:
        out = items[0][key].new_zeros(len(items), n_max, items[0][key].shape[-1])
        for b, item in enumerate(items):
            out[b, : item[key].shape[0]] = item[key]
        batch[key] = out
    times = items[0]["times"].new_zeros(len(items), n_max)
    for b, item in enumerate(items):
        t = item["times"]
        times[b, : t.shape[0]] = t
        times[b, t.shape[0]:] = t[-1]
    batch["times"] = times
    return batch


def compact_observed(times, values, mask):
    """Drop the time points where a sequence has no observation, per sequence, vectorized.

    ``times`` ``(N,)`` or ``(B, N)``, ``values``/``mask`` ``(B, N, D)`` → per-sequence
    ``times`` ``(B, K)`` (``K`` = most observed points of any sequence; rows padded by repeating
    their last observed time), ``values``, ``mask`` ``(B, K, D)`` (mask 0 in the padding). On a
    union grid this turns a loop over ``U`` grid points into one over ``K`` observations.
    """
    b, n, d = values.shape
    seen = mask.sum(-1) > 0
    count = seen.sum(-1)
    k = max(int(count.max()), 1)
    order = torch.argsort((~seen).to(torch.int8), dim=-1, stable=True)[:, :k]
    full = times.expand(b, n) if times.dim() == 1 else times
    t = full.gather(1, order)
    valid = torch.arange(k, device=t.device) < count.unsqueeze(-1)
    last = t.gather(1, (count - 1).clamp_min(0).unsqueeze(-1))
    t = torch.where(valid, t, last)
    index = order.unsqueeze(-1).expand(b, k, d)
    keep = valid.unsqueeze(-1).to(mask.dtype)
    return t, values.gather(1, index) * keep, mask.gather(1, index) * keep


class IrregularDataset(Dataset):
    """A list of items (see the module docstring), validated once."""

    def __init__(self, items: Sequence[dict]):
        for i, item in enumerate(items):
            validate_item(item, i)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    @property
    def num_features(self) -> int:
        return int(self.items[0]["values"].shape[-1])


ROUNDING = ("round", "floor")


def observed_count(fraction: float, n: int, rounding: str = "round") -> int:
    """How many of ``n`` candidate time points a task observes: ``round(fraction * n)``
    (``"round"``, ours) or ``int(fraction * n)`` (``"floor"``, the reference's
    ``lib/utils.py::subsample_timepoints``, e.g. 10 of 100 and 6 of 66 at 10 %); at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if rounding not in ROUNDING:
        raise ValueError(f"rounding={rounding!r}: use one of {ROUNDING}")
    k = round(fraction * n) if rounding == "round" else int(fraction * n)
    return min(n, max(1, k))


def _subsample_rows(mask: torch.Tensor, candidates: torch.Tensor, fraction: float,
                    generator: torch.Generator | None, rounding: str) -> torch.Tensor:
    """``mask`` restricted to a random ``fraction`` of the rows flagged in ``candidates``
    ``(N,)`` that have data. One permutation is drawn from ``generator`` per call (as before
    this helper existed, so seeded masks are unchanged); none without a generator when the
    count covers every row."""
    rows = torch.nonzero(candidates & mask.any(-1)).squeeze(-1)
    obs = torch.zeros_like(mask)
    if rows.numel() == 0:
        return obs
    k = observed_count(fraction, rows.numel(), rounding)
    if generator is None and k == rows.numel():
        keep = rows
    else:
        keep = rows[torch.randperm(rows.numel(), generator=generator)[:k]]
    obs[keep] = mask[keep]
    return obs


def interpolation_masks(mask: torch.Tensor, fraction: float, generator: torch.Generator,
                        rounding: str = "round"):
    """Observe a random ``fraction`` of the time points that have data (at least one), score all.

    ``mask`` is ``(N, D)``; returns ``(obs_mask, target_mask)``: the observed subset's rows and
    the full ``mask`` (the reference protocol reconstructs every point). The count follows
    :func:`observed_count` (``rounding``).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    candidates = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    return _subsample_rows(mask, candidates, fraction, generator, rounding), mask.clone()


def extrapolation_masks(times: torch.Tensor, mask: torch.Tensor, split: float,
                        fraction: float = 1.0, generator: torch.Generator | None = None,
                        rounding: str = "round"):
    """Observe a random ``fraction`` of the time points ``t <= split`` that have data (the
    prefix), score every point ``t > split``: ``(obs_mask, target_mask)``.

    As the reference (``lib/utils.py``: ``split_and_subsample_batch`` splits off the observed
    prefix with ``split_data_extrap``, then ``subsample_observed_data`` keeps a fraction of its
    time points), so an extrapolation cell labelled 10 % sees 10 % of the prefix;
    ``fraction=1`` observes the whole prefix.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    before = times <= split
    obs = _subsample_rows(mask, before, fraction, generator, rounding)
    return obs, mask * (~before).unsqueeze(-1).to(mask.dtype)


def apply_task(items: Sequence[dict], task: str, *, fraction: float = 0.5,
               split: float | None = None, seed: int = 0, rounding: str = "round") -> list[dict]:
    """Items with ``"obs_mask"`` (encoder input) and ``"mask"`` (scored) for a task:
    ``"interp"`` (observe ``fraction`` of the points, reconstruct all) or ``"extrap"`` (observe
    ``fraction`` of the points with ``t <= split``, predict every point after ``split``).
    ``rounding`` sets the observed count (:func:`observed_count`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for item in items:
        if task == "interp":
            obs, target = interpolation_masks(item["mask"], fraction, gen, rounding)
        elif task == "extrap":
            if split is None:
                raise ValueError("task='extrap' needs split=<time that ends the observed part>")
            obs, target = extrapolation_masks(item["times"], item["mask"], split, fraction, gen,
                                              rounding)
        else:
            raise ValueError(f"task={task!r}: use 'interp' or 'extrap'")
        out.append({**item, "mask": target, "obs_mask": obs})
    return out


@torch.no_grad()
def persistence_predict(values: torch.Tensor, obs_mask: torch.Tensor) -> torch.Tensor:
    """The persistence ("last observation carried forward") baseline on a ``(B, N, D)`` batch.

    Entry ``(b, i, d)`` is predicted by the value of feature ``d`` at the latest time
    *strictly before* index ``i`` where ``obs_mask[b, :, d]`` is set (causal, like the
    one-step-ahead baselines: an observed point is not its own prediction); before the first
    observation of the feature, by its first observed value; 0 where the feature is never
    observed in the sequence. No parameters, deterministic, vectorized.
    """
    b, n, d = values.shape
    seen = obs_mask > 0
    index = torch.arange(n, device=values.device).view(1, n, 1).expand(b, n, d)
    last = torch.where(seen, index, torch.full_like(index, -1)).cummax(dim=1).values
    last_before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
    first = torch.where(seen, index, torch.full_like(index, n)).amin(dim=1, keepdim=True)
    source = torch.where(last_before >= 0, last_before, first.expand(b, n, d))
    pred = values.gather(1, source.clamp(max=n - 1))
    return torch.where(first < n, pred, torch.zeros_like(pred))
