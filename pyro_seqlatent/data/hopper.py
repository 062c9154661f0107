r"""MuJoCo hopper trajectories of the Latent ODE paper (Rubanova et al. 2019 §4.2).

Recipe (shared/data README): ``dm_control.suite.load("hopper", "stand")`` with
``mujoco==3.17.0``; 10,000 trajectories × 200 frames; state = 7 ``qpos`` + 7 ``qvel``; seed 123;
initial ``qpos[:2] ~ U(0, 0.5)``, ``qpos[2:] ~ U(-2, 2)``, ``qvel ~ U(-5, 5)``; one
``physics.step()`` per frame (zero control). Generated once and cached under
:func:`pyro_seqlatent.data.physionet.cache_dir`; a cache file that cannot be read, or holds the
wrong shape, is deleted with a warning and generated again
(:func:`pyro_seqlatent.data.physionet.read_cache`). ``dm-control`` is the ``bench`` extra
(``pip install -e '.[bench]'``); without it the loader raises :class:`ImportError` naming it.

Two protocols (``protocol=``; ``docs/latent_ode.md`` § Protocols says what differs and why):

``"ours"`` (default): each of the 14 features min–max normalised over the whole set,
:math:`(x - \min) / (\max - \min) \in [0, 1]`; all 200 frames with times ``i / 200``;
interpolation observes ``round(p · 200)`` frames; extrapolation observes ``round(p · 100)`` of the
first 100 frames and scores the last 100; split 80/10/10 (test = the last 1,000).

``"reference"``: the recipe of the reference implementation (github.com/YuliaRubanova/latent_ode),
whose numbers are the paper's anchors:

* normalisation — ``lib/utils.py::normalize_data``, called by
  ``mujoco_physics.py::HopperPhysics.__init__``: per feature over the whole set,
  :math:`(x - \min) / \max` with a zero max replaced by 1 (it divides by the max, not by the
  range, so values are not in [0, 1] and squared errors are ≈4× ours on this data);
  :func:`reference_normalize`.
* interpolation windows — ``lib/parse_datasets.py::parse_datasets`` (hopper branch, no
  ``--extrap``): each trajectory is cut once to a random window of ``args.timepoints`` = 100
  consecutive frames (start uniform on 0..100), every window given the times of the first
  100 frames, ``i / 200`` for ``i < 100``; :func:`reference_windows`.
* observed points — ``lib/utils.py::subsample_timepoints`` (through ``split_and_subsample_batch``
  and ``subsample_observed_data``): a random ``int(p · n)`` of the ``n`` candidate time points per
  trajectory, i.e. 10/20/30/50 of 100 for interpolation (all 100 scored,
  ``split_data_interp``).
* extrapolation — ``lib/utils.py::split_data_extrap`` with ``dataset="hopper"``: the first
  ``200 // 3 = 66`` frames are the observed part, subsampled to ``int(p · 66)`` points as above
  (6/13/19/33), and the remaining 134 frames are scored; no windows.
* split — ``lib/utils.py::split_train_test`` with ``train_fraq=0.8``: test = the last 20 % of
  the trajectories (2,000). The reference has no validation set; here the last eighth of its
  training part (70–80 %) is held out for validation, so training sees 7,000 trajectories.

Not reproduced: the reference redraws windows' observed points (and, per run, the windows) with
the unseeded global NumPy RNG at every batch, test batches included; here masks and windows
are drawn once from ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_seqlatent.data.irregular import IrregularDataset, apply_task
from pyro_seqlatent.data.physionet import cache_dir, read_cache

N_TRAJ, N_STEPS, SEED = 10_000, 200, 123
PROTOCOLS = ("ours", "reference")
REFERENCE_WINDOW = 100  # the reference's --timepoints default (run_models.py)


def _suite():
    try:
        from dm_control import suite
    except ImportError as err:
        raise ImportError(
            "MuJoCo hopper data needs dm-control and mujoco==3.17.0, the 'bench' extra: "
            "pip install -e '.[bench]' (then the trajectories are generated once and cached)"
        ) from err
    return suite


def generate_hopper(n_traj: int = N_TRAJ, n_steps: int = N_STEPS, seed: int = SEED,
                    indices=None) -> np.ndarray:
    """Raw (unnormalised) trajectories ``(n_traj, n_steps, 14)`` by the paper's recipe.

    ``indices``: simulate only these trajectories of the ``n_traj`` (the random initial states
    of the others are still drawn, so each one equals its row of the full set); returns
    ``(len(indices), n_steps, 14)``.
    """
    suite = _suite()
    env = suite.load("hopper", "stand")
    physics = env.physics
    rng = np.random.RandomState(seed)
    wanted = range(n_traj) if indices is None else [int(i) for i in indices]
    row = {i: r for r, i in enumerate(wanted)}
    out = np.zeros((len(row), n_steps, 14), dtype=np.float32)
    nq, nv = physics.data.qpos.shape[0], physics.data.qvel.shape[0]
    for i in range(max(row) + 1 if row else 0):
        qpos01 = rng.uniform(0, 0.5, size=2)
        qpos_rest = rng.uniform(-2, 2, size=nq - 2)
        qvel = rng.uniform(-5, 5, size=nv)
        if i not in row:
            continue
        with physics.reset_context():
            physics.data.qpos[:2] = qpos01
            physics.data.qpos[2:] = qpos_rest
            physics.data.qvel[:] = qvel
        for t in range(n_steps):
            out[row[i], t, :7] = physics.data.qpos
            out[row[i], t, 7:] = physics.data.qvel
            physics.step()
    return out


def minmax_normalize(raw: torch.Tensor):
    """Ours: per feature (last dim) over all other dims, ``(x - lo) / (hi - lo)`` (a constant
    feature divides by 1). Returns ``(data, lo, hi)``."""
    lo = raw.reshape(-1, raw.shape[-1]).amin(0)
    hi = raw.reshape(-1, raw.shape[-1]).amax(0)
    return (raw - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), lo, hi


def reference_normalize(raw: torch.Tensor):
    """The reference's ``lib/utils.py::normalize_data``: per feature over all other dims,
    ``(x - lo) / hi`` with ``hi == 0`` replaced by 1. Returns ``(data, lo, hi)`` (``hi`` after
    the replacement)."""
    lo = raw.reshape(-1, raw.shape[-1]).amin(0)
    hi = raw.reshape(-1, raw.shape[-1]).amax(0)
    hi = torch.where(hi == 0, torch.ones_like(hi), hi)
    return (raw - lo) / hi, lo, hi


def ours_to_reference(data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Re-express min–max normalised ``data`` (:func:`minmax_normalize` with raw ``lo``/``hi``)
    in the reference's units: ``(x - lo) / hi = data · (hi - lo) / hi`` (``hi == 0`` → 1;
    a constant feature stays 0). Computed in float64, returned in ``data``'s dtype."""
    lo, hi = lo.double(), hi.double()
    scale = torch.where(hi > lo, hi - lo, torch.zeros_like(hi))
    scale = scale / torch.where(hi == 0, torch.ones_like(hi), hi)
    return (data.double() * scale).to(data.dtype)


def _cache_path(n_traj: int, n_steps: int, seed: int, suffix: str = ""):
    return cache_dir() / f"hopper_{n_traj}x{n_steps}_seed{seed}{suffix}.pt"


def _save(obj, path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_hopper(n_traj: int = N_TRAJ, n_steps: int = N_STEPS, seed: int = SEED,
                protocol: str = "ours") -> torch.Tensor:
    """Normalised trajectories ``(n_traj, n_steps, 14)`` (cached): min–max to ``[0, 1]``
    (``"ours"``) or the reference's ``(x - min) / max`` (``"reference"``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}")
    path = _cache_path(n_traj, n_steps, seed)
    shape = (n_traj, n_steps, 14)
    data = read_cache(path, lambda cached: torch.is_tensor(cached) and cached.shape == shape)
    if data is None:
        data, lo, hi = minmax_normalize(torch.from_numpy(generate_hopper(n_traj, n_steps, seed)))
        _save({"lo": lo, "hi": hi}, _cache_path(n_traj, n_steps, seed, "_range"))
        _save(data, path)
    if protocol == "ours":
        return data
    lo, hi = hopper_range(data, n_traj, n_steps, seed)
    return ours_to_reference(data, lo, hi)


def hopper_range(data: torch.Tensor, n_traj: int = N_TRAJ, n_steps: int = N_STEPS,
                 seed: int = SEED):
    """Raw per-feature ``(lo, hi)`` behind the cached min–max ``data`` (a ``_range`` file
    beside the cache). A cache written before that file existed gets it by re-simulating only
    the trajectories that hold each feature's minimum and maximum (≤ 28, about a second), which
    are checked against the cache."""
    path = _cache_path(n_traj, n_steps, seed, "_range")
    d = data.shape[-1]
    saved = read_cache(path, lambda r: isinstance(r, dict) and all(
        torch.is_tensor(r.get(k)) and tuple(r[k].shape) == (d,) for k in ("lo", "hi")))
    if saved is not None:
        return saved["lo"], saved["hi"]
    flat = data.reshape(n_traj, n_steps, -1)
    by_feature = flat.permute(2, 0, 1).reshape(d, -1)
    where_lo, where_hi = by_feature.argmin(1), by_feature.argmax(1)
    traj = sorted({int(i) // n_steps for i in torch.cat([where_lo, where_hi])})
    raw = torch.from_numpy(generate_hopper(n_traj, n_steps, seed, indices=traj))
    row = {i: r for r, i in enumerate(traj)}
    feat = torch.arange(d)

    def pick(where):
        rows = torch.tensor([row[int(i) // n_steps] for i in where])
        return raw[rows, where % n_steps, feat]

    lo, hi = pick(where_lo), pick(where_hi)
    again = (raw - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    if not torch.allclose(again, flat[traj], atol=1e-5):
        cache = _cache_path(n_traj, n_steps, seed)
        raise RuntimeError(f"re-simulated hopper trajectories do not match the cache {cache} "
                           "(different mujoco/dm-control?); delete it to regenerate the set")
    _save({"lo": lo, "hi": hi}, path)
    return lo, hi


def reference_windows(data: torch.Tensor, window: int = REFERENCE_WINDOW,
                      generator: torch.Generator | None = None):
    """Per-trajectory random windows of ``window`` consecutive frames, as the reference's
    ``lib/parse_datasets.py::parse_datasets`` (hopper, interpolation): start uniform on
    ``0..n_steps - window`` (both ends included). Returns ``(starts (n_traj,), windows
    (n_traj, window, D))``."""
    n_traj, n_steps = data.shape[:2]
    if not 0 < window <= n_steps:
        raise ValueError(f"window must lie in 1..{n_steps}, got {window}")
    starts = torch.randint(0, n_steps - window + 1, (n_traj,), generator=generator)
    index = starts.unsqueeze(-1) + torch.arange(window)
    windows = data.gather(1, index.unsqueeze(-1).expand(n_traj, window, data.shape[-1]))
    return starts, windows


def hopper_items(data: torch.Tensor, task: str = "interp", fraction: float = 0.5,
                 seed: int = 0, protocol: str = "ours") -> list[dict]:
    """Items with ``obs_mask``/``mask`` for ``task`` from normalised trajectories
    ``(n_traj, n_steps, D)`` (see the module docstring for the two protocols)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}")
    n_steps = data.shape[1]
    times = torch.arange(n_steps, dtype=torch.float32) / n_steps
    if protocol == "ours":
        n_observed, rounding = n_steps // 2, "round"
    else:
        n_observed, rounding = n_steps // 3, "floor"
        if task == "interp":  # windows from their own stream, masks from ``seed``
            gen = torch.Generator().manual_seed(seed + 10_007)
            window = min(REFERENCE_WINDOW, n_steps)
            data = reference_windows(data, window, gen)[1]
            times = times[:window]
    items = [{"times": times, "values": x, "mask": torch.ones_like(x)} for x in data]
    return apply_task(items, task, fraction=fraction, split=float(times[n_observed - 1]),
                      seed=seed, rounding=rounding)


def hopper_datasets(task: str = "interp", fraction: float = 0.5, n_traj: int = N_TRAJ,
                    n_steps: int = N_STEPS, seed: int = 0, split_fractions=None,
                    protocol: str = "ours"):
    """Train/valid/test :class:`IrregularDataset`. ``split_fractions`` default: 80/10/10
    (``"ours"``); ``"reference"``: test = trajectories ``int(0.8 n)`` on (the last 20 %),
    validation the ``int(0.1 n)`` before them, training the rest (70 %)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}")
    data = load_hopper(n_traj, n_steps, protocol=protocol)
    items = hopper_items(data, task, fraction, seed, protocol)
    if split_fractions is None and protocol == "reference":
        # test from int(0.8 n) on, as split_train_test; validation = the 10 % just before it
        n_valid = int(0.1 * n_traj)
        n_train = int(0.8 * n_traj) - n_valid
    else:
        split_fractions = split_fractions or (0.8, 0.1, 0.1)
        n_train = int(split_fractions[0] * n_traj)
        n_valid = int(split_fractions[1] * n_traj)
    return {"train": IrregularDataset(items[:n_train]),
            "valid": IrregularDataset(items[n_train:n_train + n_valid]),
            "test": IrregularDataset(items[n_train + n_valid:])}
