r"""Per-step diagonal Normals whose log-densities are computed in one batched call.

A sequence model with one latent site per step, :math:`z_t \sim \mathcal N(\mu_t,
\operatorname{diag}\sigma_t^2)` (the VRNN's prior and mean-field guide), hands Pyro T small
distributions; Pyro scores each one separately when it computes the trace's log-densities, T
small forward and backward passes. A :class:`StepGroup` holds the T parameter pairs and the T
values and computes

.. math:: \ell_t = \sum_d \log \mathcal N(z_{t,d};\ \mu_{t,d},\ \sigma_{t,d})
          \quad\text{for all } t \text{ at once,}

and each site's :class:`StepNormal` answers ``log_prob(z_t)`` with the slice :math:`\ell_t`
when it is asked about the very tensor ``z_t`` the group holds (the value sampled or replayed at
that site). Any other value, a different batch shape, or a group without values falls back to
the ordinary per-site computation, so a ``StepNormal`` is always exactly
``Normal(loc, scale).to_event(1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch


class StepGroup:
    """The per-step Normals of one model or guide run (see the module docstring).

    :param loc, scale: optional batched parameters ``(..., T, Z)`` when they are known up front
        (a model whose prior parameters come from the guide's states); otherwise each
        :meth:`member` call appends one step's ``(..., Z)`` parameters.
    :param values: optional list of the T values; or set them with :meth:`set_values` after the
        steps have been sampled (before the trace is scored).
    """

    def __init__(self, loc: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 values: Sequence[torch.Tensor] | None = None):
        self._batched = (loc, scale) if loc is not None else None
        self._locs: list[torch.Tensor] = []
        self._scales: list[torch.Tensor] = []
        self._values = list(values) if values is not None else None
        self._log_prob: torch.Tensor | None = None

    def member(self, loc: torch.Tensor, scale: torch.Tensor, index: int | None = None
               ) -> StepNormal:
        """The distribution of step ``index`` (the next step when None) with these parameters
        (slices of the batched ones when the group was built with them)."""
        if index is None:
            index = len(self._locs)
            self._locs.append(loc)
            self._scales.append(scale)
        return StepNormal(loc, scale, group=self, index=index)

    def set_values(self, values: Sequence[torch.Tensor]) -> None:
        self._values = list(values)
        self._log_prob = None

    def log_prob_of(self, index: int, value: torch.Tensor) -> torch.Tensor | None:
        """:math:`\\ell_t` for ``value`` if it is the group's value of step ``index``, else
        None."""
        values = self._values
        if values is None or index >= len(values) or value is not values[index]:
            return None
        if self._log_prob is None:
            if self._batched is not None:
                loc, scale = self._batched
            else:
                if len(self._locs) != len(values):
                    return None
                loc = _stack(self._locs)
                scale = _stack(self._scales)
            z = _stack(values)
            self._log_prob = dist.Normal(loc, scale).log_prob(z).sum(-1)  # (..., T)
        return self._log_prob[..., index]


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch.broadcast_tensors(*tensors), dim=-2)


class StepNormal(dist.Independent):
    """``Normal(loc, scale).to_event(1)`` for step ``index`` of a :class:`StepGroup`."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, group: StepGroup | None = None,
                 index: int | None = None, validate_args=None):
        super().__init__(dist.Normal(loc, scale, validate_args=validate_args), 1,
                         validate_args=validate_args)
        self._group = group
        self._index = index

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._group is not None:
            shared = self._group.log_prob_of(self._index, value)
            if (shared is not None and shared.shape == self.batch_shape
                    and value.shape[:-1] == self.batch_shape):
                return shared
        return super().log_prob(value)

    def expand(self, batch_shape, _instance=None) -> StepNormal:
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:  # Pyro's plates ask for this at every site
            return self
        base = self.base_dist.expand(batch_shape + self.event_shape)
        return StepNormal(base.loc, base.scale)  # another shape: outside the group
