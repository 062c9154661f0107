r"""ODE building blocks: vector fields with a function-evaluation counter, the Poisson-augmented
field, the ODE-RNN cell and the per-sequence time-rescaled solve.

Shapes. A latent state is ``(..., L)``; every leading dimension is a batch dimension (Pyro
particle plates, the data plate). Time vectors are either one shared, strictly increasing grid
``(N,)`` (the union-grid convention of Rubanova et al. 2019) or per-sequence grids ``(B, N)``
solved by time rescaling (:func:`odeint_rescaled`). Solutions are returned with the time axis
next to the state: ``(..., N, L)`` or ``(..., B, N, L)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchdiffeq
from torch import nn

from pyro_seqlatent.nn.mlp import MLP
from pyro_seqlatent.nn.times import validate_times

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


def _in_backward_pass() -> bool:
    """True while autograd executes a backward pass (e.g. the adjoint's augmented dynamics)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class CountingField(nn.Module):
    r"""Base class of vector fields :math:`\dot z = f(t, z)` that count their evaluations.

    ``nfe_forward`` counts evaluations of :math:`f` in the forward pass. ``nfe_backward`` counts
    the evaluations the backward pass pays for: with the adjoint method, the evaluations of the
    augmented dynamics inside ``loss.backward()``; with direct back-propagation through the
    solver, one vector-Jacobian product per recorded forward evaluation. Subclasses implement
    :meth:`field`.
    """

    def __init__(self):
        super().__init__()
        self.nfe_forward = 0
        self.nfe_backward = 0

    def reset_nfe(self) -> None:
        self.nfe_forward = 0
        self.nfe_backward = 0

    @property
    def nfe(self) -> dict[str, int]:
        return {"nfe_forward": self.nfe_forward, "nfe_backward": self.nfe_backward}

    def _count_vjp(self, grad):
        self.nfe_backward += 1
        return grad

    def field(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if _in_backward_pass():
            self.nfe_backward += 1
            return self.field(t, z)
        self.nfe_forward += 1
        out = self.field(t, z)
        if out.requires_grad:
            out.register_hook(self._count_vjp)
        return out


class ODEFunc(CountingField):
    r"""Autonomous neural vector field :math:`f_\theta(t, z) = \mathrm{MLP}_\theta(z)` (tanh
    hidden layers by default, as the Latent ODE's generative and recognition ODEs).

    :param int dim: state size ``L``.
    :param hidden_dims: hidden layer sizes.
    :param str activation: MLP activation.
    :param bool zero_last: start from :math:`f \equiv 0` (the ODE-RNN then equals a GRU).
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (50,), activation: str = "tanh",
                 zero_last: bool = False):
        super().__init__()
        self.dim = int(dim)
        self.net = MLP(self.dim, hidden_dims, self.dim, activation=activation,
                       zero_last=zero_last)

    def field(self, t, z):
        return self.net(z)


class PoissonAugmentedField(CountingField):
    r"""State :math:`[z, \Lambda]` with :math:`\dot z = f(z)` and
    :math:`\dot\Lambda = \lambda(z) = \exp(\log\lambda_\psi(z))` (Chen et al. 2018 §5).

    Solving from :math:`\Lambda(t_0) = 0` gives :math:`\Lambda(t) = \int_{t_0}^t \lambda(z(s))\,ds`
    in the same solve as :math:`z(t)`. ``log_rate`` maps ``(..., L)`` to ``(..., R)`` (``R`` = 1
    shared rate or ``D`` per-feature rates). Evaluations are counted on the wrapped ``field``.
    """

    def __init__(self, field: nn.Module, log_rate: nn.Module, latent_dim: int):
        super().__init__()
        self.inner = field
        self.log_rate = log_rate
        self.latent_dim = int(latent_dim)

    def forward(self, t, state):  # counting happens in ``inner``
        z = state[..., : self.latent_dim]
        return torch.cat([self.inner(t, z), self.log_rate(z).exp()], dim=-1)


def _check_method(method: str) -> None:
    if method not in ADAPTIVE_METHODS + FIXED_METHODS:
        raise ValueError(
            f"method={method!r} is not a torchdiffeq solver; use one of "
            f"{ADAPTIVE_METHODS + FIXED_METHODS}"
        )


def _odeint(field, z0, grid, *, method, rtol, atol, adjoint, options):
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    kwargs = {"method": method, "rtol": rtol, "atol": atol, "options": options}
    if adjoint:
        if not isinstance(field, nn.Module):
            raise TypeError("adjoint=True needs the vector field to be an nn.Module")
        kwargs["adjoint_params"] = tuple(field.parameters())
    return solve(field, z0, grid, **kwargs)


def odeint_shared(field, z0: torch.Tensor, times: torch.Tensor, *, method: str = "dopri5",
                  rtol: float = 1e-3, atol: float = 1e-4, adjoint: bool = False,
                  options: dict | None = None) -> torch.Tensor:
    r"""Solve :math:`\dot z = f(t, z)` from :math:`z(t_0) = z_0` on one shared grid
    :math:`t_0 < \dots < t_{N-1}`; returns ``(..., N, L)`` for ``z0`` of shape ``(..., L)``."""
    _check_method(method)
    validate_times(times, name="times", shared=True)
    out = _odeint(field, z0, times.to(z0.dtype), method=method, rtol=rtol, atol=atol,
                  adjoint=adjoint, options=options)
    return out.movedim(0, -2)


class TimeRescaledField(nn.Module):
    r"""The field :math:`g(s, z) = \frac{dt_b}{ds}(s)\, f(z)` on a shared grid
    :math:`s = 0, 1, \dots, N-1`.

    Sequence ``b`` has its own times :math:`t_{b,0} < \dots < t_{b,N-1}`; with the piecewise
    linear map :math:`t_b(s) = t_{b,j} + (s - j)(t_{b,j+1} - t_{b,j})` on :math:`[j, j+1]`,
    :math:`\frac{dt_b}{ds} = t_{b,j+1} - t_{b,j}` and, by the chain rule,
    :math:`\frac{d}{ds} z_b(t_b(s)) = \frac{dt_b}{ds}\, f(z_b)`, so :math:`z_b` at :math:`s = j`
    equals :math:`z_b(t_{b,j})` for every sequence at once. ``f`` must be autonomous (it is
    called with :math:`t = s`). ``dtds`` has shape ``(B, N-1)``; the state is ``(..., B, L)``.
    """

    def __init__(self, field: nn.Module, dtds: torch.Tensor):
        super().__init__()
        self.inner = field
        self.dtds = dtds

    def forward(self, s, z):
        j = torch.clamp(torch.floor(s).long(), 0, self.dtds.shape[-1] - 1)
        scale = self.dtds[:, j].unsqueeze(-1).to(z.dtype)
        return scale * self.inner(s, z)


def odeint_rescaled(field, z0: torch.Tensor, times: torch.Tensor, *, method: str = "dopri5",
                    rtol: float = 1e-3, atol: float = 1e-4, adjoint: bool = False,
                    options: dict | None = None) -> torch.Tensor:
    r"""Solve every sequence on its own time grid in one batched solve, by time rescaling.

    ``times`` is ``(B, N)`` (row ``b`` strictly increasing, possibly followed by repeats of its
    last value as padding, where :math:`dt/ds = 0` keeps the state constant); ``z0`` is
    ``(..., B, L)`` and is the state at ``times[:, 0]``. Solves
    :math:`dz/ds = (dt_b/ds)\, f(z)` (:class:`TimeRescaledField`) on ``s = 0..N-1`` and returns
    ``(..., B, N, L)`` with entry ``[..., b, i, :]`` = :math:`z_b(t_{b,i})`. Adaptive solvers are
    told the kinks of :math:`t_b(s)` (``jump_t``); fixed-step solvers step on the integers.
    """
    _check_method(method)
    validate_times(times, name="times", shared=False)
    if times.dim() != 2:
        raise ValueError(
            f"odeint_rescaled needs per-sequence times (B, N), got {tuple(times.shape)}"
        )
    if z0.dim() < 2 or z0.shape[-2] != times.shape[0]:
        raise ValueError(
            f"z0 has shape {tuple(z0.shape)}; its second-to-last dim must be the number of "
            f"sequences B={times.shape[0]} of times"
        )
    n = times.shape[-1]
    s = torch.arange(n, dtype=z0.dtype, device=z0.device)
    if n == 1:
        return z0.unsqueeze(-2)
    dtds = (times[:, 1:] - times[:, :-1]).to(z0.dtype)
    options = dict(options or {})
    if method in ADAPTIVE_METHODS and n > 2:
        options.setdefault("jump_t", s[1:-1])
    elif method in FIXED_METHODS:
        # steps land exactly on the integers; a step's last stage sees the left limit
        options.setdefault("perturb", True)
        step = options.pop("step_size", None)
        if step is not None and "grid_constructor" not in options:
            per_unit = max(1, math.ceil(1.0 / float(step)))
            options["grid_constructor"] = lambda func, y0, t: (
                torch.arange((n - 1) * per_unit + 1, dtype=t.dtype, device=t.device) / per_unit
            )
    rescaled = TimeRescaledField(field, dtds)
    out = _odeint(rescaled, z0, s, method=method, rtol=rtol, atol=atol, adjoint=adjoint,
                  options=options or None)
    return out.movedim(0, -2)


def odeint_times(field, z0, times, **kwargs) -> torch.Tensor:
    """:func:`odeint_shared` for ``times`` of shape ``(N,)``, :func:`odeint_rescaled` for
    ``(B, N)``."""
    if not torch.is_tensor(times):
        raise TypeError(f"times must be a tensor, got {type(times).__name__}")
    if times.dim() == 1:
        return odeint_shared(field, z0, times, **kwargs)
    return odeint_rescaled(field, z0, times, **kwargs)


class ODERNNCell(nn.Module):
    r"""One ODE-RNN step (Rubanova et al. 2019, Algorithm 1) on hidden state ``(B, H)``:

    .. math:: h' = \mathrm{ODESolve}(f, h, t_{prev} \to t_i), \qquad
              h_i = m_i\,\mathrm{GRU}(h', [x_i \odot m_i, m_i]) + (1 - m_i)\,h',

    where :math:`m_i = 1` if any feature is observed at :math:`t_i`. :meth:`evolve` integrates
    with ``ceil(|Δt|_max / max_step)`` steps of a fixed-step method (Euler by default, as the
    reference), vectorized over per-sequence ``Δt``; ``Δt < 0`` runs backwards in time.
    """

    def __init__(self, input_dim: int, hidden_dim: int, ode_hidden_dims: Sequence[int] = (50,),
                 method: str = "euler", zero_dynamics: bool = False):
        super().__init__()
        if method not in ("euler", "midpoint", "rk4"):
            raise ValueError(f"ODERNNCell method={method!r}: use 'euler', 'midpoint' or 'rk4'")
        self.input_dim = int(input_dim)
        self.hidden_dim = int(hidden_dim)
        self.method = method
        self.func = ODEFunc(hidden_dim, ode_hidden_dims, zero_last=zero_dynamics)
        self.gru = nn.GRUCell(2 * self.input_dim, self.hidden_dim)

    def _step(self, h, dt):
        f = self.func
        if self.method == "euler":
            return h + dt * f(None, h)
        if self.method == "midpoint":
            return h + dt * f(None, h + 0.5 * dt * f(None, h))
        k1 = f(None, h)
        k2 = f(None, h + 0.5 * dt * k1)
        k3 = f(None, h + 0.5 * dt * k2)
        k4 = f(None, h + dt * k3)
        return h + dt * (k1 + 2 * k2 + 2 * k3 + k4) / 6

    def evolve(self, h: torch.Tensor, dt: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Integrate ``h`` over ``dt`` (scalar or ``(B,)``) with ``num_steps`` equal steps."""
        dt = torch.as_tensor(dt, dtype=h.dtype, device=h.device)
        if dt.dim() > 0:
            dt = dt.unsqueeze(-1)
        sub = dt / num_steps
        for _ in range(num_steps):
            h = self._step(h, sub)
        return h

    def update(self, h: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """GRU update from ``[x ⊙ m, m]`` where anything is observed; ``h`` unchanged elsewhere."""
        m = m.to(h.dtype)
        new = self.gru(torch.cat([x * m, m], dim=-1), h)
        any_obs = (m.sum(-1, keepdim=True) > 0).to(h.dtype)
        return any_obs * new + (1 - any_obs) * h


def num_substeps(times: torch.Tensor, max_step: float) -> list[int]:
    """``ceil(max_b |t_{b,i+1} - t_{b,i}| / max_step)`` for every interval (at least 1)."""
    if not max_step > 0 or not math.isfinite(max_step):
        raise ValueError(f"max_step must be a positive finite number, got {max_step!r}")
    gaps = (times[..., 1:] - times[..., :-1]).abs()
    if gaps.dim() > 1:
        gaps = gaps.amax(0)
    return [max(1, int(v)) for v in torch.ceil(gaps / max_step).tolist()]


def run_odernn(cell: ODERNNCell, times: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               *, backwards: bool = False, max_step: float | None = None,
               max_step_fraction: float = 1 / 50, return_all: bool = False,
               return_pre_update: bool = False):
    r"""Run :class:`ODERNNCell` over a batch: ``times`` ``(N,)`` or ``(B, N)``, ``values`` and
    ``mask`` ``(B, N, D)``. ``backwards=True`` goes from :math:`t_{N-1}` to :math:`t_0` (the
    Latent ODE encoder). The step bound defaults to ``max_step_fraction`` of the time span.

    Returns the final state ``(B, H)``; with ``return_all`` also the states after each update
    ``(B, N, H)`` (in time order); with ``return_pre_update`` the evolved states before each
    update :math:`h'_i` ``(B, N, H)`` (used to predict :math:`x_i` without seeing it).
    """
    b, n, _ = values.shape
    if max_step is None:
        span = float((times[..., -1] - times[..., 0]).abs().max())
        max_step = span * max_step_fraction if span > 0 else 1.0
    steps = num_substeps(times, max_step)
    h = values.new_zeros(b, cell.hidden_dim)
    order = range(n - 1, -1, -1) if backwards else range(n)
    posts, pres = [None] * n, [None] * n
    prev = None
    for i in order:
        if prev is not None:
            dt = times[..., i] - times[..., prev]
            h = cell.evolve(h, dt, steps[min(i, prev)])
        pres[i] = h
        h = cell.update(h, values[:, i], mask[:, i])
        posts[i] = h
        prev = i
    out = [h]
    if return_all:
        out.append(torch.stack(posts, dim=1))
    if return_pre_update:
        out.append(torch.stack(pres, dim=1))
    return out[0] if len(out) == 1 else tuple(out)
