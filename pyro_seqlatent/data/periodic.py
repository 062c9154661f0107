r"""Toy periodic series of the Latent ODE paper (Rubanova et al. 2019, §4.1).

Two recipes (the paper and its reference code differ; see FIELD-NOTES):

``recipe="paper"`` (default): every series has its **own** irregular times — :math:`t_0 = 0`
plus :math:`N-1` sorted draws from :math:`U(0, T)` —, a frequency :math:`f \sim U(0.4, 0.8)`
(the paper says only "variable frequency"; the range is the reference code's), the same
amplitude 1 and an initial point :math:`y_0 \sim \mathcal N(0, 1)`:

.. math:: y(t) = y_0 + \sin(2\pi f t) + \varepsilon,\qquad
          \varepsilon \sim \mathcal N(0, \sigma_\varepsilon^2),\ \sigma_\varepsilon = 0.01.

``recipe="code"``: one time grid shared by all series (:math:`t = 0` plus :math:`N-1` draws of
:math:`U(0, T)`, sorted), :math:`y(t) = \sin(2\pi f t) + c`, :math:`c = 1 + \mathcal N(0,0.1^2)`,
plus noise :math:`0.01\,U[0, 1)`.

Tasks (``pyro_seqlatent.data.irregular.apply_task``): interpolation observes 10/20/30/50 % of
the points and reconstructs all of them; extrapolation observes the same fraction of the points
in :math:`[0, T/2]` (all of them with ``fraction=1``) and predicts :math:`(T/2, T]`.
"""

from __future__ import annotations

import math

import torch

from pyro_seqlatent.data.irregular import IrregularDataset, apply_task


def _sorted_times(n_points: int, t_max: float, gen: torch.Generator) -> torch.Tensor:
    while True:
        t = torch.cat([torch.zeros(1, dtype=torch.float64),
                       torch.rand(n_points - 1, generator=gen, dtype=torch.float64) * t_max])
        t = t.sort().values
        if (t[1:] > t[:-1]).all():  # probability ~1; redraw on a tie
            return t.float()


def make_periodic(n_series: int = 1000, n_points: int = 100, t_max: float = 5.0,
                  recipe: str = "paper", noise_std: float = 0.01, seed: int = 0) -> list[dict]:
    """Generate the toy series as items ``{"times", "values" (N, 1), "mask" (N, 1)}``."""
    if recipe not in ("paper", "code"):
        raise ValueError(f"recipe={recipe!r}: use 'paper' or 'code'")
    if n_series < 1 or n_points < 2:
        raise ValueError(f"need n_series >= 1 and n_points >= 2, got {n_series}, {n_points}")
    gen = torch.Generator().manual_seed(seed)
    shared = _sorted_times(n_points, t_max, gen) if recipe == "code" else None
    freq = 0.4 + 0.4 * torch.rand(n_series, generator=gen)
    items = []
    for i in range(n_series):
        t = shared if shared is not None else _sorted_times(n_points, t_max, gen)
        wave = torch.sin(2 * math.pi * freq[i] * t)
        if recipe == "paper":
            y0 = torch.randn((), generator=gen)
            y = y0 + wave + noise_std * torch.randn(t.shape, generator=gen)
        else:
            c = 1 + 0.1 * torch.randn((), generator=gen)
            y = wave + c + 0.01 * torch.rand(t.shape, generator=gen)
        items.append({"times": t, "values": y.unsqueeze(-1), "mask": torch.ones(n_points, 1)})
    return items


def periodic_datasets(task: str = "interp", fraction: float = 0.5, n_series: int = 1000,
                      n_points: int = 100, t_max: float = 5.0, recipe: str = "paper",
                      seed: int = 0, split_fractions=(0.8, 0.1, 0.1)) -> dict:
    """Train/valid/test :class:`IrregularDataset` for a task (``interp`` or ``extrap``)."""
    items = make_periodic(n_series, n_points, t_max, recipe, seed=seed)
    items = apply_task(items, task, fraction=fraction, split=t_max / 2, seed=seed + 1)
    n_train = int(split_fractions[0] * n_series)
    n_valid = int(split_fractions[1] * n_series)
    return {
        "train": IrregularDataset(items[:n_train]),
        "valid": IrregularDataset(items[n_train:n_train + n_valid]),
        "test": IrregularDataset(items[n_train + n_valid:]),
    }
