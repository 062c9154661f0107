r"""The sigmoid belief network (Neal 1992) with one or more stochastic layers, the classic
testbed of score-function estimators for discrete latents (NVIL, Mnih & Gregor 2014; VIMCO,
Mnih & Rezende 2016), on statically binarized MNIST.

Model, for each data point :math:`x_n` in the plate ``"data"``, with :math:`H` binary hidden
units (200 in the papers) and :math:`D` pixels (784):

.. math::
    h_n \sim \prod_{u=1}^{H} \mathrm{Bernoulli}\bigl(\sigma(b_u)\bigr), \qquad
    x_n \mid h_n \sim \prod_{j=1}^{D} \mathrm{Bernoulli}\bigl(\sigma(W h_n + c)_j\bigr),

so that :math:`\log p(x, h) = \sum_u [h_u b_u - \log(1 + e^{b_u})] + \sum_j [x_j a_j -
\log(1 + e^{a_j})]` with :math:`a = W h + c`. The site ``"h"`` is one
``Bernoulli(...).to_event(1)`` vector per data point (not enumerable: :math:`2^H` values).

Guide (recognition network): :math:`q(h_n \mid x_n) = \prod_u \mathrm{Bernoulli}(\sigma(g_\phi
(x_n))_u)` with :math:`g_\phi` linear, as the SBN recognition model of NVIL (a one-layer SBN
run bottom-up), or an MLP with ``tanh`` hidden layers (``guide_hidden``).

Train it with any estimator of :mod:`pyro_seqlatent.infer.estimators` that handles discrete
sites (``score_nn_baseline``, ``score_avg_baseline``, ``vimco``, ``reinforce_loo``,
``concrete``); ``log_marginal`` / ``evaluate`` estimate :math:`\log p(x)` by importance sampling
with the guide as proposal. :meth:`SBN.exact_log_marginal` sums over all :math:`2^{HL}`
configurations for a few units (a test reference).

Deeper variant (option ``layers``; :class:`SBN` gives the equations): ``L`` layers of ``H``
units with sites ``"h1"`` (next to the pixels) ... ``"hL"`` (top), each layer a one-layer SBN
given the one above, and a bottom-up recognition model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_seqlatent.models.vae import prepare_images, user_data
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.registry import ModelSpec, register_model

MAX_EXACT_UNITS = 20


def _site_names(layers: int) -> tuple[str, ...]:
    """The latent sites from the data upward: ``("h",)`` for one layer, ``("h1", ..., "hL")``
    for ``L`` layers."""
    return ("h",) if layers == 1 else tuple(f"h{i}" for i in range(1, layers + 1))


def _check_sizes(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class SBN(nn.Module):
    r"""``p(x, h)`` of a sigmoid belief network with ``layers`` stochastic layers of
    ``hidden_dim`` binary units each; ``forward(x)`` with ``x`` of shape ``(B, data_dim)`` in
    {0, 1} (images are flattened; extra batch entries such as labels are ignored). Broadcasts
    over leftmost particle dims.

    With :math:`L` layers :math:`h^{(1)}` (next to the pixels) ... :math:`h^{(L)}` (top):
    :math:`h^{(L)} \sim \prod \mathrm{Bernoulli}(\sigma(b))`, :math:`h^{(l)} \mid h^{(l+1)}
    \sim \prod \mathrm{Bernoulli}(\sigma(U_l h^{(l+1)} + d_l))` and :math:`x \mid h^{(1)}
    \sim \prod \mathrm{Bernoulli}(\sigma(W h^{(1)} + c))` (the "200H–200H–784V" model of
    Table 1 of Maddison, Mnih & Teh 2017, the Concrete paper, for ``layers=2``).

    :param int data_dim: pixels per image (D).
    :param int hidden_dim: binary hidden units per layer (H).
    :param int layers: stochastic layers (L); sites ``"h"`` for one, ``"h1"`` ... ``"hL"`` for more.
    """

    def __init__(self, data_dim: int = 784, hidden_dim: int = 200, layers: int = 1):
        super().__init__()
        _check_sizes(data_dim=data_dim, hidden_dim=hidden_dim, layers=layers)
        self.data_dim, self.hidden_dim, self.layers = data_dim, hidden_dim, layers
        self.sites = _site_names(layers)
        self.prior_logits = nn.Parameter(torch.zeros(hidden_dim))  # b, of the top layer
        self.decoder = nn.Linear(hidden_dim, data_dim)  # W, c
        # between[l - 1] maps h^(l+1) to the logits of h^(l) (U_l, d_l)
        self.between = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim)
                                     for _ in range(layers - 1))

    def forward(self, x: torch.Tensor, *labels) -> torch.Tensor:
        x = prepare_images(x, self.data_dim, "bernoulli", labels)
        with pyro.plate("data", x.shape[-2]):
            logits = self.prior_logits
            for level in range(self.layers, 0, -1):  # top-down
                h = pyro.sample(self.sites[level - 1], dist.Bernoulli(
                    logits=logits, validate_args=False).to_event(1))
                logits = self.between[level - 2](h) if level > 1 else None
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(h),
                                            validate_args=False).to_event(1), obs=x)
        return h

    def log_joint(self, x: torch.Tensor, h) -> torch.Tensor:
        r""":math:`\log p(x, h)` in closed form (module docstring), shape of the broadcast
        leading dims of ``x`` and ``h``; ``h`` is one tensor for one layer, or the sequence
        :math:`(h^{(1)}, \dots, h^{(L)})`."""
        hs = (h,) if torch.is_tensor(h) else tuple(h)
        if len(hs) != self.layers:
            raise ValueError(f"h: give {self.layers} layer(s) of units, got {len(hs)}")

        def bernoulli(v, logits):
            return (v * logits - F.softplus(logits)).sum(-1)

        total = bernoulli(hs[-1], self.prior_logits) + bernoulli(x, self.decoder(hs[0]))
        for level in range(1, self.layers):
            total = total + bernoulli(hs[level - 1], self.between[level - 1](hs[level]))
        return total

    @torch.no_grad()
    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x_n) = \log \sum_{h} p(x_n, h)` for each row of ``x`` ``(B, D)``,
        by enumerating all :math:`2^{HL}` configurations (at most 20 units in all)."""
        units = self.hidden_dim * self.layers
        if units > MAX_EXACT_UNITS:
            raise ValueError(f"exact_log_marginal enumerates 2^(hidden_dim * layers) "
                             f"configurations; {units} units > {MAX_EXACT_UNITS}: use "
                             "pyro_seqlatent.infer.log_marginal (importance sampling) instead")
        x = prepare_images(x, self.data_dim, "bernoulli")
        configs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=units)),
                               dtype=x.dtype).unsqueeze(1)
        hs = configs.split(self.hidden_dim, dim=-1)
        return torch.logsumexp(self.log_joint(x.unsqueeze(0), hs), 0)

    @torch.no_grad()
    def generate(self, num_samples: int) -> torch.Tensor:
        r"""Pixel probabilities :math:`\sigma(W h^{(1)} + c)` for ancestral draws of the
        hidden layers, ``(num_samples, D)``."""
        h = torch.bernoulli(torch.sigmoid(self.prior_logits).expand(num_samples, -1))
        for level in range(self.layers - 1, 0, -1):
            h = torch.bernoulli(torch.sigmoid(self.between[level - 1](h)))
        return torch.sigmoid(self.decoder(h))


class SBNGuide(nn.Module):
    r"""``q(h | x)``: independent Bernoulli units with logits :math:`g_\phi(x)`, linear
    (``guide_hidden=()``, NVIL's SBN recognition model) or an MLP with ``tanh`` hidden layers;
    with ``layers`` > 1 the recognition model runs bottom-up, :math:`q(h^{(1)} \mid x)
    \prod_{l>1} q(h^{(l)} \mid h^{(l-1)})`, each upper factor linear (as in NVIL and VIMCO).
    """

    def __init__(self, data_dim: int = 784, hidden_dim: int = 200,
                 guide_hidden: Sequence[int] = (), layers: int = 1):
        super().__init__()
        _check_sizes(data_dim=data_dim, hidden_dim=hidden_dim, layers=layers)
        self.data_dim, self.sites = data_dim, _site_names(layers)
        self.encoder = MLP(data_dim, tuple(guide_hidden), hidden_dim, activation="tanh") \
            if guide_hidden else nn.Linear(data_dim, hidden_dim)
        self.upward = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim)
                                    for _ in range(layers - 1))

    def forward(self, x: torch.Tensor, *labels) -> torch.Tensor:
        x = prepare_images(x, self.data_dim, "bernoulli", labels)
        with pyro.plate("data", x.shape[-2]):
            logits, first = self.encoder(x), None
            for level, name in enumerate(self.sites):  # bottom-up
                h = pyro.sample(name, dist.Bernoulli(logits=logits,
                                                     validate_args=False).to_event(1))
                first = h if first is None else first
                if level < len(self.upward):
                    logits = self.upward[level](h)
            return first  # h (h1 with more layers), as the model returns


# ----------------------------------------------------------------------------- registration


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in str(text).split(",") if h.strip())
    except ValueError:
        raise ValueError(f"guide_hidden={text!r}: give comma-separated layer sizes such as "
                         "'200' or '' for the linear recognition model") from None


def build(options: dict) -> tuple[SBN, SBNGuide]:
    hidden, layers = int(options["hidden_dim"]), int(options.get("layers", 1))
    user = user_data(options)
    dim = user.dim if user else 784
    return (SBN(dim, hidden, layers),
            SBNGuide(dim, hidden, _hidden(options["guide_hidden"]), layers))


def datasets(options: dict, root=None) -> dict:
    user = user_data(options)
    if user is not None:  # your own binary vectors or images (docs/own-data.md)
        return user.first(train=options["train_limit"], valid=options["valid_limit"])
    from pyro_seqlatent.data.mnist import BinarizedMNIST

    return {"train": BinarizedMNIST("train", root, limit=options["train_limit"] or None),
            "valid": BinarizedMNIST("valid", root, limit=options["valid_limit"] or None),
            "test": BinarizedMNIST("test", root)}


def generate(model: SBN, num_samples: int, options: dict) -> torch.Tensor:
    user = user_data(options)
    shape = user.item_shape if user else (28, 28)
    return model.generate(num_samples).reshape(num_samples, *shape)


register_model(ModelSpec(
    name="sbn",
    build=build,
    datasets=datasets,
    defaults={"hidden_dim": 200, "layers": 1, "guide_hidden": "", "train_limit": 0,
              "valid_limit": 2000, "data": ""},
    elbo="vimco",  # K = 5: the best test -log p(x) at 20 CPU minutes (docs/estimators.md)
    generate=generate,
    train_defaults={"batch_size": 20, "lr": 1e-3, "valid_every": 1000},  # as measured
    description="sigmoid belief network (layers of binary units) on statically binarized "
                "MNIST, trained with vimco (K = 5) by default (--elbo reinforce_loo, ...)",
    option_help={
        "hidden_dim": "binary hidden units H per layer (200 in the NVIL and VIMCO papers)",
        "layers": "stochastic layers of hidden_dim units (2: the Concrete paper's 200H-200H-784V "
                  "model; sites h1 ... hL from the pixels up)",
        "guide_hidden": "comma-separated tanh hidden sizes of the recognition MLP ('': linear, "
                        "as NVIL's SBN recognition model)",
        "train_limit": "use only the first N training images (0: all 50,000)",
        "valid_limit": "use only the first N validation images (0: all 10,000)",
        "data": "your own binary vectors or images: a .npz or .pt file with x (N, D) or (N, "
                "H, W) in {0, 1} (docs/own-data.md); '': binarized MNIST",
    },
))
