r"""MuJoCo hopper trajectories of the Latent ODE paper (Rubanova et al. 2019 §4.2).

Recipe (shared/data README): ``dm_control.suite.load("hopper", "stand")`` with
``mujoco==3.17.0``; 10,000 trajectories × 200 frames; state = 7 ``qpos`` + 7 ``qvel``; seed 123;
initial ``qpos[:2] ~ U(0, 0.5)``, ``qpos[2:] ~ U(-2, 2)``, ``qvel ~ U(-5, 5)``; one
``physics.step()`` per frame (zero control). Each of the 14 features is min–max normalised over
the whole set; times are ``i / 200``. Generated once and cached under
:func:`pyro_seqlatent.data.physionet.cache_dir`. ``dm-control`` is the ``bench`` extra
(``pip install -e '.[bench]'``); without it the loader raises :class:`ImportError` naming it.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_seqlatent.data.irregular import IrregularDataset, apply_task
from pyro_seqlatent.data.physionet import cache_dir

N_TRAJ, N_STEPS, SEED = 10_000, 200, 123


def _suite():
    try:
        from dm_control import suite
    except ImportError as err:
        raise ImportError(
            "MuJoCo hopper data needs dm-control and mujoco==3.17.0, the 'bench' extra: "
            "pip install -e '.[bench]' (then the trajectories are generated once and cached)"
        ) from err
    return suite


def generate_hopper(n_traj: int = N_TRAJ, n_steps: int = N_STEPS, seed: int = SEED) -> np.ndarray:
    """Raw (unnormalised) trajectories ``(n_traj, n_steps, 14)`` by the paper's recipe."""
    suite = _suite()
    env = suite.load("hopper", "stand")
    physics = env.physics
    rng = np.random.RandomState(seed)
    out = np.zeros((n_traj, n_steps, 14), dtype=np.float32)
    for i in range(n_traj):
        with physics.reset_context():
            physics.data.qpos[:2] = rng.uniform(0, 0.5, size=2)
            physics.data.qpos[2:] = rng.uniform(-2, 2, size=physics.data.qpos.shape[0] - 2)
            physics.data.qvel[:] = rng.uniform(-5, 5, size=physics.data.qvel.shape[0])
        for t in range(n_steps):
            out[i, t, :7] = physics.data.qpos
            out[i, t, 7:] = physics.data.qvel
            physics.step()
    return out


def load_hopper(n_traj: int = N_TRAJ, n_steps: int = N_STEPS, seed: int = SEED) -> torch.Tensor:
    """Normalised trajectories ``(n_traj, n_steps, 14)`` in ``[0, 1]`` (cached)."""
    path = cache_dir() / f"hopper_{n_traj}x{n_steps}_seed{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    raw = torch.from_numpy(generate_hopper(n_traj, n_steps, seed))
    lo = raw.amin((0, 1))
    hi = raw.amax((0, 1))
    data = (raw - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


def hopper_datasets(task: str = "interp", fraction: float = 0.5, n_traj: int = N_TRAJ,
                    n_steps: int = N_STEPS, seed: int = 0, split_fractions=(0.8, 0.1, 0.1)):
    """Train/valid/test :class:`IrregularDataset`; ``extrap`` observes the first half."""
    data = load_hopper(n_traj, n_steps)
    times = torch.arange(n_steps, dtype=torch.float32) / n_steps
    items = [{"times": times, "values": x, "mask": torch.ones_like(x)} for x in data]
    items = apply_task(items, task, fraction=fraction, split=float(times[n_steps // 2 - 1]),
                       seed=seed)
    n_train, n_valid = int(split_fractions[0] * n_traj), int(split_fractions[1] * n_traj)
    return {"train": IrregularDataset(items[:n_train]),
            "valid": IrregularDataset(items[n_train:n_train + n_valid]),
            "test": IrregularDataset(items[n_train + n_valid:])}
