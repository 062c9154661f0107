r"""Autoguides for any Pyro model: :class:`AutoFlow` (global latents) and :class:`AutoAmortized`
(per-data-point latents from an encoder).

**AutoFlow.** All latent sites of the model are mapped to one unconstrained vector
:math:`u \in \mathbb R^D` (each through ``biject_to`` of its support, as Pyro's
``AutoContinuous`` does) and

.. math:: u_0 \sim \mathcal N(\mu, \operatorname{diag}\sigma^2),\qquad
          u = f_K \circ \dots \circ f_1(u_0),

with :math:`\mu` started at the model's initial values and :math:`f_k` any flow ``flow=`` names
(:mod:`pyro_seqlatent.transforms.foreign`: our kinds, ``"spline"``, a Pyro transform module, a
zuko flow whose own base replaces the Gaussian). It is a Pyro
:class:`~pyro.infer.autoguide.AutoGuide`: train it with ``pyro.infer.SVI`` or
:func:`pyro_seqlatent.infer.train`, draw with :class:`~pyro.infer.Predictive`, read
:meth:`AutoFlow.median` / :meth:`AutoFlow.quantiles` (Monte-Carlo, as a flow has no closed form).

**AutoAmortized.** The latent sites inside the data plate (one latent vector per data point,
found by a prototype trace) each get an amortized site guide
(:class:`~pyro_seqlatent.guides.MeanFieldGuide`, or :class:`~pyro_seqlatent.guides.FlowGuide`
with ``flow=``) whose context is ``encoder(*args, **kwargs)`` for that data point; latents
outside the plate get an ``AutoNormal`` or :class:`AutoFlow` part. Its scope is plate-local
sites whose only batch dimension is the data plate: a sequence model's per-step latents
(``z_t`` depending on ``z_{t-1}``) keep hand-written per-step site guides
(:class:`~pyro_seqlatent.guides.StepGroup`), and the global and local parts are independent in
``q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.contrib.zuko import ZukoToPyro
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous, AutoGuide, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import biject_to
from torch.distributions.transforms import ReshapeTransform

from pyro_seqlatent.guides.flow import FlowGuide
from pyro_seqlatent.guides.site import MeanFieldGuide
from pyro_seqlatent.transforms.foreign import build_flow, flow_name, is_zuko_flow

__all__ = ["AutoAmortized", "AutoFlow"]


def _discrete_error(guide: str, name: str, site: dict) -> ValueError:
    return ValueError(
        f"{guide}(model=...): latent site {name!r} is discrete "
        f"({type(site['fn']).__name__}); {guide} handles continuous latents only: enumerate it "
        "(config_enumerate + TraceEnum_ELBO, hiding it from this guide with "
        "poutine.block(model, hide=[...])) or use a different guide for it "
        "(e.g. AutoDiscreteParallel in an AutoGuideList)")


def _check_continuous(guide: str, trace) -> None:
    for name, site in trace.iter_stochastic_nodes():
        if site["fn"].support.is_discrete:
            raise _discrete_error(guide, name, site)


def _check_num_samples(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_quantile_samples must be an int >= 2, got {num_samples!r}")
    return num_samples


@contextmanager
def _fixed_seed(seed: int = 0):
    """Seed 0 inside, the global RNGs (CPU and the current CUDA device) restored after; nothing
    recorded by outer handlers."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), poutine.block():
        torch.manual_seed(seed)
        yield


class AutoFlow(AutoContinuous):
    """A flow posterior over all latent sites of ``model`` (see the module docstring).

    :param callable model: a Pyro model (function or module) with continuous latents.
    :param flow: the flow (:mod:`pyro_seqlatent.transforms.foreign`): a name of
        ``FLOW_NAMES`` (``"iaf"``, ``"spline"``, ``"planar"``, ...), a Pyro
        ``TransformModule`` on vectors of the latent size, a zuko flow (``features=D``), or a
        factory ``f(D)`` returning one (``D`` is known at the first call).
    :param int num_flows: number of flows of a named kind.
    :param hidden_dims: hidden layers of a named kind's networks (its default when ``None``).
    :param init_loc_fn: per-site initial values (Pyro's initialization strategies).
    :param float init_scale: initial standard deviation of the Gaussian base.
    :param int num_quantile_samples: draws behind :meth:`median` and :meth:`quantiles`.
    :param create_plates: as in Pyro's autoguides (subsampling plates).
    """

    def __init__(self, model: Callable, flow: Any = "iaf", num_flows: int = 2,
                 hidden_dims: Sequence[int] | None = None, init_loc_fn=init_to_median,
                 init_scale: float = 0.1, num_quantile_samples: int = 2000,
                 create_plates=None):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        if isinstance(flow, str):  # fail now, not at the first call
            build_flow(flow, 2, num_flows, hidden_dims)
        num_quantile_samples = _check_num_samples(num_quantile_samples)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates
        self._flow_arg = (flow,)  # a tuple: a module given here is registered as .flows only
        self._num_flows = num_flows
        self._hidden_dims = hidden_dims
        self._init_scale = float(init_scale)
        self.num_quantile_samples = num_quantile_samples
        self.flow = flow_name(flow)
        self.is_zuko = False

    def _setup_prototype(self, *args, **kwargs):
        AutoGuide._setup_prototype(self, *args, **kwargs)
        _check_continuous(type(self).__name__, self.prototype_trace)
        super()._setup_prototype(*args, **kwargs)
        if self.latent_dim < 2 and isinstance(self._flow_arg[0], str):
            raise ValueError(f"AutoFlow(flow={self._flow_arg[0]!r}): the model's latents make a "
                             "vector of size 1 and the named flows need 2 or more dimensions; "
                             "use pyro.infer.autoguide.AutoNormal for a single scalar")
        init = self._init_loc().detach()
        flows = build_flow(self._flow_arg[0], self.latent_dim, self._num_flows, self._hidden_dims)
        self.is_zuko = is_zuko_flow(flows)
        if isinstance(flows, nn.Module):
            flows = flows.to(device=init.device, dtype=init.dtype)
        self.flows = flows
        if not self.is_zuko:
            self.loc = nn.Parameter(init)
            self.scale = PyroParam(torch.full_like(init, self._init_scale),
                                   constraints.softplus_positive)
        self._check_flow_size()

    def _check_flow_size(self) -> None:
        names = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
        problem = (f"but the model's latent sites {names} make an unconstrained vector of size "
                   f"{self.latent_dim}")
        try:
            with torch.no_grad(), poutine.block():
                shape = self.get_posterior()(torch.Size([2])).shape
        except RuntimeError as err:  # a module built for another size fails on the draw
            raise ValueError(f"flow={self.flow} fails on a draw ({err}), {problem}") from err
        if shape != (2, self.latent_dim):
            raise ValueError(f"flow={self.flow} draws vectors of shape {tuple(shape[1:])}, "
                             + problem)

    @property
    def transform(self):
        """The flows ``f_K ∘ … ∘ f_1`` (a Pyro transform module), or the zuko flow."""
        return getattr(self, "flows", None)

    def get_base_dist(self) -> dist.Distribution:
        """``N(μ, diag σ²)`` (not for a zuko flow: its base is its own)."""
        if self.is_zuko:
            raise TypeError("this AutoFlow's flow is a zuko flow, with its own base distribution")
        return dist.Normal(self.loc, self.scale).to_event(1)

    def get_transform(self, *args, **kwargs):
        return self.flows

    def get_posterior(self, *args, **kwargs) -> dist.Distribution:
        """The distribution of the unconstrained latent vector."""
        if self.is_zuko:
            return ZukoToPyro(self.flows())
        return dist.TransformedDistribution(self.get_base_dist(), [self.flows])

    @torch.no_grad()
    def _draws(self, *args, **kwargs) -> torch.Tensor:
        """``num_quantile_samples`` unconstrained draws, the same each call (a fixed seed, the
        global RNG left as it was)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        with _fixed_seed():
            return self.get_posterior(*args, **kwargs)(torch.Size([self.num_quantile_samples]))

    def _constrain(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        return {site["name"]: biject_to(site["fn"].support)(value)
                for site, value in self._unpack_latent(latent)}

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The per-coordinate median of the unconstrained latent vector (Monte-Carlo over
        ``num_quantile_samples`` draws), mapped to each site's support."""
        return self._constrain(self._draws(*args, **kwargs).median(dim=0).values)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Per-coordinate quantiles (Monte-Carlo, as :meth:`median`), stacked along a new left
        dimension as in Pyro's autoguides: ``guide.quantiles([0.05, 0.5, 0.95])``."""
        draws = self._draws(*args, **kwargs)
        q = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device)
        if q.dim() != 1 or not bool(((q >= 0) & (q <= 1)).all()):
            raise ValueError(f"quantiles must be a list of numbers in [0, 1], got {quantiles!r}")
        latents = torch.quantile(draws, q, dim=0)
        result: dict[str, list[torch.Tensor]] = {}
        for latent in latents:
            for name, value in self._constrain(latent).items():
                result.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in result.items()}


def _default_global_guide(kind: Any, flow: Any, num_flows: int) -> Callable:
    if callable(kind):
        return kind
    if kind == "normal":
        return AutoNormal
    if kind == "flow":
        return lambda model: AutoFlow(model, flow="iaf" if flow is None else flow,
                                      num_flows=num_flows)
    raise ValueError(f"global_guide must be 'normal', 'flow' or a callable model -> AutoGuide, "
                     f"got {kind!r}")


class AutoAmortized(AutoGuide):
    """Amortized site guides for the latents inside the data plate, an autoguide for the rest
    (see the module docstring for the scope).

    :param callable model: a Pyro model whose per-data-point latents lie in the plate ``plate``
        (one latent vector per data point: the plate is the site's only batch dimension).
    :param nn.Module encoder: called as ``encoder(*args, **kwargs)`` with the model's arguments,
        it returns the context, of shape ``(batch, context_dim)``, one row per data point.
    :param flow: ``None`` for mean-field Gaussians, or the flow of every local site's
        :class:`~pyro_seqlatent.guides.FlowGuide` (a name, a factory
        ``f(latent_dim, context_dim)``, or, with one local site, a conditional module / zuko
        flow).
    :param int num_flows: number of flows of a named kind.
    :param hidden_dims: hidden layers of each site guide's network from context to ``(μ, σ)``.
    :param flow_hidden_dims: hidden layers of the flows' networks.
    :param str plate: the name of the data plate.
    :param global_guide: the guide of the latents outside the plate: ``"normal"``
        (``AutoNormal``), ``"flow"`` (:class:`AutoFlow` with ``flow``, or IAF), or a callable
        ``f(model) -> AutoGuide``, given the model with the local sites hidden.
    :param create_plates: as in Pyro's autoguides; by default the data plate is rebuilt at each
        call from the context's batch size (its full size kept where the model subsamples).
    """

    def __init__(self, model: Callable, encoder: nn.Module, *, flow: Any = None,
                 num_flows: int = 2, hidden_dims: Sequence[int] = (),
                 flow_hidden_dims: Sequence[int] | None = None, plate: str = "data",
                 global_guide: Any = "normal", create_plates=None):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module (its parameters are trained), got "
                            f"{type(encoder).__name__}")
        if not isinstance(plate, str) or not plate:
            raise TypeError(f"plate must be the data plate's name, got {plate!r}")
        if isinstance(flow, str):
            build_flow(flow, 2, num_flows)  # an unknown name fails now
        global_factory = _default_global_guide(global_guide, flow, num_flows)
        super().__init__(model, create_plates=create_plates)
        self._global_factory = global_factory
        self.encoder = encoder
        self._flow = (flow,)  # a tuple: a module given here is registered by its site guide only
        self.num_flows = num_flows
        self.hidden_dims, self.flow_hidden_dims = tuple(hidden_dims), flow_hidden_dims
        self.plate_name = plate
        self.local_names: list[str] = []
        self.global_names: list[str] = []
        self.global_guide = None

    # -- set-up ------------------------------------------------------------------------------

    def _check_prototype(self, part_trace) -> None:
        """Called by the global part's own set-up: it must see exactly the global sites."""
        names = [name for name, _ in part_trace.iter_stochastic_nodes()]
        if sorted(names) != sorted(self.global_names):
            raise RuntimeError(f"the global guide saw sites {names}, expected "
                               f"{self.global_names}")

    def _local_shape(self, name: str, site: dict) -> torch.Size:
        fn = site["fn"]
        frame = next(f for f in site["cond_indep_stack"] if f.name == self.plate_name)
        batch_shape = torch.Size(fn.batch_shape)
        while batch_shape and batch_shape[0] == 1:
            batch_shape = batch_shape[1:]
        if batch_shape != (frame.size,) or frame.dim != -1:
            raise ValueError(
                f"AutoAmortized(model=...): site {name!r} in plate {self.plate_name!r} has batch "
                f"shape {tuple(fn.batch_shape)} (plate at dim {frame.dim}); it handles sites "
                "whose only batch dimension is the data plate at dim -1 (one latent vector per "
                "data point, extra dimensions in the event: .to_event()); write a site guide "
                "for this one")
        value = site["value"]
        unconstrained = biject_to(fn.support).inv(value)
        return unconstrained.shape[unconstrained.dim() - (len(fn.event_shape)
                                                          + unconstrained.dim() - value.dim()):]

    def _site_guide(self, context_dim: int, latent_dim: int) -> nn.Module:
        flow = self._flow[0]
        if flow is None:
            return MeanFieldGuide(context_dim, latent_dim, self.hidden_dims)
        if isinstance(flow, nn.Module) and len(self.local_names) > 1:
            raise ValueError(f"flow={flow_name(flow)} is one module but the model has "
                             f"{len(self.local_names)} local sites {self.local_names}: pass a "
                             "name or a factory f(latent_dim, context_dim)")
        return FlowGuide(context_dim, latent_dim, flow, self.num_flows, self.hidden_dims,
                         self.flow_hidden_dims)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        _check_continuous(type(self).__name__, self.prototype_trace)
        local, global_ = [], []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            frames = {f.name for f in site["cond_indep_stack"]}
            (local if self.plate_name in frames else global_).append(name)
        if not local:
            raise ValueError(f"AutoAmortized(plate={self.plate_name!r}): the model has no latent "
                             f"site inside a plate named {self.plate_name!r} (its latents: "
                             f"{global_}); pass the data plate's name or use AutoFlow")
        self.local_names, self.global_names = local, global_
        with torch.no_grad():
            context = self.encoder(*args, **kwargs)
        if not torch.is_tensor(context) or context.dim() < 2:
            raise ValueError("encoder(*args) must return a tensor of shape (batch, context_dim), "
                             f"got {getattr(context, 'shape', type(context).__name__)}")
        self._shapes, guides = {}, []
        for name in local:
            site = self.prototype_trace.nodes[name]
            shape = self._local_shape(name, site)
            if context.shape[-2] != site["fn"].batch_shape[-1]:
                raise ValueError(
                    f"encoder(*args) gives {context.shape[-2]} rows but the plate "
                    f"{self.plate_name!r} of site {name!r} has {site['fn'].batch_shape[-1]} "
                    "data points: the encoder must return one context row per data point")
            self._shapes[name] = shape
            guides.append(self._site_guide(context.shape[-1], max(1, math.prod(shape))))
        self.local_guides = nn.ModuleList(guides).to(device=context.device, dtype=context.dtype)
        if global_:
            self.global_guide = self._global_factory(poutine.block(self.model, hide=local))
            self.global_guide._setup_prototype(*args, **kwargs)

    def _create_plates(self, *args, **kwargs):
        if self.create_plates is not None or self.master is not None:
            return super()._create_plates(*args, **kwargs)
        self.plates = {}
        for name, frame in sorted(self._prototype_frames.items()):
            full_size = frame.full_size or frame.size
            if name != self.plate_name:
                self.plates[name] = pyro.plate(name, full_size, dim=frame.dim,
                                               subsample_size=frame.size)
            elif full_size != frame.size:  # the model subsamples: keep its full size (scale)
                self.plates[name] = pyro.plate(
                    name, full_size, dim=frame.dim,
                    subsample=torch.arange(self._context_batch, device=self._context_device))
            else:  # the batch is the plate: its size is this call's
                self.plates[name] = pyro.plate(name, self._context_batch, dim=frame.dim)
        return self.plates

    # -- the guide ---------------------------------------------------------------------------

    def _site_distribution(self, name: str, guide: nn.Module, context: torch.Tensor):
        q = guide(context)
        site = self.prototype_trace.nodes[name]
        support = site["fn"].support
        shape = self._shapes[name]
        transforms = []
        if shape != (guide.latent_dim,):
            transforms.append(ReshapeTransform((guide.latent_dim,), shape))
        if support is not constraints.real and not (
                isinstance(support, constraints.independent)
                and support.base_constraint is constraints.real):
            transforms.append(biject_to(support))
        return dist.TransformedDistribution(q, transforms) if transforms else q

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draws every latent site of the model; returns ``{name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        context = self.encoder(*args, **kwargs)
        self._context_batch, self._context_device = context.shape[-2], context.device
        plates = self._create_plates(*args, **kwargs)
        result = {}
        if self.global_guide is not None:
            result.update(self.global_guide(*args, **kwargs))
        for name, guide in zip(self.local_names, self.local_guides):
            with ExitStack() as stack:
                for frame in self.prototype_trace.nodes[name]["cond_indep_stack"]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, self._site_distribution(name, guide, context))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The global part's medians and, for each local site, the per-coordinate median of 1001
        draws of its site guide (a fixed seed; the global RNG is left as it was)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = dict(self.global_guide.median(*args, **kwargs)) if self.global_guide else {}
        context = self.encoder(*args, **kwargs)
        for name, guide in zip(self.local_names, self.local_guides):
            q = self._site_distribution(name, guide, context)
            with _fixed_seed():
                result[name] = q(torch.Size([1001])).median(dim=0).values
        return result

