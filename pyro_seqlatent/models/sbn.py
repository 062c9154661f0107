r"""The sigmoid belief network (Neal 1992) with one stochastic layer, the classic testbed of
score-function estimators for discrete latents (NVIL, Mnih & Gregor 2014; VIMCO, Mnih & Rezende
2016), on statically binarized MNIST.

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
with the guide as proposal. :meth:`SBN.exact_log_marginal` sums over all :math:`2^H`
configurations for a small ``H`` (a test reference).
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


class SBN(nn.Module):
    """``p(x, h)`` of a one-layer sigmoid belief network; ``forward(x)`` with ``x`` of shape
    ``(B, data_dim)`` in {0, 1} (images are flattened; extra batch entries such as labels are
    ignored). Broadcasts over leftmost particle dims.

    :param int data_dim: pixels per image (D).
    :param int hidden_dim: binary hidden units (H).
    """

    def __init__(self, data_dim: int = 784, hidden_dim: int = 200):
        super().__init__()
        for name, value in (("data_dim", data_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.data_dim, self.hidden_dim = data_dim, hidden_dim
        self.prior_logits = nn.Parameter(torch.zeros(hidden_dim))  # b
        self.decoder = nn.Linear(hidden_dim, data_dim)  # W, c

    def forward(self, x: torch.Tensor, *labels) -> torch.Tensor:
        x = prepare_images(x, self.data_dim, "bernoulli", labels)
        with pyro.plate("data", x.shape[-2]):
            h = pyro.sample("h", dist.Bernoulli(logits=self.prior_logits,
                                                validate_args=False).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(h),
                                            validate_args=False).to_event(1), obs=x)
        return h

    def log_joint(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x, h)` in closed form (module docstring), shape of the broadcast
        leading dims of ``x`` and ``h``."""
        b = self.prior_logits
        a = self.decoder(h)
        return (h * b - F.softplus(b)).sum(-1) + (x * a - F.softplus(a)).sum(-1)

    @torch.no_grad()
    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x_n) = \log \sum_{h \in \{0,1\}^H} p(x_n, h)` for each row of ``x``
        ``(B, D)``, by enumerating all :math:`2^H` configurations (``hidden_dim`` ≤ 20)."""
        if self.hidden_dim > MAX_EXACT_UNITS:
            raise ValueError(f"exact_log_marginal enumerates 2^hidden_dim configurations; "
                             f"hidden_dim={self.hidden_dim} > {MAX_EXACT_UNITS}: use "
                             "pyro_seqlatent.infer.log_marginal (importance sampling) instead")
        x = prepare_images(x, self.data_dim, "bernoulli")
        configs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=self.hidden_dim)),
                               dtype=x.dtype)
        return torch.logsumexp(self.log_joint(x.unsqueeze(0), configs.unsqueeze(1)), 0)

    @torch.no_grad()
    def generate(self, num_samples: int) -> torch.Tensor:
        """Pixel probabilities :math:`\\sigma(W h + c)` for ``h ~ p(h)``, ``(num_samples, D)``."""
        h = torch.bernoulli(torch.sigmoid(self.prior_logits).expand(num_samples, -1))
        return torch.sigmoid(self.decoder(h))


class SBNGuide(nn.Module):
    """``q(h | x)``: independent Bernoulli units with logits :math:`g_\\phi(x)`, linear
    (``guide_hidden=()``, NVIL's SBN recognition model) or an MLP with ``tanh`` hidden layers.
    """

    def __init__(self, data_dim: int = 784, hidden_dim: int = 200,
                 guide_hidden: Sequence[int] = ()):
        super().__init__()
        self.data_dim = data_dim
        self.encoder = MLP(data_dim, tuple(guide_hidden), hidden_dim, activation="tanh") \
            if guide_hidden else nn.Linear(data_dim, hidden_dim)

    def forward(self, x: torch.Tensor, *labels) -> torch.Tensor:
        x = prepare_images(x, self.data_dim, "bernoulli", labels)
        with pyro.plate("data", x.shape[-2]):
            return pyro.sample("h", dist.Bernoulli(logits=self.encoder(x),
                                                   validate_args=False).to_event(1))


# ----------------------------------------------------------------------------- registration


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in str(text).split(",") if h.strip())
    except ValueError:
        raise ValueError(f"guide_hidden={text!r}: give comma-separated layer sizes such as "
                         "'200' or '' for the linear recognition model") from None


def build(options: dict) -> tuple[SBN, SBNGuide]:
    hidden = int(options["hidden_dim"])
    user = user_data(options)
    dim = user.dim if user else 784
    return (SBN(dim, hidden),
            SBNGuide(dim, hidden, _hidden(options["guide_hidden"])))


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
    defaults={"hidden_dim": 200, "guide_hidden": "", "train_limit": 0, "valid_limit": 2000,
              "data": ""},
    elbo="TraceGraph_ELBO",
    generate=generate,
    train_defaults={"batch_size": 20, "lr": 3e-4, "valid_every": 1000},
    description="sigmoid belief network (one layer of binary units) on statically binarized "
                "MNIST; train it with a discrete-latent estimator (score_nn_baseline, vimco, ...)",
    option_help={
        "hidden_dim": "binary hidden units H (200 in the NVIL and VIMCO papers)",
        "guide_hidden": "comma-separated tanh hidden sizes of the recognition MLP ('': linear, "
                        "as NVIL's SBN recognition model)",
        "train_limit": "use only the first N training images (0: all 50,000)",
        "valid_limit": "use only the first N validation images (0: all 10,000)",
        "data": "your own binary vectors or images: a .npz or .pt file with x (N, D) or (N, "
                "H, W) in {0, 1} (docs/own-data.md); '': binarized MNIST",
    },
))
