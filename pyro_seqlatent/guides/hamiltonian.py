r"""Guides whose flow knows the model: :class:`HamiltonianGuide` and :class:`LangevinGuide`.

Either wraps any guide (a model's own guide, :class:`~pyro_seqlatent.guides.AutoAmortized`,
a hand-written one with a mean-field or flow site guide) and moves the draw of one latent site
``site`` with the gradient of the model's log joint at the data point at hand:

.. math:: z_0 \sim q_0(z\mid x)\ \text{(the wrapped guide's site)},\qquad
          z_K = \text{flow}(z_0;\ \nabla_z\log p(x, z, w)),

where :math:`w` are the values the wrapped guide drew for its other sites before ``site``
(global latents, MAP point estimates). :math:`\log p(x, z, w)` is read from the *model* with
Pyro's handlers: ``poutine.trace(poutine.condition(model, {site: z, **w}))`` run on the guide's
arguments, its sites' ``log_prob`` summed without their scales (a subsampling plate's
:math:`N/B` does not stretch the target). Data points are independent given :math:`w`, so the
gradient of the sum over the batch (and over particles) is the gradient of each point's own
:math:`\log p(x_n, z_n, w)`. The model is run as a separate Pyro program: its messages are
hidden from the handlers around the guide (``poutine.block``) and Pyro's plate dimensions of
the guide's call are set aside while it runs (its plates would collide with the model's own
plates of the same names). During training (gradients on) the flow is differentiated
through, second derivatives of the model included, as in HVAE.

The site's guide density becomes the flow's augmented one (equations in
:mod:`pyro_seqlatent.transforms.hamiltonian`):
:math:`\log\tilde q(z_K\mid x) = \log q_0(z_0\mid x) + \delta`, so that ``Trace_ELBO`` of the
wrapped guide is the augmented bound (HVAE's for :class:`HamiltonianGuide`, the annealed
Langevin bound for :class:`LangevinGuide`) and :func:`~pyro_seqlatent.infer.log_marginal`'s
importance weights :math:`p(x, z_K)/\tilde q` stay unbiased for :math:`p(x)` (they are the
weights of the extended space). :math:`\log\tilde q` is known only for the draw just made:
a score-function estimator, which scores a detached or replayed value, is refused by name.

Cost: :math:`K + 1` model gradients per draw (each a forward and backward pass of the model,
e.g. the VAE's decoder), and the backward pass of training goes through them again.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _DIM_ALLOCATOR
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_seqlatent.transforms.hamiltonian import HamiltonianFlow, LangevinFlow

__all__ = ["HamiltonianGuide", "LangevinGuide", "ModelFlowGuide", "model_log_joint"]

_REFUSED = (
    "{owner}: log q of site {site!r} is known only for the draw just made (the flow's augmented "
    "density over its momentum / path noise, not a density of z alone), and it was asked at "
    "another value. Score-function estimators (score, score_*_baseline, stl, dreg) and "
    "replayed guide traces need log q(z) at any value: train this guide with a reparameterized "
    "ELBO (Trace_ELBO, 'reparam', or RenyiELBO / 'iwae')"
)


@contextmanager
def _own_plate_dims():
    """Pyro's plate dimensions free while a nested program runs, restored after."""
    saved = list(_DIM_ALLOCATOR._stack)
    _DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        _DIM_ALLOCATOR._stack[:] = saved


def model_log_joint(model: Callable, args: tuple, kwargs: dict, values: dict, site: str
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""``z -> Σ log p(x, z, w)``: the model run with ``site = z`` and ``values`` conditioned,
    every sample site's ``log_prob`` (masks applied, scales not) summed to a scalar.

    A latent site of the model not in ``values`` (drawn by the guide after ``site``, or not at
    all) raises: the target would be random."""

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        data = {**values, site: z}
        with poutine.block(), _own_plate_dims():
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
        total = z.new_zeros(())
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or site_is_subsample(node):
                continue
            if not node["is_observed"]:
                raise ValueError(
                    f"the model's latent site {name!r} has no value when the flow of site "
                    f"{site!r} runs: the wrapped guide must draw it before {site!r} (or the "
                    "model must not have it)")
            lp = node["fn"].log_prob(node["value"])
            if node["mask"] is not None:
                lp = torch.where(node["mask"], lp, lp.new_zeros(()))
            total = total + lp.sum()
        return total

    return log_joint


def _gradient(log_joint: Callable, create_graph: bool) -> Callable:
    """``z -> ∇_z log_joint(z)``; differentiable (second order) when ``create_graph``."""

    def grad(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if not create_graph or not z.requires_grad:
                z = z.detach().requires_grad_()
            (g,) = torch.autograd.grad(log_joint(z), z, create_graph=create_graph)
        return g

    return grad


class _FlowedSite(dist.TorchDistribution):
    """``z_K`` of the flow started from ``base``; ``log_prob`` only of that draw."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base: dist.Distribution, move: Callable, owner: str, site: str):
        self.base, self.move, self.owner, self.site = base, move, owner, site
        self._draw: tuple | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return _FlowedSite(self.base.expand(batch_shape), self.move, self.owner, self.site)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        z0 = self.base.rsample(sample_shape)
        log_q0 = self.base.log_prob(z0)  # first: a flow base scores its own draw from its cache
        z, delta = self.move(z0, self.base)
        self._draw = (z, log_q0 + delta)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._draw is None or value is not self._draw[0]:
            raise ValueError(_REFUSED.format(owner=self.owner, site=self.site))
        return self._draw[1]


class _SwapSite(Messenger):
    """Records the guide's draws and puts the flow on site ``site``."""

    def __init__(self, owner: ModelFlowGuide, args: tuple, kwargs: dict):
        super().__init__()
        self.owner, self.args, self.kwargs = owner, args, kwargs
        self.values: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] != self.owner.site or msg["is_observed"]:
            return
        self.owner.check_base(msg["fn"])
        log_joint = model_log_joint(self.owner.model, self.args, self.kwargs, dict(self.values),
                                    self.owner.site)
        msg["fn"] = _FlowedSite(msg["fn"], self.owner.mover(log_joint),
                                type(self.owner).__name__, self.owner.site)

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] == self.owner.site and msg["is_observed"]:
            # an outer handler (condition, as STL / DReG do) gave the value: no log q for it
            raise ValueError(_REFUSED.format(owner=type(self.owner).__name__,
                                             site=self.owner.site))
        if not msg["is_observed"]:
            self.values[msg["name"]] = msg["value"]


class ModelFlowGuide(nn.Module):
    """Base of :class:`HamiltonianGuide` and :class:`LangevinGuide` (module docstring).

    :param callable model: the Pyro model whose ``log p(x, z)`` drives the flow.
    :param callable guide: the wrapped guide; its site ``site`` is the base ``q_0``
        (a reparameterized distribution over real vectors, ``event_dim = 1``).
    :param str site: the latent site the flow moves.
    """

    def __init__(self, model: Callable, guide: Callable, flow: nn.Module, site: str = "z"):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not callable(guide):
            raise TypeError(f"guide must be a callable Pyro guide, got {type(guide).__name__}")
        if not isinstance(site, str) or not site:
            raise TypeError(f"site must be the name of a latent site, got {site!r}")
        self._model = (model,)  # a tuple: the model's parameters are not the guide's
        self.guide, self.flow, self.site = guide, flow, site

    @property
    def model(self) -> Callable:
        return self._model[0]

    def check_base(self, fn: dist.Distribution) -> None:
        name = type(self).__name__
        support = fn.support
        real = support is constraints.real or (
            isinstance(support, constraints.independent)
            and support.base_constraint is constraints.real)
        if not fn.has_rsample or len(fn.event_shape) != 1 or not real:
            raise ValueError(
                f"{name}: the wrapped guide's site {self.site!r} draws {type(fn).__name__} with "
                f"event shape {tuple(fn.event_shape)}, support {support}, has_rsample "
                f"{fn.has_rsample}; the flow needs a reparameterized distribution over real "
                "vectors (event_dim 1): a MeanFieldGuide or FlowGuide site, .to_event(1)")
        if fn.event_shape[0] != self.flow.latent_dim:
            raise ValueError(f"{name}: site {self.site!r} has {fn.event_shape[0]} coordinates "
                             f"but the flow was built with latent_dim={self.flow.latent_dim}")

    def mover(self, log_joint: Callable) -> Callable:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        with _SwapSite(self, args, kwargs) as swap:
            result = self.guide(*args, **kwargs)
        if self.site not in swap.values:
            raise ValueError(f"{type(self).__name__}: the wrapped guide drew no site named "
                             f"{self.site!r} (it drew {sorted(swap.values)}); pass site=")
        return result


class HamiltonianGuide(ModelFlowGuide):
    r"""The wrapped guide's site followed by ``steps`` tempered leapfrog steps on
    :math:`\log p(x, z)` (HVAE; :class:`~pyro_seqlatent.transforms.hamiltonian.HamiltonianFlow`).

    :param model: the model.
    :param guide: the wrapped guide (its site ``site`` is ``q_0``).
    :param int latent_dim: size of the site's vector.
    :param int steps: ``K``.
    :param float step_size: initial ``ε`` (learned per step and coordinate).
    :param bool tempering: learn ``β_0`` (HVAE's quadratic schedule).
    :param float init_beta0: its start.
    :param str site: the latent site.

    Example::

        guide = HamiltonianGuide(model, VAEGuide(latent_dim=40), latent_dim=40, steps=4)
        train(model, guide, data, elbo="Trace_ELBO", ...)
    """

    def __init__(self, model: Callable, guide: Callable, latent_dim: int, steps: int = 4,
                 step_size: float = 0.02, tempering: bool = True, init_beta0: float = 0.5,
                 site: str = "z"):
        super().__init__(model, guide, HamiltonianFlow(latent_dim, steps, step_size, tempering,
                                                       init_beta0), site)

    def mover(self, log_joint: Callable) -> Callable:
        def move(z0, base):
            return self.flow(z0, _gradient(log_joint, torch.is_grad_enabled()))
        return move


class LangevinGuide(ModelFlowGuide):
    r"""The wrapped guide's site followed by ``steps`` annealed unadjusted Langevin steps from
    :math:`q_0` towards :math:`p(z\mid x)`, scored by their reverse kernels
    (:class:`~pyro_seqlatent.transforms.hamiltonian.LangevinFlow`; its docstring states the
    bound's bias and variance). The intermediate targets need :math:`\nabla\log q_0` at the
    moving point, which the wrapped site gives through its own ``log_prob`` (closed form for a
    mean-field site; a flow site inverts its flows).

    :param model: the model.
    :param guide: the wrapped guide (its site ``site`` is ``q_0``).
    :param int latent_dim: size of the site's vector.
    :param int steps: ``K``.
    :param float step_size: initial ``ε`` (learned per step and coordinate).
    :param bool anneal: learn the schedule ``b_1 < … < b_K = 1``.
    :param str site: the latent site.
    """

    def __init__(self, model: Callable, guide: Callable, latent_dim: int, steps: int = 4,
                 step_size: float = 0.01, anneal: bool = True, site: str = "z"):
        super().__init__(model, guide, LangevinFlow(latent_dim, steps, step_size, anneal), site)

    def mover(self, log_joint: Callable) -> Callable:
        def move(z0, base):
            create = torch.is_grad_enabled()
            return self.flow(z0, _gradient(log_joint, create),
                             _gradient(lambda z: base.log_prob(z).sum(), create))
        return move
