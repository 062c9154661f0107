"""The EM iteration shared by every model of :mod:`pyro_seqlatent.em`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def run_em(estimator: Any, e_step: Callable[[], Any], per_unit: Callable[[Any], float],
           desc: str) -> list[float]:
    """Alternate ``stats = e_step()`` and ``estimator.m_step(stats)`` up to ``max_iter`` times.

    Records on ``estimator``: ``log_likelihood_history_`` (``stats.log_likelihood /
    per_unit(stats)`` of the parameters *entering* each iteration, so it is non-decreasing for
    exact EM), ``fit_times_`` (seconds since the start at which each value was known),
    ``n_iter_`` and ``converged_`` (two successive values closer than ``tol``).
    """
    history: list[float] = []
    times: list[float] = []
    start = time.perf_counter()
    estimator.converged_ = False
    iterator = range(1, estimator.max_iter + 1)
    if estimator.progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, leave=False)
    for it in iterator:
        stats = e_step()
        history.append(float(stats.log_likelihood / per_unit(stats)))
        times.append(time.perf_counter() - start)
        estimator.m_step(stats)
        estimator.n_iter_ = it
        if len(history) > 1 and abs(history[-1] - history[-2]) < estimator.tol:
            estimator.converged_ = True
            break
    estimator.log_likelihood_history_ = history
    estimator.fit_times_ = times
    return history


def sum_statistics(chunks, statistics: Callable[[Any], Any]) -> Any:
    """``statistics(chunk)`` summed over ``chunks`` (the streaming E-step of every model)."""
    total = None
    for chunk in chunks:
        stats = statistics(chunk)
        total = stats if total is None else total + stats
    if total is None:
        raise ValueError("X yielded no data")
    return total


def seeded_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on ``device`` seeded by ``seed``, or by a seed drawn from torch's global CPU
    generator when ``seed`` is None (the draw stays on the CPU whatever the default device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) if seed is not None
                    else int(torch.randint(2**31, (1,), device="cpu")))
    return gen
