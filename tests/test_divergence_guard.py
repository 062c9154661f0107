"""The divergence guard's two explosion rules, each on its own (DivergenceGuard.check_step):
a loss far above the run's first loss, and a loss far above the range of the recent window when
the first loss no longer says anything (a loss that fell by orders of magnitude)."""

from __future__ import annotations

import pytest
import torch

from pyro_seqlatent.infer.guards import WINDOW, DivergenceGuard, TrainingDiverged


def _feed(guard, losses, start=1):
    for step, loss in enumerate(losses, start):
        guard.check_step(step, float(loss), 1.0)
    return start + len(losses)


def _noisy(level, n, seed=0):
    return (level + 0.05 * level * torch.randn(n, generator=torch.Generator().manual_seed(seed))
            ).tolist()


def test_a_jump_above_the_recent_range_stops_even_far_below_the_first_loss():
    guard = DivergenceGuard(None, factor=10.0)
    step = _feed(guard, [1000.0] + _noisy(10.0, WINDOW + 10))  # the 1000 has left the window
    guard.check_step(step, 12.0, 1.0)  # inside the range's margin: fine
    with pytest.raises(TrainingDiverged, match=rf"step {step + 1}: the loss 50 exploded .*last "
                                               rf"{WINDOW} steps' losses"):
        guard.check_step(step + 1, 50.0, 1.0)  # 20x below the first-loss limit (11000)


def test_a_jump_above_the_first_loss_stops_before_any_window_exists():
    guard = DivergenceGuard(None, factor=10.0)
    step = _feed(guard, [5.0, 4.0, 3.5])
    guard.check_step(step, 50.0, 1.0)  # 5 + 10 * 5 = 55: not yet
    with pytest.raises(TrainingDiverged, match="exploded .*first loss of the run was 5"):
        guard.check_step(step + 1, 60.0, 1.0)


def test_noise_and_a_steady_fall_pass_and_factor_none_turns_both_rules_off():
    guard = DivergenceGuard(None, factor=10.0)
    _feed(guard, torch.logspace(3, 0, 200).tolist() + _noisy(1.0, 100, seed=1))
    off = DivergenceGuard(None, factor=None)
    step = _feed(off, [1.0] + _noisy(1.0, WINDOW + 5))
    off.check_step(step, 1e9, 1.0)
    with pytest.raises(TrainingDiverged, match="the loss is not finite"):
        off.check_step(step + 1, float("inf"), 1.0)
