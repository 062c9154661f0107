r"""The variational recurrent neural network (VRNN, Chung et al. 2015) as a Pyro model/guide pair.

For a sequence :math:`x_{1:T}` with latents :math:`z_{1:T}` and deterministic RNN states
:math:`h_t` (:math:`h_0 = 0`):

.. math::
    p(z_t \mid h_{t-1}) &= \mathcal N(\mu_{0,t}, \operatorname{diag}\sigma_{0,t}^2),
        \quad [\mu_{0,t}, \sigma_{0,t}] = \varphi^{\rm prior}(h_{t-1})
        \quad(\text{VRNN-I: } \mathcal N(0, I)) \\
    p(x_t \mid z_t, h_{t-1}) &= \text{emission}\bigl(\varphi^{\rm dec}
        ([\varphi^{z}(z_t), h_{t-1}])\bigr) \quad(\text{Bernoulli, Gaussian or K-GMM}) \\
    h_t &= f\bigl([\varphi^{x}(x_t), \varphi^{z}(z_t)], h_{t-1}\bigr)
        \quad(f = \text{GRU or LSTM cell}) \\
    q(z_t \mid x_{\le t}, z_{<t}) &= q\bigl(z_t \mid [\varphi^{x}(x_t), h_{t-1}]\bigr)
        \quad(\text{diagonal Gaussian, or any } \texttt{SiteGuide}\text{, e.g. FlowGuide IAFs})

**Smoothing guide** (``smoothing=True``): :math:`q(z_t \mid [\varphi^x(x_t), h_{t-1}, a_t])`
with :math:`a_t = \overleftarrow{\mathrm{GRU}}(\varphi^x(x_T), \dots, \varphi^x(x_t))` run
backwards from each sequence's own last step, so :math:`q(z_t)` sees :math:`x_{t:T}` (the
structured guides of Krishnan et al. 2017 and Fraccaro et al. 2016); the model is unchanged.

and the ELBO :math:`\sum_t m_t\,\mathbb E_q[\log p(x_t\mid z_t,h_{t-1})
- \mathrm{KL}(q(z_t\mid\cdot)\,\|\,p(z_t\mid h_{t-1}))]`, where the mask :math:`m_t` removes padded
steps from both the reconstruction and the KL.

**Dropout** (``dropout=p > 0``, off by default and in eval mode): on the features
:math:`\varphi^x(x_t)` (computed once by the guide and handed to the model, so model, guide and
recurrence see the same mask) and on the decoder input :math:`[\varphi^z(z_t), h_{t-1}]`; not
on the recurrent state. Training then maximises the ELBO averaged over dropout masks (with
vectorized particles the φ_x mask is shared by the particles of a sequence, the decoder's is
not); held-out scores (:func:`~pyro_seqlatent.infer.evaluate`, validation in
:func:`~pyro_seqlatent.infer.train`) and :func:`forecast` run in eval mode. The naive model
(``reuse_guide_states=False``) draws its own φ_x mask: a valid bound, but not the same
estimator once ``dropout > 0``.

Pyro structure: both :class:`VRNNModel` and :class:`VRNNGuide` sample ``z_t`` as site
``"z_{t}"`` in ``for t in pyro.markov(range(T))`` inside the batch plate ``"data"`` (dim -1).
The observed frames are one site ``"x"`` (batch ``(B,)``, the time axis folded into the event
with its mask), scored after the loop in one batched call: given :math:`z_{1:T}` and
:math:`h_{0:T-1}` the :math:`x_t` are independent.

**No double recurrence.** :math:`h_{t-1}` depends on :math:`z_{<t}`, so a naive model re-runs the
RNN that the guide already ran. Here the guide leaves its states in a cache on the shared
:class:`VRNNCore`; the model, at step ``t``, checks that the ``z_t`` it received *is* the guide's
tensor (``poutine.replay`` passes the same object) and if so reuses the guide's
:math:`h_{t-1}`, :math:`\varphi^z(z_t)`; the prior network and the decoder then run once on all
steps. When a ``z_t`` is not the guide's (the model runs alone, or a site was conditioned) the
model recomputes the recurrence from that step on, so it still generates from the prior alone.

Particles: every tensor broadcasts over extra leftmost dims (``vectorize_particles=True``,
:func:`pyro_seqlatent.infer.log_marginal`); hidden states are never sized by ``x.shape[0]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_seqlatent.data.sequences import check_padded_batch, pad_collate
from pyro_seqlatent.guides import FlowGuide, MeanFieldGuide, SiteGuide, StepGroup
from pyro_seqlatent.nn import MLP

EMISSIONS = ("bernoulli", "gaussian", "gmm")


# ----------------------------------------------------------------------------------------------
# Emission heads: features -> p(x_t | .) with event_dim 1 over the D features
# ----------------------------------------------------------------------------------------------
class BernoulliEmission(nn.Module):
    r""":math:`p(x \mid u) = \prod_d \mathrm{Bernoulli}(x_d; \sigma(\ell_d(u)))` (piano rolls)."""

    def __init__(self, input_dim: int, x_dim: int, hidden_dims: Sequence[int] = ()):
        super().__init__()
        self.net = MLP(input_dim, hidden_dims, x_dim)

    def forward(self, u: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=self.net(u)).to_event(1)


class GaussianEmission(nn.Module):
    r""":math:`p(x \mid u) = \mathcal N(x; \mu(u), \operatorname{diag}\sigma(u)^2)`,
    :math:`\sigma = \operatorname{softplus}(\cdot) + \sigma_{\min}`."""

    def __init__(self, input_dim: int, x_dim: int, hidden_dims: Sequence[int] = (),
                 min_scale: float = 1e-3):
        super().__init__()
        self.net = MLP(input_dim, hidden_dims, 2 * x_dim)
        self.min_scale = float(min_scale)

    def forward(self, u: torch.Tensor) -> dist.Distribution:
        loc, raw = self.net(u).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + self.min_scale).to_event(1)


class GMMEmission(nn.Module):
    r"""K-component diagonal Gaussian mixture,

    .. math:: \log p(x\mid u) = \operatorname{logsumexp}_k\Bigl[\log\pi_k(u)
              + \sum_d \log\mathcal N(x_d; \mu_{kd}(u), \sigma_{kd}(u)^2)\Bigr],

    :math:`\sigma = \operatorname{softplus}(\cdot) + \sigma_{\min}` (the variance floor); never
    :math:`\sum_k \pi_k \log\mathcal N`. Implemented with ``MixtureSameFamily`` (logsumexp).
    """

    def __init__(self, input_dim: int, x_dim: int, hidden_dims: Sequence[int] = (),
                 num_components: int = 20, min_scale: float = 1e-3):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.k, self.d = int(num_components), int(x_dim)
        self.net = MLP(input_dim, hidden_dims, self.k * (1 + 2 * self.d))
        self.min_scale = float(min_scale)

    def forward(self, u: torch.Tensor) -> dist.Distribution:
        out = self.net(u)
        logits = out[..., : self.k]
        loc, raw = out[..., self.k :].unflatten(-1, (self.k, 2 * self.d)).chunk(2, dim=-1)
        comps = dist.Normal(loc, F.softplus(raw) + self.min_scale).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), comps)


def make_emission(kind: str, input_dim: int, x_dim: int, hidden_dims: Sequence[int] = (),
                  num_components: int = 20, min_scale: float = 1e-3) -> nn.Module:
    """An emission head by name: ``"bernoulli"``, ``"gaussian"`` or ``"gmm"``."""
    if kind == "bernoulli":
        return BernoulliEmission(input_dim, x_dim, hidden_dims)
    if kind == "gaussian":
        return GaussianEmission(input_dim, x_dim, hidden_dims, min_scale)
    if kind == "gmm":
        return GMMEmission(input_dim, x_dim, hidden_dims, num_components, min_scale)
    raise ValueError(f"emission must be one of {EMISSIONS}, got {kind!r}")


def check_sequences(x: torch.Tensor, mask: torch.Tensor | None, x_dim: int, owner: str,
                    binary: bool = False) -> torch.Tensor:
    """Validate a padded batch as the VRNN family's models and guides all do, and return its
    bool mask: :func:`~pyro_seqlatent.data.sequences.check_padded_batch` (shape, mask, NaN/inf
    at unmasked steps), a floating dtype, and with ``binary`` (a Bernoulli emission) values 0
    and 1 only at the unmasked steps. ``ValueError``/``TypeError`` naming ``x`` and the fix."""
    if torch.is_tensor(x) and not x.is_floating_point():
        raise TypeError(f"{owner}: x has dtype {x.dtype}; the model scores float tensors: "
                        "convert the sequences with x.float() (or build a SequenceDataset, "
                        "which does)")
    mask = check_padded_batch(x, mask, x_dim, owner)
    # x (x - 1) is 0 exactly at 0 and 1; padded steps may hold anything (NaN included)
    if binary and bool(torch.count_nonzero(torch.where(mask.unsqueeze(-1), x * (x - 1), 0.0))):
        raise ValueError(f"{owner}: x must be binary (0/1) at unmasked steps for the Bernoulli "
                         "emission; binarize the data or use emission='gaussian' or 'gmm'")
    return mask


# ----------------------------------------------------------------------------------------------
# Small helpers: broadcasting concatenation and RNN cells on any leading shape
# ----------------------------------------------------------------------------------------------
def cat_broadcast(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting all leading dims."""
    lead = tensors[0].shape[:-1]
    if all(t.shape[:-1] == lead for t in tensors):
        return torch.cat(tensors, dim=-1)
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], dim=-1)


class RecurrentCell(nn.Module):
    """``state_t = cell(input_t, state_{t-1})`` for GRU (state ``h``) or LSTM (state ``(h, c)``),
    on inputs with any leading shape (flattened for ``nn.GRUCell`` / ``nn.LSTMCell``)."""

    def __init__(self, kind: str, input_dim: int, hidden_dim: int):
        super().__init__()
        if kind not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {kind!r}")
        self.kind = kind
        self.hidden_dim = int(hidden_dim)
        cls = nn.GRUCell if kind == "gru" else nn.LSTMCell
        self.cell = cls(input_dim, hidden_dim)

    def initial_state(self, leading: torch.Size, ref: torch.Tensor):
        h = ref.new_zeros(tuple(leading) + (self.hidden_dim,))
        return h if self.kind == "gru" else (h, h)

    @staticmethod
    def hidden(state) -> torch.Tensor:
        return state if torch.is_tensor(state) else state[0]

    def forward(self, inp: torch.Tensor, state):
        parts = (state,) if self.kind == "gru" else state
        if inp.dim() == 2 and all(p.shape[:-1] == inp.shape[:-1] for p in parts):
            return self.cell(inp, state)  # the common case: no particle dims
        shape = torch.broadcast_shapes(inp.shape[:-1], *(p.shape[:-1] for p in parts))
        flat_in = inp.expand(shape + inp.shape[-1:]).reshape(-1, inp.shape[-1])
        flat = [p.expand(shape + p.shape[-1:]).reshape(-1, self.hidden_dim) for p in parts]
        if self.kind == "gru":
            return self.cell(flat_in, flat[0]).reshape(shape + (self.hidden_dim,))
        h, c = self.cell(flat_in, tuple(flat))
        return h.reshape(shape + (self.hidden_dim,)), c.reshape(shape + (self.hidden_dim,))


def make_dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` at ``p = 0`` (no mask drawn: default runs use the
    random numbers exactly as without the option)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return nn.Dropout(float(p)) if p > 0 else nn.Identity()


def feature_net(input_dim: int, hidden_dims: Sequence[int], output_dim: int) -> nn.Module:
    """φ feature extractor: an MLP followed by a ReLU (as the VRNN paper's φ_x, φ_z)."""
    return nn.Sequential(MLP(input_dim, hidden_dims, output_dim), nn.ReLU())


# ----------------------------------------------------------------------------------------------
# The VRNN
# ----------------------------------------------------------------------------------------------
#: the VRNN's sizes, the one place for them: :class:`VRNNCore` and :func:`build_vrnn` take them
#: as defaults and the registered ``vrnn`` as its options' defaults. They are the sizes of
#: ``docs/vrnn.md``'s regularised JSB rows (z 16, h = feature = hidden = 64: +27 ± 2.5 nats per
#: chorale over z 32, 128-wide nets, and every better row of that table kept them; see the
#: "Defaults" section there)
NETWORK_DEFAULTS = {"z_dim": 16, "h_dim": 64, "feature_dim": 64, "hidden_dim": 64}
#: the registered ``vrnn``'s training settings: KL annealing from 0.1 over 8,000 steps and
#: Polyak averaging 0.999, the recipe of the best JSB rows of ``docs/vrnn.md`` (without their
#: weight decay, which cost FSDD hundreds of nats per sequence)
TRAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 20, "clip_norm": 10.0, "kl_anneal_steps": 8000,
                  "kl_anneal_start": 0.1, "ema_decay": 0.999}

@dataclass
class _GuideStates:
    """What the guide leaves for the model: its inputs (by identity) and its recurrence."""

    x: torch.Tensor
    z: list  # z_t tensors sampled by the guide
    states: list  # RNN state before step t (t = 0..T-1)
    final_state: object  # RNN state after the last step
    h_prev: torch.Tensor  # (..., B, T, H): h_{t-1}
    phi_z: torch.Tensor  # (..., B, T, F): φ_z(z_t)
    phi_x: torch.Tensor  # (B, T, F): φ_x(x_t) after dropout (the guide's mask)


class VRNNCore(nn.Module):
    r"""The networks shared by model and guide: :math:`\varphi^x, \varphi^z`, the prior, the
    decoder/emission and the recurrence :math:`f`.

    :param int x_dim: features per step :math:`D`.
    :param int z_dim: latent size per step.
    :param int h_dim: RNN state size.
    :param int feature_dim: output size of :math:`\varphi^x` and :math:`\varphi^z`.
    :param int hidden_dim: width of the hidden layers of every MLP.
    :param int num_layers: hidden layers per MLP.
    :param str rnn: ``"gru"`` or ``"lstm"``.
    :param str emission: ``"bernoulli"``, ``"gaussian"`` or ``"gmm"``.
    :param int num_components: mixture components (``"gmm"``).
    :param str prior: ``"learned"`` (VRNN) or ``"standard"`` (VRNN-I, :math:`\mathcal N(0,I)`).
    :param float min_scale: floor added to every standard deviation.
    :param float dropout: dropout probability on :math:`\varphi^x(x_t)` and on the decoder
        input (train mode only; see the module docstring).
    :param bool decoder_h: the decoder reads :math:`[\varphi^z(z_t), h_{t-1}]` (the VRNN,
        default); ``False``:
        :math:`p(x_t\mid z_t) = \text{emission}(\varphi^{dec}(\varphi^z(z_t)))`, so
        everything the emission knows of the past reaches it through :math:`z_t` and its prior
        :math:`p(z_t\mid h_{t-1})`, as in a deep Markov model's emission (a regulariser: the
        deterministic path from :math:`h_{t-1}` to :math:`x_t` is cut).
    """

    def __init__(self, x_dim: int, z_dim: int = NETWORK_DEFAULTS["z_dim"],
                 h_dim: int = NETWORK_DEFAULTS["h_dim"],
                 feature_dim: int = NETWORK_DEFAULTS["feature_dim"],
                 hidden_dim: int = NETWORK_DEFAULTS["hidden_dim"], num_layers: int = 1,
                 rnn: str = "gru",
                 emission: str = "bernoulli", num_components: int = 20,
                 prior: str = "learned", min_scale: float = 1e-3, dropout: float = 0.0,
                 decoder_h: bool = True):
        super().__init__()
        for name, value in (("x_dim", x_dim), ("z_dim", z_dim), ("h_dim", h_dim),
                            ("feature_dim", feature_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if prior not in ("learned", "standard"):
            raise ValueError(
                f"prior must be 'learned' (VRNN) or 'standard' (VRNN-I), got {prior!r}"
            )
        self.x_dim, self.z_dim, self.h_dim, self.feature_dim = x_dim, z_dim, h_dim, feature_dim
        self.emission_kind, self.prior_kind = emission, prior
        self.min_scale = float(min_scale)
        hidden = (hidden_dim,) * num_layers
        self.phi_x = feature_net(x_dim, hidden, feature_dim)
        self.phi_z = feature_net(z_dim, hidden, feature_dim)
        self.prior_net = MLP(h_dim, hidden, 2 * z_dim) if prior == "learned" else None
        if not isinstance(decoder_h, bool):
            raise ValueError(f"decoder_h must be True or False, got {decoder_h!r}")
        self.decoder_h = decoder_h
        decoder_in = feature_dim + (h_dim if decoder_h else 0)
        self.emission = make_emission(emission, decoder_in, x_dim, hidden, num_components,
                                      min_scale)
        self.rnn = RecurrentCell(rnn, 2 * feature_dim, h_dim)
        self.dropout = make_dropout(dropout)
        self._guide_states: _GuideStates | None = None
        #: reuse the guide's recurrence in the model (False: the naive VRNN that runs it twice;
        #: equal values and gradients at dropout 0, its own φ_x dropout mask otherwise)
        self.reuse_guide_states = True

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`(\\mu_0, \\sigma_0)` of :math:`p(z_t\\mid h_{t-1})` for ``h`` of shape
        ``(..., H)``."""
        if self.prior_net is None:
            zeros = h.new_zeros(h.shape[:-1] + (self.z_dim,))
            return zeros, zeros + 1.0
        loc, raw = self.prior_net(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale

    def features_x(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\varphi^x(x)` after dropout, for ``x`` of shape ``(..., D)``."""
        return self.dropout(self.phi_x(x))

    def emission_dist(self, phi_z: torch.Tensor, h_prev: torch.Tensor) -> dist.Distribution:
        """:math:`p(x_t \\mid z_t, h_{t-1})` from :math:`[\\varphi^z(z_t), h_{t-1}]` (after
        dropout); from :math:`\\varphi^z(z_t)` alone with ``decoder_h=False``."""
        if not self.decoder_h:  # p(x_t | z_t): the past reaches x_t only through z_t
            return self.emission(self.dropout(phi_z))
        return self.emission(self.dropout(cat_broadcast(phi_z, h_prev)))

    def step(self, phi_x_t: torch.Tensor, phi_z_t: torch.Tensor, state):
        """:math:`h_t = f([\\varphi^x(x_t), \\varphi^z(z_t)], h_{t-1})`."""
        return self.rnn(cat_broadcast(phi_x_t, phi_z_t), state)

    def stash(self, states: _GuideStates) -> None:
        self._guide_states = states

    def take_guide_states(self, x: torch.Tensor) -> _GuideStates | None:
        """The guide's states if they were computed for this very ``x`` (then forgotten)."""
        states, self._guide_states = self._guide_states, None
        if states is None or states.x is not x or not self.reuse_guide_states:
            return None
        return states


def _stack(tensors: list, dim: int = -2) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return torch.stack([t.expand(shape) for t in tensors], dim=dim)


def _step_masks(mask: torch.Tensor) -> list:
    """Per-step masks ``mask[:, t]``, or None where every sequence is observed at step t."""
    full = mask.all(0).tolist()
    return [None if f else m for f, m in zip(full, mask.unbind(-1))]


def _masked(d: dist.Distribution, m: torch.Tensor | None) -> dist.Distribution:
    return d if m is None else d.mask(m)


def _clean(x: torch.Tensor, mask: torch.Tensor, step_mask: list) -> torch.Tensor:
    """``x`` with padded entries set to 0, so padded values cannot reach any term; ``x`` itself
    when no step is padded (``step_mask`` from :func:`_step_masks`: all None)."""
    if all(m is None for m in step_mask):
        return x
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


class VRNNModel(nn.Module):
    r"""The generative model :math:`p(x_{1:T}, z_{1:T})` (see the module docstring).

    ``model(x, mask)`` scores a padded batch ``x`` of shape ``(B, T, D)`` with bool ``mask``
    ``(B, T)``; ``model(x, mask, horizon=H)`` then continues every sequence for ``H`` steps
    (sites ``"z_{t}"``, ``"x_{t}"``); ``model(length=T, num_sequences=N)`` generates from the
    prior alone. Returns the full ``(..., B, T + H, D)`` sequence.

    :param register_params: call ``pyro.module`` in ``forward`` (needed only for
        ``pyro.infer.SVI``; :func:`pyro_seqlatent.infer.train` reads ``.parameters()``).
    """

    #: how to batch a dataset of ``(T_i, D)`` sequences (``train`` uses it when given none)
    collate_fn = staticmethod(pad_collate)

    def __init__(self, core: VRNNCore, register_params: bool = False):
        super().__init__()
        self.core = core
        self.register_params = register_params

    def forward(self, x: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                horizon: int = 0, length: int | None = None,
                num_sequences: int | None = None) -> torch.Tensor:
        core = self.core
        if self.register_params:
            pyro.module("vrnn", core)
        if x is None:
            if length is None or num_sequences is None:
                raise ValueError("without x, give length=T and num_sequences=N to generate")
            ref = next(core.parameters())
            with pyro.plate("data", int(num_sequences), dim=-1):
                state = core.rnn.initial_state((int(num_sequences),), ref)
                return self._generate(state, 0, int(length), [])
        mask = check_sequences(x, mask, core.x_dim, "VRNNModel",
                               core.emission_kind == "bernoulli")
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        with pyro.plate("data", x.shape[0], dim=-1):
            state, x_clean = self._observe(x, mask)
            if horizon == 0:
                return x_clean
            return self._generate(state, x.shape[1], horizon, [x_clean])

    def _observe(self, x: torch.Tensor, mask: torch.Tensor):
        core = self.core
        T = x.shape[1]
        step_mask = _step_masks(mask)
        x_clean = _clean(x, mask, step_mask)
        cached = core.take_guide_states(x)
        reusing = cached is not None
        if reusing:  # prior of every step in one call, from the guide's h_{t-1}
            loc_all, scale_all = core.prior_params(cached.h_prev)
            prior_loc, prior_scale = loc_all.unbind(-2), scale_all.unbind(-2)
            steps = StepGroup(loc_all, scale_all, values=cached.z)  # log p(z_t | h) in one call
        else:
            phi_x = core.features_x(x_clean).unbind(-2)
            state = core.rnn.initial_state(x.shape[:1], x)
        h_prev, phi_z = [], []
        for t in pyro.markov(range(T)):
            if reusing:
                prior = steps.member(prior_loc[t], prior_scale[t], index=t)
            else:
                prior = dist.Normal(*core.prior_params(core.rnn.hidden(state))).to_event(1)
            z = pyro.sample(f"z_{t}", _masked(prior, step_mask[t]))
            if reusing:
                if z is cached.z[t]:
                    continue
                # z_t is not the guide's: recompute the recurrence from step t on
                reusing = False
                phi_x = cached.phi_x.unbind(-2)  # the guide's features (and dropout mask)
                state = cached.states[t]
                h_prev = list(cached.h_prev.unbind(-2)[:t])
                phi_z = list(cached.phi_z.unbind(-2)[:t])
            h_prev.append(core.rnn.hidden(state))
            phi_z.append(core.phi_z(z))
            state = core.step(phi_x[t], phi_z[-1], state)
        if reusing:
            h_all, phi_z_all, state = cached.h_prev, cached.phi_z, cached.final_state
        else:
            h_all, phi_z_all = _stack(h_prev), _stack(phi_z)
        emission = core.emission_dist(phi_z_all, h_all)  # batch (..., B, T)
        full = all(m is None for m in step_mask)
        pyro.sample("x", _masked(emission, None if full else mask).to_event(1), obs=x_clean)
        return state, x_clean

    def _generate(self, state, start: int, steps: int, parts: list) -> torch.Tensor:
        core = self.core
        xs = []
        for t in pyro.markov(range(start, start + steps)):
            h = core.rnn.hidden(state)
            loc, scale = core.prior_params(h)
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
            phi_z = core.phi_z(z)
            x_t = pyro.sample(f"x_{t}", core.emission_dist(phi_z, h))
            xs.append(x_t)
            state = core.step(core.features_x(x_t), phi_z, state)
        generated = _stack(xs)
        if not parts:
            return generated
        shape = torch.broadcast_shapes(parts[0].shape[:-2], generated.shape[:-2])
        return torch.cat([p.expand(shape + p.shape[-2:]) for p in (*parts, generated)], dim=-2)


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, F) with each sequence's first ``lengths[b]`` steps in reverse order and its
    padding left in place (an involution: applying it twice gives ``x`` back)."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, T)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class VRNNGuide(nn.Module):
    r"""The filtering guide :math:`q(z_t \mid [\varphi^x(x_t), h_{t-1}])`, one site per step,
    or with ``smoothing=True`` :math:`q(z_t \mid [\varphi^x(x_t), h_{t-1}, a_t])` where
    :math:`a_t` is a backward GRU state that has read :math:`x_{t:T}` of the same sequence.

    :param core: the :class:`VRNNCore` shared with the model.
    :param site_guide: a :class:`~pyro_seqlatent.guides.site.SiteGuide` with
        ``context_dim = feature_dim + h_dim`` (``+ h_dim`` with ``smoothing``) and
        ``latent_dim = z_dim`` (default: a mean-field Gaussian with one hidden layer); e.g.
        ``FlowGuide(..., flow="iaf")`` for IAFs per step.
    :param bool smoothing: add the backward GRU (its state size is ``h_dim``). Sequences must
        be padded at the end only (a mask that is a prefix of every row).
    """

    def __init__(self, core: VRNNCore, site_guide: SiteGuide | None = None,
                 register_params: bool = False, smoothing: bool = False):
        super().__init__()
        if not isinstance(smoothing, bool):
            raise ValueError(f"smoothing must be True or False, got {smoothing!r}")
        context_dim = core.feature_dim + core.h_dim * (2 if smoothing else 1)
        self.backward_rnn = (nn.GRU(core.feature_dim, core.h_dim, batch_first=True)
                             if smoothing else None)
        if site_guide is None:
            site_guide = MeanFieldGuide(context_dim, core.z_dim, (core.feature_dim,))
        if site_guide.context_dim != context_dim or site_guide.latent_dim != core.z_dim:
            raise ValueError(
                f"site_guide must have context_dim={context_dim} (feature_dim + h_dim"
                f"{' + h_dim' if smoothing else ''}) and "
                f"latent_dim={core.z_dim}, got {site_guide.context_dim}, {site_guide.latent_dim}"
            )
        self.core = core
        self.site_guide = site_guide
        self.register_params = register_params

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **generation_kwargs):
        core = self.core
        if self.register_params:
            pyro.module("vrnn", core)
            pyro.module("vrnn_guide", self.site_guide)
            if self.backward_rnn is not None:
                pyro.module("vrnn_guide_backward", self.backward_rnn)
        mask = check_sequences(x, mask, core.x_dim, "VRNNGuide",
                               core.emission_kind == "bernoulli")
        step_mask = _step_masks(mask)
        phi_x_all = core.features_x(_clean(x, mask, step_mask))  # all steps in one call
        phi_x = phi_x_all.unbind(-2)
        future = (self._backward_states(phi_x_all, mask) if self.backward_rnn is not None
                  else None)
        state = core.rnn.initial_state(x.shape[:1], x)
        zs, states, h_prev, phi_z = [], [], [], []
        # a mean-field q(z_t | ...) of every step is scored in one call (see guides.steps)
        steps = StepGroup() if type(self.site_guide) is MeanFieldGuide else None
        with pyro.plate("data", x.shape[0], dim=-1):
            for t in pyro.markov(range(x.shape[1])):
                h = core.rnn.hidden(state)
                context = (cat_broadcast(phi_x[t], h) if future is None
                           else cat_broadcast(phi_x[t], h, future[t]))
                q = (steps.member(*self.site_guide.loc_scale(context)) if steps is not None
                     else self.site_guide(context))
                z = pyro.sample(f"z_{t}", _masked(q, step_mask[t]))
                pz = core.phi_z(z)
                zs.append(z)
                states.append(state)
                h_prev.append(h)
                phi_z.append(pz)
                state = core.step(phi_x[t], pz, state)
        if steps is not None:
            steps.set_values(zs)
        core.stash(_GuideStates(x, zs, states, state, _stack(h_prev), _stack(phi_z), phi_x_all))

    def _backward_states(self, phi_x: torch.Tensor, mask: torch.Tensor) -> list:
        """:math:`a_t` for every step (a list of ``(B, H)``): one GRU call over each sequence
        reversed within its own length, so every :math:`a_t` starts from that sequence's end."""
        lengths = mask.sum(-1)
        t = torch.arange(mask.shape[-1], device=mask.device)
        if not torch.equal(mask, t < lengths[:, None]):
            raise ValueError("VRNNGuide(smoothing=True): the mask must mark a prefix of every "
                             "sequence (padding at the end only), as pad_collate makes it")
        out, _ = self.backward_rnn(reverse_within_lengths(phi_x, lengths))
        return reverse_within_lengths(out, lengths).unbind(-2)


def build_vrnn(x_dim: int, *, guide: str = "meanfield", num_flows: int = 2,
               smoothing: bool = False, register_params: bool = False,
               **core_options) -> tuple[VRNNModel, VRNNGuide]:
    r"""``(model, guide)`` sharing one :class:`VRNNCore` (``VRNNCore(x_dim, **core_options)``);
    ``guide`` is ``"meanfield"`` (:class:`~pyro_seqlatent.guides.MeanFieldGuide`) or ``"iaf"``:
    the project's :class:`~pyro_seqlatent.guides.FlowGuide` with ``num_flows`` conditional IAFs
    (MADEs reading the guide's context, :math:`[\varphi^x(x_t), h_{t-1}]` and :math:`a_t` with
    ``smoothing``), shared over time as in
    Pyro's DMM; its Monte Carlo KL is used (no closed form). ``smoothing=True`` adds the backward
    GRU to the guide (see :class:`VRNNGuide`)."""
    core = VRNNCore(x_dim, **core_options)
    context_dim = core.feature_dim + core.h_dim * (2 if smoothing else 1)
    if guide == "meanfield":
        site = MeanFieldGuide(context_dim, core.z_dim, (core.feature_dim,))
    elif guide == "iaf":
        site = FlowGuide(context_dim, core.z_dim, flow="iaf", num_flows=num_flows,
                         hidden_dims=(core.feature_dim,))
    else:
        raise ValueError(f"guide must be 'meanfield' or 'iaf', got {guide!r}")
    return VRNNModel(core, register_params), VRNNGuide(core, site, register_params, smoothing)


def forecast(model: VRNNModel, guide: VRNNGuide, prefix: torch.Tensor, horizon: int,
             num_samples: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Continuations of observed prefixes: :math:`z_{\le P} \sim q(\cdot \mid x_{\le P})`,
    then :math:`z_t \sim p(z_t\mid h_{t-1})`, :math:`x_t \sim p(x_t \mid z_t, h_{t-1})` for
    :math:`t = P+1..P+H`.

    The VRNN's case of :func:`pyro_seqlatent.models.sequence_forecast.forecast`, which takes
    any model/guide pair that follows the forecast protocol (``guide(x, mask)``,
    ``model(x, mask, horizon=H)``); its ``forecast_bands`` (5–95 % bands), ``forecast_scores``
    (CRPS of held-out continuations) and ``plot_forecast`` (figure) take the VRNN as well.

    :param prefix: ``(B, P, D)`` observed prefixes (all steps observed unless ``mask``).
    :returns: ``(num_samples, B, H, D)`` sampled continuations (in eval mode: no dropout).
    """
    from pyro_seqlatent.models.sequence_forecast import forecast as sequence_forecast

    return sequence_forecast(model, guide, prefix, horizon, num_samples, mask)


# ----------------------------------------------------------------------------------------------
# Registry: "vrnn" on JSB piano rolls or FSDD speech frames
# ----------------------------------------------------------------------------------------------
DATA_DIMS = {"jsb": 88, "fsdd": 200}
DEFAULT_EMISSION = {"jsb": "bernoulli", "fsdd": "gmm"}
#: help text of the options shared by ``vrnn`` and the ``rnn`` baselines
SEQUENCE_HELP = {
    "dataset": "jsb (JSB chorales piano rolls, 88 keys) or fsdd (spoken-digit speech frames)",
    "emission": "p(x_t | ...): bernoulli, gaussian, gmm, or auto (bernoulli on jsb, gmm on fsdd)",
    "h_dim": "RNN state size",
    "feature_dim": "output size of the feature networks phi",
    "hidden_dim": "width of the hidden layers of every MLP",
    "num_layers": "hidden layers per MLP",
    "rnn": "recurrent cell: gru or lstm",
    "num_components": "mixture components of the gmm emission",
    "dropout": "dropout probability on phi_x(x_t) and the emission input (training only)",
    "max_sequences": "use only this many sequences per split (0: all)",
    "transpose": "jsb: add every transposition of each training chorale by up to this many "
                 "semitones each way (0: off)",
    "generate_length": "steps of the sequences that `pyro-seqlatent sample` draws",
    "data": "your own sequences: a .npz or .pt file of seq_0, seq_1, ... or values + lengths "
            "(docs/own-data.md); replaces dataset ('': the built-in one)",
}
#: the fixed sets of values of the options shared by ``vrnn`` and the ``rnn`` baselines
SEQUENCE_CHOICES = {
    "dataset": sorted(DATA_DIMS),
    "emission": ["auto", *EMISSIONS],
    "rnn": ["gru", "lstm"],
}
#: how ``--help`` groups the options shared by ``vrnn`` and the ``rnn`` baselines
SEQUENCE_GROUPS = {
    "data": ["data", "dataset", "max_sequences", "transpose"],
    "networks": ["emission", "h_dim", "feature_dim", "hidden_dim", "num_layers", "rnn",
                 "num_components", "dropout"],
    "sampling": ["generate_length"],
}


def sequence_datasets(options: dict, root=None) -> dict:
    """``{"train", "valid", "test"}`` of the ``dataset`` option (``jsb`` or ``fsdd``);
    ``max_sequences > 0`` keeps only that many sequences per split; ``transpose = k > 0``
    (JSB only) adds every transposition by up to ``k`` semitones of each training chorale
    (:func:`pyro_seqlatent.data.jsb.transpose_rolls`; validation and test stay as they are)."""
    limit = options.get("max_sequences") or None
    shift = options.get("transpose", 0)
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"transpose must be an int >= 0 (semitones each way; 0: off), got "
                         f"{shift!r}")
    if shift and options["dataset"] != "jsb":
        raise ValueError(f"transpose={shift!r} applies to piano rolls (dataset='jsb') only; "
                         f"use transpose=0 with dataset={options['dataset']!r}")
    if options.get("data"):
        if shift:
            raise ValueError(f"transpose={shift!r} applies to the built-in piano rolls only; use "
                             "transpose=0 with data=<your file>")
        from pyro_seqlatent.data.sequences import SequenceDataset

        splits = user_sequences(options).datasets()
        return {k: SequenceDataset(d.sequences[:limit], d.name) for k, d in splits.items()}
    if options["dataset"] == "jsb":
        from pyro_seqlatent.data.jsb import load_jsb_splits, transpose_rolls

        splits = load_jsb_splits(root, max_sequences=limit)
        splits["train"] = transpose_rolls(splits["train"], shift)
        return splits
    if options["dataset"] == "fsdd":
        from pyro_seqlatent.data.fsdd import load_fsdd_splits

        return load_fsdd_splits(root, max_per_split=limit)
    raise ValueError(f"dataset must be one of {sorted(DATA_DIMS)}, got {options['dataset']!r}")


def user_sequences(options: dict):
    """The ``data`` file of ``options`` as sequences (docs/own-data.md;
    :func:`pyro_seqlatent.data.user_files.load_user_data`)."""
    from pyro_seqlatent.data.user_files import load_user_data

    return load_user_data(options["data"], "sequences")


def sequence_dim(options: dict) -> int:
    """Features per step of the options' data: the ``data`` file's, else ``dataset``'s."""
    if options.get("data"):
        return user_sequences(options).dim
    if options["dataset"] not in DATA_DIMS:
        raise ValueError(f"dataset must be one of {sorted(DATA_DIMS)}, got {options['dataset']!r}")
    return DATA_DIMS[options["dataset"]]


def resolve_emission(options: dict) -> str:
    """``emission``, or for ``auto`` the data's: bernoulli on jsb, gmm on fsdd; on a ``data``
    file bernoulli when every value is 0 or 1, else gaussian."""
    emission = options.get("emission", "auto")
    if emission != "auto":
        return emission
    if options.get("data"):
        return "bernoulli" if user_sequences(options).binary else "gaussian"
    return DEFAULT_EMISSION[options["dataset"]]


def _build_from_options(options: dict):
    return build_vrnn(
        sequence_dim(options), guide=options["guide"], num_flows=options["num_flows"],
        z_dim=options["z_dim"], h_dim=options["h_dim"], feature_dim=options["feature_dim"],
        hidden_dim=options["hidden_dim"], num_layers=options["num_layers"], rnn=options["rnn"],
        emission=resolve_emission(options), num_components=options["num_components"],
        prior=options["prior"], dropout=options["dropout"], smoothing=options["smoothing"],
        decoder_h=options["decoder_h"],
    )


def _generate(model, num_samples: int, options: dict) -> torch.Tensor:
    return model(length=options.get("generate_length", 50), num_sequences=num_samples)


def _plot(model, guide, datasets, options, out_dir) -> list:
    """The report's figure: forecasts of three test sequences (16 observed steps, 16 ahead;
    the sum over features: notes per frame on JSB), mean and 5–95 % band."""
    from pathlib import Path

    from pyro_seqlatent.models.sequence_forecast import plot_forecast

    test = datasets["test"]
    sequences = [test[i] for i in range(min(len(test), 20))]
    jsb = options["dataset"] == "jsb" and not options.get("data")
    label = "notes sounding" if jsb else "sum over features"
    try:
        path = plot_forecast(model, guide, sequences, 16, 16, Path(out_dir) / "forecast.png",
                             num_samples=100, ylabel=label)
    except ValueError:  # no test sequence longer than 16 steps
        return []
    return [path]


def _register() -> None:
    from pyro_seqlatent.data.sequences import pad_collate
    from pyro_seqlatent.registry import ModelSpec, register_model

    register_model(ModelSpec(
        name="vrnn",
        build=_build_from_options,
        datasets=sequence_datasets,
        defaults={"dataset": "jsb", "emission": "auto", "guide": "meanfield", "num_flows": 2,
                  **NETWORK_DEFAULTS, "num_layers": 1, "rnn": "gru", "num_components": 20,
                  "prior": "learned",
                  "dropout": 0.0, "smoothing": False, "decoder_h": True, "max_sequences": 0,
                  "transpose": 0, "generate_length": 50,
                  "data": ""},
        collate_fn=pad_collate,
        elbo="DeviceTrace_ELBO",  # Trace_ELBO without per-site host reads
        batch_plate="data",
        generate=_generate,
        plot=_plot,
        train_defaults=dict(TRAIN_DEFAULTS),
        option_help={
            **SEQUENCE_HELP,
            "guide": "guide of each z_t: meanfield (diagonal Normal) or iaf (conditional IAFs)",
            "num_flows": "number of IAFs of guide=iaf",
            "z_dim": "latent size per step",
            "prior": "p(z_t | h_{t-1}): learned (the VRNN) or standard N(0, I) (VRNN-I)",
            "smoothing": "the guide also reads a backward GRU over x_{t:T}",
            "decoder_h": "the decoder reads h_{t-1} as well as z_t (the VRNN); off: z_t only "
                         "(a deep Markov model's emission)",
        },
        option_choices={**SEQUENCE_CHOICES, "guide": ["meanfield", "iaf"],
                        "prior": ["learned", "standard"]},
        option_groups={
            "data": SEQUENCE_GROUPS["data"],
            "latent variables and guide": ["z_dim", "prior", "guide", "num_flows", "smoothing"],
            "networks": [*SEQUENCE_GROUPS["networks"], "decoder_h"],
            "sampling": SEQUENCE_GROUPS["sampling"],
        },
        # a 300-step run: the annealing ends within it (the defaults' 8,000 steps would not)
        demo={"num_steps": 300, "lr": 3e-3, "batch_size": 20, "max_time_s": 70.0,
              "kl_anneal_steps": 250,
              "eval": {"num_samples": 20, "max_points": 16, "batch_size": 16}},
        description="VRNN (Chung et al. 2015) on JSB piano rolls or FSDD speech frames; "
                    "loss per sequence (divide by the number of unmasked steps for per-step)",
    ))


_register()
