r"""Scoring rules for predictions of irregularly sampled series (Latent ODE, ODE-RNN, RNN-Δt,
persistence), on batches from :func:`~pyro_seqlatent.data.irregular.union_grid_collate`.

Two ways to average squared errors over the scored entries (``mask`` :math:`m_{bid} = 1`) of
predictions :math:`\hat x` of values :math:`x`, sequence (record) :math:`b`, time :math:`i`,
feature :math:`d`:

* **pooled over observations** (ours; the weighting of the Gaussian likelihood in the ELBO):

  .. math:: \mathrm{MSE} = \frac{\sum_{b,i,d} m_{bid}\,(\hat x_{bid} - x_{bid})^2}
                                {\sum_{b,i,d} m_{bid}} ;

* **per record, per variable** (the reference implementation's ``compute_masked_likelihood``):
  every record and every variable weigh the same, and a variable a record never observes counts
  as 0,

  .. math:: \mathrm{MSE}_b = \frac1D \sum_{d=1}^{D}
            \frac{\sum_i m_{bid}\,(\hat x_{bid} - x_{bid})^2}{\sum_i m_{bid}}
            \quad(0 \text{ when } \textstyle\sum_i m_{bid} = 0),
            \qquad \mathrm{MSE} = \frac1B \sum_b \mathrm{MSE}_b .

Baselines without parameters (no training; each variable of each series on its own, from that
series' observed entries ``obs_mask`` only, on the series' own times): persistence (the value
observed strictly before, :func:`~pyro_seqlatent.data.irregular.persistence_predict`),
last-value-carried-forward (:func:`locf_predict`: the last value observed at or before the time)
and linear interpolation between the observed times (:func:`linear_interp_predict`); both hold
the first observed value before it and the last after it, so in extrapolation linear
interpolation equals LOCF. :func:`baseline_mse` scores any of them under either weighting.

Under the reference protocol the one-step baselines predict a sequence's first time point by its
observed value (0 where unobserved; :func:`reference_first_point`), and the Latent ODE's score is
the mean over :data:`REFERENCE_LATENT_SAMPLES` draws of :math:`z_0` of each draw's MSE. The Latent
ODE benchmark (``benchmarks/latent_ode.py``) scores its rows with these functions.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from pyro_seqlatent.data.irregular import persistence_predict, union_grid_collate
from pyro_seqlatent.models.latent_ode import forecast, masked_mse, predict

#: z0 draws of the reference's Latent ODE score (run_models.py:
#: ``compute_loss_all_batches(..., n_traj_samples=3)``)
REFERENCE_LATENT_SAMPLES = 3

__all__ = ["BASELINES", "REFERENCE_LATENT_SAMPLES", "baseline_mse", "crps",
           "linear_interp_predict", "locf_predict", "observed_mse_sums", "persistence_mse",
           "predictive_mse", "reference_first_point", "reference_record_mse",
           "reference_test_mse"]


def crps(samples: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
         reduce: bool = True):
    r"""The continuous ranked probability score of predictive samples against the truth,
    :math:`\mathrm{CRPS}(F, y) = \mathbb E|X - y| - \tfrac12 \mathbb E|X - X'|` with
    :math:`X, X' \sim F` the empirical distribution of ``samples`` (Pyro's
    ``pyro.ops.stats.crps_empirical``, the score of ``pyro.contrib.forecast.eval_crps``; lower
    is better, 0 for a point mass on the truth, the absolute error for one sample).

    :param samples: ``(S, *truth.shape)`` draws of the predictive (Latent ODE:
        ``forecast(...)["samples"]``; sequence models:
        :func:`~pyro_seqlatent.models.sequence_forecast.forecast`).
    :param mask: optional, broadcastable to ``truth``: the entries to score.
    :param reduce: ``True``: the mean over scored entries (a float); ``False``: the tensor of
        per-entry scores (``truth.shape``; unmasked where ``mask`` is ``None``).
    """
    from pyro.ops.stats import crps_empirical

    if not torch.is_tensor(samples) or not torch.is_tensor(truth) \
            or samples.shape[1:] != truth.shape:
        got = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
               for t in (samples, truth)]
        raise ValueError(f"crps: samples must have shape (S, *truth.shape), got samples "
                         f"{got[0]} and truth {got[1]}")
    per_entry = crps_empirical(samples, truth.to(samples.dtype))
    if not reduce:
        return per_entry
    if mask is None:
        return float(per_entry.mean())
    m = mask.to(per_entry.dtype).expand_as(per_entry)
    return float((per_entry * m).sum() / m.sum().clamp_min(1.0))


@torch.no_grad()
def predictive_mse(model, guide, dataset, batch_size=50, num_samples=8) -> float:
    """MSE pooled over the scored entries of ``dataset`` (see the module docstring) of the
    posterior-predictive mean over ``num_samples`` draws of :math:`z_0` (Latent ODE;
    :func:`~pyro_seqlatent.models.latent_ode.predict`) or of a baseline's one-step
    predictions. The model runs in eval mode and is put back in train mode afterwards."""
    model.eval()
    sse = count = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=union_grid_collate):
        pred = predict(model, guide, batch, num_samples=num_samples)
        s, c = masked_mse(pred, batch["values"], batch["mask"])
        sse, count = sse + s, count + c
    model.train()
    return sse / max(count, 1.0)


def reference_record_mse(pred: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor) -> tuple[float, int]:
    """``(sum over records of the record's MSE, number of records)``, a record's MSE being the
    reference's: the mean over all ``D`` variables of each variable's mean squared error over
    its masked times, 0 for a variable with no masked time. ``pred`` may carry leading sample
    dimensions (each sample counts as a record, so the result is the mean over samples)."""
    err = ((pred - values) ** 2 * mask).sum(-2)  # (..., B, D)
    count = mask.expand_as(pred).sum(-2)
    per_variable = torch.where(count > 0, err / count.clamp_min(1), torch.zeros_like(err))
    per_record = per_variable.mean(-1)
    return float(per_record.sum()), per_record.numel()


def observed_mse_sums(pred: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor) -> tuple[float, float]:
    """``(sum of squared errors over observed entries, number of observed entries)``, ``pred``
    with optional leading sample dimensions (each sample counted). Their ratio is the MSE
    pooled over observations, the weighting of the Gaussian likelihood in the ELBO, where
    :func:`reference_record_mse` gives every record and every variable the same weight."""
    m = mask.expand_as(pred)
    return float(((pred - values) ** 2 * m).sum()), float(m.sum())


def reference_first_point(pred: torch.Tensor, batch: dict) -> torch.Tensor:
    """``pred`` with each sequence's first time point replaced as the reference's ODE-RNN and
    RNN baselines do (``lib/ode_rnn.py``, ``lib/rnn_baselines.py``: ``utils.shift_outputs`` with
    ``first_point = data[:, 0]``, the observed data, zero where unobserved): the observed value
    there, or 0 for the features not observed. A sequence's first time point is its first
    grid index with any ``mask`` or ``obs_mask`` entry (union grids hold other sequences'
    times too)."""
    present = torch.maximum(batch["mask"], batch["obs_mask"]).sum(-1) > 0  # (B, N)
    first = present.to(torch.int8).argmax(dim=1)  # (B,)
    rows = torch.arange(pred.shape[0], device=pred.device)
    out = pred.clone()
    out[rows, first] = (batch["values"] * batch["obs_mask"])[rows, first]
    return out


@torch.no_grad()
def reference_test_mse(model, guide, dataset, batch_size=50) -> dict:
    """MSE of ``dataset`` scored the reference's way (see the module docstring):
    ``{"test_mse", ...}``, with ``test_mse_pooled`` (:func:`observed_mse_sums`) beside it;
    baselines also report ``test_mse_without_first_point_rule``."""
    model.eval()
    sse = count = plain = pooled_sse = pooled_count = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=union_grid_collate):
        if hasattr(model, "predict"):  # deterministic one-step baselines
            pred = model.predict(**batch)
            scored = reference_first_point(pred, batch)
            plain += reference_record_mse(pred, batch["values"], batch["mask"])[0]
        else:  # mean over z0 samples of each sample's MSE
            scored = forecast(model, guide, batch,
                              num_samples=REFERENCE_LATENT_SAMPLES)["samples"]
        s, c = reference_record_mse(scored, batch["values"], batch["mask"])
        ps, pc = observed_mse_sums(scored, batch["values"], batch["mask"])
        sse, count = sse + s, count + c
        pooled_sse, pooled_count = pooled_sse + ps, pooled_count + pc
    model.train()
    out = {"test_mse": sse / max(count, 1.0),
           "test_mse_pooled": pooled_sse / max(pooled_count, 1.0)}
    if hasattr(model, "predict"):
        out["test_mse_without_first_point_rule"] = plain / max(count, 1.0)
    return out


def persistence_mse(dataset, protocol: str, batch_size=50) -> dict:
    """MSE of :func:`~pyro_seqlatent.data.irregular.persistence_predict` (``{"test_mse"}``,
    pooled under ``protocol="ours"``, per record under ``"reference"``; under ``"reference"`` also
    ``test_mse_with_first_point_rule``, the same predictions scored with the reference ODE-RNN's
    first-point rule, for comparison with its anchor)."""
    score = masked_mse if protocol == "ours" else reference_record_mse
    sse = count = ruled = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=union_grid_collate):
        pred = persistence_predict(batch["values"], batch["obs_mask"])
        s, c = score(pred, batch["values"], batch["mask"])
        ruled += score(reference_first_point(pred, batch), batch["values"], batch["mask"])[0]
        sse, count = sse + s, count + c
    out = {"test_mse": sse / max(count, 1.0)}
    if protocol == "reference":
        out["test_mse_with_first_point_rule"] = ruled / max(count, 1.0)
    return out


def _neighbours(obs_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(before, after)``, ``(B, N, D)``: for every entry the index of the latest observed
    entry of its series and variable at or before it (-1 if none) and of the earliest at or
    after it (``N`` if none)."""
    b, n, d = obs_mask.shape
    seen = obs_mask > 0
    index = torch.arange(n, device=obs_mask.device).view(1, n, 1).expand(b, n, d)
    before = torch.where(seen, index, torch.full_like(index, -1)).cummax(dim=1).values
    after = torch.where(seen, index, torch.full_like(index, n)).flip(1).cummin(dim=1).values
    return before, after.flip(1)


def _check_baseline_inputs(values, obs_mask, name):
    if not (torch.is_tensor(values) and torch.is_tensor(obs_mask) and values.dim() == 3
            and obs_mask.shape == values.shape):
        shapes = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                  for t in (values, obs_mask)]
        raise ValueError(f"{name}: values and obs_mask must be (B, N, D) tensors of one shape, "
                         f"got {shapes[0]} and {shapes[1]}")


@torch.no_grad()
def locf_predict(values: torch.Tensor, obs_mask: torch.Tensor) -> torch.Tensor:
    r"""Last value carried forward on a ``(B, N, D)`` batch: entry :math:`(b, i, d)` is the
    value of variable :math:`d` of series :math:`b` at :math:`j(i) = \max\{j \le i :
    m^{obs}_{bjd} = 1\}`, the latest observation at or before it (an observed entry is its own
    prediction); before the first observation the first observed value; 0 for a variable the
    series never observes. Values where ``obs_mask`` is 0 are never read (they may be NaN)."""
    _check_baseline_inputs(values, obs_mask, "locf_predict")
    n = values.shape[1]
    before, after = _neighbours(obs_mask)
    source = torch.where(before >= 0, before, after)
    pred = values.gather(1, source.clamp(0, n - 1))
    return torch.where(source < n, pred, torch.zeros_like(pred))


@torch.no_grad()
def linear_interp_predict(values: torch.Tensor, obs_mask: torch.Tensor,
                          times: torch.Tensor) -> torch.Tensor:
    r"""Linear interpolation of each variable of each series between its observed times: for
    entry :math:`(b, i, d)` with :math:`j` the latest observed index at or before :math:`i` and
    :math:`k` the earliest at or after it (observations of series :math:`b`, variable
    :math:`d`),

    .. math:: \hat x_{bid} = x_{bjd} + rac{t_i - t_j}{t_k - t_j}\,(x_{bkd} - x_{bjd}),

    :math:`x_{bid}` itself where :math:`j = k = i`; the nearest observed value where only one
    side exists (constant before the first and after the last observation: LOCF in
    extrapolation); 0 for a variable the series never observes.

    :param times: ``(N,)`` (a union grid, :func:`~pyro_seqlatent.data.irregular.
        union_grid_collate`) or ``(B, N)`` (each series' own, ``padded_collate``).
    """
    _check_baseline_inputs(values, obs_mask, "linear_interp_predict")
    b, n, d = values.shape
    if not (torch.is_tensor(times) and times.shape in ((n,), (b, n))):
        raise ValueError(f"linear_interp_predict: times must have shape ({n},) or ({b}, {n}) "
                         f"for values {tuple(values.shape)}, got "
                         f"{tuple(times.shape) if torch.is_tensor(times) else type(times)}")
    t = times.to(values.dtype).expand(b, n).unsqueeze(-1).expand(b, n, d)
    before, after = _neighbours(obs_mask)
    j, k = before.clamp(0, n - 1), after.clamp(0, n - 1)
    xj, xk, tj, tk = values.gather(1, j), values.gather(1, k), t.gather(1, j), t.gather(1, k)
    has_j, has_k = before >= 0, after < n
    span = torch.where(has_j & has_k & (tk > tj), tk - tj, torch.ones_like(t))
    inside = torch.where(has_j & has_k & (tk > tj), xj + (t - tj) / span * (xk - xj), xj)
    pred = torch.where(has_j, torch.where(has_k, inside, xj), xk)
    return torch.where(has_j | has_k, pred, torch.zeros_like(pred))


#: the parameter-free baselines :func:`baseline_mse` scores
BASELINES = ("persistence", "locf", "linear_interp")


def _baseline_predict(kind: str, batch: dict) -> torch.Tensor:
    if kind == "persistence":
        return persistence_predict(batch["values"], batch["obs_mask"])
    if kind == "locf":
        return locf_predict(batch["values"], batch["obs_mask"])
    return linear_interp_predict(batch["values"], batch["obs_mask"], batch["times"])


@torch.no_grad()
def baseline_mse(dataset, protocol: str, kind: str, batch_size=50) -> dict:
    """Test MSE (``{"test_mse"}``) of a parameter-free baseline (:data:`BASELINES`) on the
    scored entries (``mask``), pooled over observations under ``protocol="ours"``, per record
    and variable under ``"reference"`` (module docstring); ``persistence`` is
    :func:`persistence_mse`."""
    if kind not in BASELINES:
        raise ValueError(f"baseline_mse: kind={kind!r}; use one of {list(BASELINES)}")
    if protocol not in ("ours", "reference"):
        raise ValueError(f"baseline_mse: protocol={protocol!r}; use 'ours' or 'reference'")
    if kind == "persistence":
        return persistence_mse(dataset, protocol, batch_size=batch_size)
    score = masked_mse if protocol == "ours" else reference_record_mse
    sse = count = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=union_grid_collate):
        s, c = score(_baseline_predict(kind, batch), batch["values"], batch["mask"])
        sse, count = sse + s, count + c
    return {"test_mse": sse / max(count, 1.0)}
