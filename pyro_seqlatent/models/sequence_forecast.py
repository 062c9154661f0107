r"""Forecasts of any sequence model/guide pair that follows the *forecast protocol*, with
quantile bands, a figure and the CRPS of held-out continuations.

**The forecast protocol.** A pair ``(model, guide)`` can be forecast when

* ``guide(x, mask)`` takes a padded batch ``x`` of shape ``(B, P, D)`` and its bool ``mask``
  ``(B, P)`` (``True`` = observed step) and samples the latent sites of those ``P`` steps;
* ``model(x, mask, horizon=H)`` scores the same batch (its latents are replayed from the
  guide's trace, so they must carry the same site names) and then *continues* every sequence
  for ``H`` steps from its generative process, returning the whole sequence
  ``(..., B, P + H, D)`` (observed prefix, then the ``H`` sampled steps);
* the batch plate is the rightmost batch dimension (``pyro.plate("data", B, dim=-1)``, or a
  plate Pyro allocates) and, with ``vectorize=True`` (the default), every tensor operation
  broadcasts over one extra leftmost sample dimension: the ``S`` continuations are drawn under
  a plate ``"forecast_samples"`` at ``dim=-2``, as the particles of
  :func:`~pyro_seqlatent.infer.log_marginal` are. A model that does not broadcast (e.g. one
  that calls ``nn.GRUCell`` on a ``(S, B, F)`` tensor) is run once per sample with
  ``vectorize=False``.

:class:`~pyro_seqlatent.models.vrnn.VRNNModel` / ``VRNNGuide`` follow it, and so does a Deep
Markov Model written by hand (``examples/own_dmm.py``). :func:`check_forecast_protocol` checks
the signatures before anything runs and names what is missing. A ``mask`` of ``None`` means
every step of the prefix is observed: :func:`forecast` builds the all-``True`` mask itself, so
the guide always receives a tensor.

Scores: :func:`forecast_bands` gives the mean and 5 %/95 % quantile bands of the samples (the
keys of :func:`pyro_seqlatent.models.latent_ode.forecast`), :func:`forecast_scores` the CRPS of
the continuations of held-out sequences against their true steps
(:func:`pyro_seqlatent.models.forecast_metrics.crps`, Pyro's ``crps_empirical``), and
:func:`plot_forecast` the figure.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import pyro
import torch

__all__ = ["check_forecast_protocol", "forecast", "forecast_bands", "forecast_scores",
           "plot_forecast", "split_for_forecast"]

_MODEL_CALL = "model(x, mask, horizon=H) -> (..., B, P + H, D)"
_GUIDE_CALL = "guide(x, mask)"


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables: nothing to check
        return None


def check_forecast_protocol(model, guide) -> None:
    """Raise a ``TypeError`` naming what is missing when ``model`` / ``guide`` cannot follow
    the forecast protocol (see the module docstring): both callable, the guide taking
    ``(x, mask)`` and the model ``(x, mask, horizon=H)``."""
    for name, fn, call in (("model", model, _MODEL_CALL), ("guide", guide, _GUIDE_CALL)):
        if not callable(fn):
            raise TypeError(f"forecast: the {name} must be callable ({call}), got "
                            f"{type(fn).__name__}")
    x, mask = object(), object()
    checks = (("model", model, (x, mask), {"horizon": 1}, _MODEL_CALL,
               "a keyword argument `horizon` (steps to generate after the prefix)"),
              ("guide", guide, (x, mask), {}, _GUIDE_CALL,
               "two positional arguments, the prefix x (B, P, D) and its bool mask (B, P)"))
    for name, fn, args, kwargs, call, needs in checks:
        sig = _signature(fn)
        if sig is None:
            continue
        try:
            sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"forecast: the {name} must accept {call}: it needs {needs}; "
                f"{type(fn).__name__}{sig} does not ({err}). See "
                "pyro_seqlatent.models.sequence_forecast for the protocol") from None


def _check_prefix(prefix, mask, horizon: int, num_samples: int) -> torch.Tensor:
    if not torch.is_tensor(prefix) or prefix.dim() != 3:
        shape = tuple(prefix.shape) if torch.is_tensor(prefix) else type(prefix).__name__
        raise ValueError(f"forecast: prefix must be a (B, P, D) tensor, got {shape}")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"forecast: horizon must be an int >= 1, got {horizon!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"forecast: num_samples must be an int >= 1, got {num_samples!r}")
    if mask is None:
        return torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
    if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(prefix.shape[:2]):
        got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"forecast: mask must be a (B, P) = {tuple(prefix.shape[:2])} bool "
                         f"tensor or None (all steps observed), got {got}")
    return mask.bool()


def _continue(model, guide, prefix, mask, horizon):
    from pyro import poutine

    guide_trace = poutine.trace(guide).get_trace(prefix, mask)
    return poutine.replay(model, trace=guide_trace)(prefix, mask, horizon=horizon)


def _check_output(full, prefix, horizon: int) -> None:
    B, P, D = prefix.shape
    if not torch.is_tensor(full) or full.dim() < 3 or full.shape[-3] != B \
            or full.shape[-2] != P + horizon or full.shape[-1] != D:
        got = tuple(full.shape) if torch.is_tensor(full) else type(full).__name__
        raise ValueError(
            f"forecast: {_MODEL_CALL} must return the observed prefix followed by the H "
            f"generated steps, shape (..., {B}, {P + horizon}, {D}); the model returned {got}")


@torch.no_grad()
def forecast(model, guide, prefix: torch.Tensor, horizon: int, num_samples: int = 1,
             mask: torch.Tensor | None = None, vectorize: bool = True) -> torch.Tensor:
    r"""``num_samples`` continuations of observed prefixes by any pair that follows the
    forecast protocol (module docstring): :math:`z_{\le P} \sim q(\cdot \mid x_{\le P})`, then
    the model's generative process for :math:`t = P+1..P+H`. Model and guide run in eval mode
    (no dropout) and outside any enclosing trace (``poutine.block``).

    :param prefix: ``(B, P, D)`` observed prefixes.
    :param horizon: ``H >= 1`` steps to generate.
    :param mask: ``(B, P)`` bool, ``None`` for all steps observed (then built here).
    :param vectorize: draw the samples under one ``"forecast_samples"`` plate (``dim=-2``);
        ``False`` runs the pair once per sample, for models that do not broadcast over a
        leading sample dimension.
    :returns: ``(num_samples, B, H, D)`` sampled continuations.
    :raises TypeError: naming what the model or guide lacks (:func:`check_forecast_protocol`).
    """
    from pyro import poutine

    from pyro_seqlatent.infer.modes import eval_mode

    check_forecast_protocol(model, guide)
    mask = _check_prefix(prefix, mask, horizon, num_samples)
    B, P, D = prefix.shape
    with poutine.block(), eval_mode(model, guide):
        if vectorize:
            try:
                with pyro.plate("forecast_samples", num_samples, dim=-2):
                    full = _continue(model, guide, prefix, mask, horizon)
            except (RuntimeError, ValueError) as err:  # shape errors of torch and Pyro
                raise type(err)(
                    f"forecast: the model/guide failed under the vectorized sample plate "
                    f"(dim=-2) ({err}); if they do not broadcast over a leading sample "
                    "dimension, call forecast(..., vectorize=False)") from err
            _check_output(full, prefix, horizon)
            full = full.expand((num_samples,) + full.shape[-3:])
        else:
            parts = []
            for _ in range(num_samples):
                one = _continue(model, guide, prefix, mask, horizon)
                _check_output(one, prefix, horizon)
                parts.append(one.reshape(one.shape[-3:]) if one.dim() > 3 else one)
            full = torch.stack(parts)
    return full[..., P:, :]


def forecast_bands(model, guide, prefix: torch.Tensor, horizon: int, num_samples: int = 100,
                   mask: torch.Tensor | None = None, quantiles: Sequence[float] = (0.05, 0.95),
                   vectorize: bool = True) -> dict:
    """:func:`forecast` with its summaries, the keys of the Latent ODE's forecast:
    ``{"samples" (S, B, H, D), "mean", "lower", "upper" (B, H, D)}``, ``lower``/``upper`` the
    ``quantiles`` (default 5 % and 95 %) of the samples at every step and feature."""
    lo, hi = (float(q) for q in quantiles)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"forecast_bands: quantiles must be (lower, upper) with "
                         f"0 <= lower < upper <= 1, got {tuple(quantiles)}")
    samples = forecast(model, guide, prefix, horizon, num_samples, mask, vectorize)
    q = torch.quantile(samples.double(), torch.tensor([lo, hi], dtype=torch.double,
                                                      device=samples.device), dim=0)
    return {"samples": samples, "mean": samples.mean(0), "lower": q[0].to(samples.dtype),
            "upper": q[1].to(samples.dtype)}


def split_for_forecast(sequences: Sequence[torch.Tensor], prefix_length: int, horizon: int):
    """``(prefix (B, P, D), truth (B, H, D), truth_mask (B, H))`` from the sequences (each
    ``(T_b, D)``) that are longer than ``prefix_length``: the first ``P`` steps are observed,
    the next ``H`` (fewer where a sequence ends sooner, masked out) are the truth."""
    from pyro_seqlatent.data.sequences import pad_sequences

    if prefix_length < 1 or horizon < 1:
        raise ValueError(f"split_for_forecast: prefix_length and horizon must be >= 1, got "
                         f"{prefix_length}, {horizon}")
    kept = [s for s in sequences if s.shape[0] > prefix_length]
    if not kept:
        raise ValueError(f"split_for_forecast: no sequence is longer than prefix_length="
                         f"{prefix_length} steps")
    prefix = torch.stack([s[:prefix_length] for s in kept])
    truth, truth_mask = pad_sequences([s[prefix_length:prefix_length + horizon] for s in kept])
    if truth.shape[1] < horizon:  # every sequence ends before P + H
        pad = horizon - truth.shape[1]
        truth = torch.cat([truth, truth.new_zeros(truth.shape[0], pad, truth.shape[2])], 1)
        truth_mask = torch.cat([truth_mask, truth_mask.new_zeros(truth.shape[0], pad)], 1)
    return prefix, truth, truth_mask


@torch.no_grad()
def forecast_scores(model, guide, sequences: Sequence[torch.Tensor], prefix_length: int,
                    horizon: int, num_samples: int = 100, batch_size: int = 32,
                    vectorize: bool = True) -> dict:
    r"""Scores of the forecasts of held-out sequences: each sequence longer than
    ``prefix_length`` is cut into an observed prefix and its next ``horizon`` true steps
    (:func:`split_for_forecast`), the pair forecasts ``num_samples`` continuations, and

    * ``crps``: the CRPS (Pyro's ``crps_empirical``; lower is better) averaged over every
      scored entry (sequence, step, feature), and ``crps_by_step``: the same per step ahead;
    * ``mae_of_mean``: the mean absolute error of the forecast mean;
    * ``coverage_90``: the fraction of true values inside the 5–95 % band;
    * ``num_sequences``.
    """
    from pyro_seqlatent.models.forecast_metrics import crps

    prefix, truth, truth_mask = split_for_forecast(sequences, prefix_length, horizon)
    sums = {"crps": 0.0, "mae": 0.0, "covered": 0.0, "count": 0.0}
    by_step = torch.zeros(horizon, dtype=torch.double)
    by_step_count = torch.zeros(horizon, dtype=torch.double)
    for start in range(0, prefix.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        out = forecast_bands(model, guide, prefix[sl], horizon, num_samples,
                             vectorize=vectorize)
        y, m = truth[sl].to(out["mean"]), truth_mask[sl].to(out["mean"].device)
        entry = m[..., None].expand_as(y).to(y.dtype)
        per_entry = crps(out["samples"], y, reduce=False) * entry
        sums["crps"] += float(per_entry.sum())
        sums["mae"] += float(((out["mean"] - y).abs() * entry).sum())
        inside = (y >= out["lower"]) & (y <= out["upper"])
        sums["covered"] += float((inside.to(y.dtype) * entry).sum())
        sums["count"] += float(entry.sum())
        by_step += per_entry.sum((0, 2)).double().cpu()
        by_step_count += entry.sum((0, 2)).double().cpu()
    n = max(sums["count"], 1.0)
    return {"crps": sums["crps"] / n, "mae_of_mean": sums["mae"] / n,
            "coverage_90": sums["covered"] / n,
            "crps_by_step": (by_step / by_step_count.clamp_min(1)).tolist(),
            "num_sequences": int(prefix.shape[0])}


def plot_forecast(model, guide, sequences: Sequence[torch.Tensor], prefix_length: int,
                  horizon: int, out_path, feature: int | None = None, num_samples: int = 100,
                  num_series: int = 3, vectorize: bool = True, ylabel: str | None = None):
    """Forecast figure: for the first ``num_series`` sequences longer than ``prefix_length``,
    the observed prefix and the true continuation (black), the forecast mean and its 5–95 %
    band (blue) after the split (dotted line). The plotted value is feature ``feature`` or,
    with ``None``, the sum over features (e.g. the notes sounding in a piano-roll frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [s for s in sequences if s.shape[0] > prefix_length][:num_series]
    prefix, _, _ = split_for_forecast(kept, prefix_length, horizon)

    def value(x):
        return x.sum(-1) if feature is None else x[..., feature]

    samples = value(forecast(model, guide, prefix, horizon, num_samples,
                             vectorize=vectorize)).double()  # (S, B, H)
    q = torch.quantile(samples, torch.tensor([0.05, 0.95], dtype=torch.double), dim=0)
    fig, axes = plt.subplots(len(kept), 1, figsize=(7, 2.0 * len(kept)), squeeze=False)
    steps = torch.arange(prefix_length, prefix_length + horizon)
    for b, (ax, seq) in enumerate(zip(axes[:, 0], kept)):
        end = min(seq.shape[0], prefix_length + horizon)
        ax.plot(range(end), value(seq[:end]).cpu(), color="k", lw=1, label="data")
        ax.fill_between(steps, q[0, b].cpu(), q[1, b].cpu(), color="C0", alpha=0.25,
                        label="forecast 5–95 %")
        ax.plot(steps, samples[:, b].mean(0).cpu(), color="C0", label="forecast mean")
        ax.axvline(prefix_length - 0.5, color="0.6", ls=":", lw=1)
        ax.set_ylabel(ylabel or ("sum over features" if feature is None else f"x[{feature}]"))
    axes[0, 0].legend(fontsize=7, ncol=3, frameon=False)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
