"""ODE pieces: shared-grid and time-rescaled solves against closed forms and each other, the NFE
counter, and the ODE-RNN cell (zero dynamics = a plain GRU; Euler/RK4 evolution)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_seqlatent.data.irregular import padded_collate, union_grid_collate
from pyro_seqlatent.nn.ode import (
    CountingField,
    ODEFunc,
    ODERNNCell,
    odeint_rescaled,
    odeint_shared,
    run_odernn,
)


class Linear(CountingField):
    """dz/dt = A z (closed form z(t) = expm(A t) z0)."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def field(self, t, z):
        return z @ self.a.T


def _a():
    return torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=torch.float64)


def test_shared_solve_matches_matrix_exponential():
    f = Linear(_a())
    z0 = torch.randn(3, 4, 2, dtype=torch.float64)  # particle dim 3, batch 4
    t = torch.tensor([0.0, 0.2, 1.0, 2.5], dtype=torch.float64)
    z = odeint_shared(f, z0, t, rtol=1e-9, atol=1e-10)
    assert z.shape == (3, 4, 4, 2)
    for i, ti in enumerate(t):
        expected = z0 @ torch.linalg.matrix_exp(_a() * ti).T
        torch.testing.assert_close(z[..., i, :], expected, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_union_grid_and_rescaled_solves_agree(method):
    """(a) solve once on the union grid and read each sequence at its own times; (b) solve every
    sequence on its own times by rescaling dz/ds = (dt/ds) f(z): same z(t_i)."""
    torch.manual_seed(0)
    f = ODEFunc(3, (16,), activation="tanh").double()
    times = [[0.0, 0.3, 0.35, 1.7], [0.0, 1.0, 2.0], [0.0, 0.05, 0.9, 1.1, 3.0]]
    items = [{"times": torch.tensor(t, dtype=torch.float64),
              "values": torch.zeros(len(t), 1, dtype=torch.float64),
              "mask": torch.ones(len(t), 1, dtype=torch.float64)} for t in times]
    z0 = torch.randn(2, 3, 3, dtype=torch.float64)  # particles x sequences x latent
    union = union_grid_collate(items)
    # reference: the union-grid solve with dopri5 (a fixed-step solve would add the error of its
    # linear interpolation between steps)
    za = odeint_shared(f, z0, union["times"], method="dopri5", rtol=1e-8, atol=1e-9)
    padded = padded_collate(items)
    zb = odeint_rescaled(f, z0, padded["times"], method=method, rtol=1e-8, atol=1e-9,
                         options={"step_size": 0.05} if method == "rk4" else None)
    for b, t in enumerate(times):
        idx = [union["times"].tolist().index(v) for v in t]
        tol = 1e-6 if method == "dopri5" else 1e-5
        torch.testing.assert_close(zb[:, b, : len(t)], za[:, b, idx], atol=tol, rtol=tol)
        # padding keeps the state at the sequence's last time
        torch.testing.assert_close(zb[:, b, len(t):],
                                   zb[:, b, len(t) - 1: len(t)].expand_as(zb[:, b, len(t):]))


def test_rescaled_solve_checks_shapes():
    f = ODEFunc(2)
    with pytest.raises(ValueError, match="B=2"):
        odeint_rescaled(f, torch.zeros(3, 2), torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="sorted"):
        odeint_rescaled(f, torch.zeros(1, 2), torch.tensor([[0.0, 2.0, 1.0]]))
    with pytest.raises(ValueError, match="solver"):
        odeint_shared(f, torch.zeros(1, 2), torch.tensor([0.0, 1.0]), method="magic")


def test_nfe_counter_forward_backward_and_adjoint():
    f = Linear(_a().float())
    z0 = torch.randn(5, 2, requires_grad=True)
    t = torch.linspace(0, 1, 4)
    z = odeint_shared(f, z0, t, method="rk4", options={"step_size": 0.1})
    assert f.nfe_forward == 4 * 10 and f.nfe_backward == 0  # 10 RK4 steps, 4 evaluations each
    z.sum().backward()
    assert f.nfe_backward == 40  # one vector-Jacobian product per recorded evaluation
    f.reset_nfe()
    z = odeint_shared(f, z0, t, method="dopri5", adjoint=True)
    forward = f.nfe_forward
    assert forward > 0 and f.nfe_backward == 0
    z.sum().backward()
    assert f.nfe_forward == forward and f.nfe_backward > 0
    assert f.a.grad is not None


def _reference_gru(cell: ODERNNCell, x, m, backwards):
    gru = nn.GRU(cell.gru.input_size, cell.hidden_dim, batch_first=True)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(cell.gru.weight_ih)
        gru.weight_hh_l0.copy_(cell.gru.weight_hh)
        gru.bias_ih_l0.copy_(cell.gru.bias_ih)
        gru.bias_hh_l0.copy_(cell.gru.bias_hh)
    inputs = torch.cat([x * m, m], -1)
    if backwards:
        inputs = inputs.flip(1)
    out, h = gru(inputs)
    return h[0], (out.flip(1) if backwards else out)


@pytest.mark.parametrize("backwards", [False, True])
def test_odernn_with_zero_dynamics_is_a_gru(backwards):
    torch.manual_seed(1)
    cell = ODERNNCell(3, 8, (16,), zero_dynamics=True)
    x = torch.randn(4, 6, 3)
    m = torch.ones(4, 6, 3)
    m[:, :, 1] = (torch.rand(4, 6) < 0.5).float()  # partial masks still count as observed
    times = torch.sort(torch.rand(6) * 3).values
    h, states = run_odernn(cell, times, x, m, backwards=backwards, return_all=True)
    h_ref, states_ref = _reference_gru(cell, x, m, backwards)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states, states_ref, atol=1e-5, rtol=1e-5)
    # with non-zero dynamics the result differs (the test can fail)
    cell.func.net.net[-1].bias.data.fill_(0.5)
    h2 = run_odernn(cell, times, x, m, backwards=backwards)
    assert not torch.allclose(h2, h_ref, atol=1e-3)


def test_odernn_skips_unobserved_steps():
    torch.manual_seed(2)
    cell = ODERNNCell(2, 5, zero_dynamics=True)
    x = torch.randn(3, 4, 2)
    m = torch.ones(3, 4, 2)
    m[:, 2] = 0
    times = torch.arange(4.0)
    h = run_odernn(cell, times, x, m)
    keep = [0, 1, 3]
    h_ref = run_odernn(cell, times[keep], x[:, keep], m[:, keep])
    torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("method, tol", [("euler", 3e-2), ("rk4", 1e-6)])
def test_odernn_evolve_matches_closed_form(method, tol):
    cell = ODERNNCell(1, 2, method=method).double()
    cell.func = Linear(_a())
    h = torch.randn(3, 2, dtype=torch.float64)
    dt = torch.tensor([0.5, -0.7, 1.0], dtype=torch.float64)  # per-sequence, backwards allowed
    out = cell.evolve(h, dt, num_steps=100)
    for b in range(3):
        expected = torch.linalg.matrix_exp(_a() * dt[b]) @ h[b]
        torch.testing.assert_close(out[b], expected, atol=tol, rtol=tol)
