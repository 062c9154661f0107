r"""Deterministic RNN baselines of the VRNN paper: RNN-Bernoulli, RNN-Gauss, RNN-GMM.

.. math::
    h_t = f(\varphi^x(x_t), h_{t-1}),\quad h_0 = 0, \qquad
    p(x_{1:T}) = \prod_t p(x_t \mid h_{t-1}),\quad
    p(x_t\mid h_{t-1}) = \text{emission}(h_{t-1})

with the same emission heads as :mod:`pyro_seqlatent.models.vrnn` (Bernoulli, diagonal Gaussian,
K-component GMM). The model has no latent variables: its "ELBO" is the exact log-likelihood
and the guide (:class:`EmptyGuide`) has no sites. The whole sequence runs through one
``nn.GRU``/``nn.LSTM`` call, and padded steps are masked out of the single observed site ``"x"``.
``dropout=p`` drops features of :math:`\varphi^x(x_t)` and of the emission input
:math:`h_{t-1}` in train mode, as the VRNN's.
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.models.vrnn import (
    BernoulliEmission,
    _stack,
    check_sequences,
    feature_net,
    make_dropout,
    make_emission,
)


class RNNModel(nn.Module):
    """``model(x, mask)`` scores a padded batch; ``model(x, mask, horizon=H)`` continues it;
    ``model(length=T, num_sequences=N)`` generates. Returns the ``(..., B, T + H, D)`` sequence.

    :param int x_dim: features per step.
    :param int h_dim: RNN state size.
    :param int feature_dim: size of :math:`\\varphi^x(x_t)`.
    :param int hidden_dim: width of the MLP hidden layers.
    :param int num_layers: hidden layers per MLP.
    :param str rnn: ``"gru"`` or ``"lstm"``.
    :param str emission: ``"bernoulli"``, ``"gaussian"`` or ``"gmm"``.
    :param float dropout: dropout probability on :math:`\\varphi^x(x_t)` and on the emission
        input (train mode only).
    """

    #: how to batch a dataset of ``(T_i, D)`` sequences (``train`` uses it when given none)
    collate_fn = staticmethod(pad_collate)

    def __init__(self, x_dim: int, h_dim: int = 64, feature_dim: int = 64, hidden_dim: int = 64,
                 num_layers: int = 1, rnn: str = "gru", emission: str = "bernoulli",
                 num_components: int = 20, min_scale: float = 1e-3,
                 register_params: bool = False, dropout: float = 0.0):
        super().__init__()
        hidden = (hidden_dim,) * num_layers
        self.x_dim, self.h_dim = int(x_dim), int(h_dim)
        self.phi_x = feature_net(x_dim, hidden, feature_dim)
        if rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {rnn!r}")
        self.rnn_kind = rnn
        self.seq_rnn = (nn.GRU if rnn == "gru" else nn.LSTM)(feature_dim, h_dim, batch_first=True)
        self.emission = make_emission(emission, h_dim, x_dim, hidden, num_components, min_scale)
        self.register_params = register_params
        self.dropout = make_dropout(dropout)

    def forward(self, x: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                horizon: int = 0, length: int | None = None,
                num_sequences: int | None = None) -> torch.Tensor:
        if self.register_params:
            pyro.module("rnn", self)
        if x is None:
            if length is None or num_sequences is None:
                raise ValueError("without x, give length=T and num_sequences=N to generate")
            ref = next(self.parameters())
            with pyro.plate("data", int(num_sequences), dim=-1):
                h = ref.new_zeros(int(num_sequences), self.h_dim)
                state = h if self.rnn_kind == "gru" else (h, h)
                return self._generate(state, 0, int(length), None)
        mask = check_sequences(x, mask, self.x_dim, "RNNModel",
                               isinstance(self.emission, BernoulliEmission))
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        x_clean = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        with pyro.plate("data", x.shape[0], dim=-1):
            out, last = self.seq_rnn(self.dropout(self.phi_x(x_clean)))
            h0 = x.new_zeros(x.shape[0], 1, self.h_dim)
            h_prev = torch.cat([h0, out[:, :-1]], dim=1)  # h_{t-1}
            emission = self.emission(self.dropout(h_prev))  # batch (B, T)
            pyro.sample("x", emission.mask(mask).to_event(1), obs=x_clean)
            if horizon == 0:
                return x_clean
            # the state after the last *unpadded* step of each sequence
            if mask.all():
                state = last[0] if self.rnn_kind == "gru" else (last[0][0], last[1][0])
            else:
                raise ValueError("forecasting needs unpadded prefixes (mask all True)")
            return self._generate(state, x.shape[1], horizon, x_clean)

    def _step(self, inp: torch.Tensor, state):
        """One step of the sequence RNN on inputs with any leading shape."""
        parts = (state,) if self.rnn_kind == "gru" else state
        shape = torch.broadcast_shapes(inp.shape[:-1], *(p.shape[:-1] for p in parts))
        flat_in = inp.expand(shape + inp.shape[-1:]).reshape(-1, 1, inp.shape[-1])
        flat = [p.expand(shape + p.shape[-1:]).reshape(1, -1, self.h_dim) for p in parts]
        _, new = self.seq_rnn(flat_in, flat[0] if self.rnn_kind == "gru" else tuple(flat))
        if self.rnn_kind == "gru":
            return new[0].reshape(shape + (self.h_dim,))
        return tuple(n[0].reshape(shape + (self.h_dim,)) for n in new)

    def _generate(self, state, start: int, steps: int, prefix) -> torch.Tensor:
        xs = []
        for t in pyro.markov(range(start, start + steps)):
            h = state if self.rnn_kind == "gru" else state[0]
            x_t = pyro.sample(f"x_{t}", self.emission(self.dropout(h)))
            xs.append(x_t)
            state = self._step(self.dropout(self.phi_x(x_t)), state)
        generated = _stack(xs)
        if prefix is None:
            return generated
        shape = torch.broadcast_shapes(prefix.shape[:-2], generated.shape[:-2])
        return torch.cat([prefix.expand(shape + prefix.shape[-2:]),
                          generated.expand(shape + generated.shape[-2:])], dim=-2)


class EmptyGuide(nn.Module):
    """The guide of a model without latent variables: no sites, no parameters."""

    def forward(self, *args, **kwargs) -> None:
        return None


def build_rnn(x_dim: int, **options) -> tuple[RNNModel, EmptyGuide]:
    """``(RNNModel(x_dim, **options), EmptyGuide())``."""
    return RNNModel(x_dim, **options), EmptyGuide()


def _build_from_options(options: dict):
    from pyro_seqlatent.models.vrnn import resolve_emission, sequence_dim

    return build_rnn(
        sequence_dim(options), h_dim=options["h_dim"],
        feature_dim=options["feature_dim"], hidden_dim=options["hidden_dim"],
        num_layers=options["num_layers"], rnn=options["rnn"],
        emission=resolve_emission(options), num_components=options["num_components"],
        dropout=options["dropout"],
    )


def _register() -> None:
    from pyro_seqlatent.models.vrnn import (
        SEQUENCE_CHOICES,
        SEQUENCE_GROUPS,
        SEQUENCE_HELP,
        sequence_datasets,
    )
    from pyro_seqlatent.registry import ModelSpec, register_model

    register_model(ModelSpec(
        name="rnn",
        build=_build_from_options,
        datasets=sequence_datasets,
        defaults={"dataset": "jsb", "emission": "auto", "h_dim": 128, "feature_dim": 128,
                  "hidden_dim": 128, "num_layers": 1, "rnn": "gru", "num_components": 20,
                  "dropout": 0.0, "max_sequences": 0, "transpose": 0, "generate_length": 50,
                  "data": ""},
        collate_fn=pad_collate,
        elbo="Trace_ELBO",
        batch_plate="data",
        generate=lambda model, n, options: model(length=options.get("generate_length", 50),
                                                 num_sequences=n),
        train_defaults={"lr": 1e-3, "batch_size": 20, "clip_norm": 10.0},
        option_help=SEQUENCE_HELP,
        option_choices=SEQUENCE_CHOICES,
        option_groups=SEQUENCE_GROUPS,
        demo={"h_dim": 64, "feature_dim": 64, "hidden_dim": 64, "num_steps": 300, "lr": 3e-3,
              "batch_size": 20, "max_time_s": 60.0,
              "eval": {"num_samples": 20, "max_points": 16, "batch_size": 16}},
        description="Deterministic RNN baselines (RNN-Bernoulli/Gauss/GMM) of the VRNN paper",
    ))


_register()
