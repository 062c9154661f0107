r"""Flow density models as Pyro models: ``pyro.sample("x", flow_dist, obs=x)``, no latents.

The data ``x ∈ [0, 1)^D`` (dequantized pixels, ``x = (k + u)/L`` with ``u ~ U(0, 1)`` for ``L``
grey levels) are modelled through RealNVP's logit preprocessing:

.. math::
    x = \frac{\operatorname{sigmoid}(v) - \alpha}{1 - 2\alpha},\qquad v = f_\theta(z),\qquad
    z \sim \mathcal N(0, I)\ \text{or}\ \operatorname{Logistic}(0, 1)^{D},

with ``f_θ`` a NICE or RealNVP stack, so ``log p(x) = log p_Z(z) − log|det ∂x/∂z|``. Training
maximizes it (``Trace_ELBO`` with an empty guide is exactly −log p(x)). The reported figure is
bits per dimension of the discrete image,
``bpd = −(log p(x) − D log L) / (D log 2)`` (an upper bound through the dequantization).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import AffineTransform, SigmoidTransform
from torch.utils.data import Dataset

from pyro_seqlatent.registry import ModelSpec, register_model
from pyro_seqlatent.transforms import standard_logistic
from pyro_seqlatent.transforms.foreign import FLOW_NAMES, build_flow, is_zuko_flow

LOGIT_ALPHA = 0.05
PRIORS = ("normal", "logistic")


class FlowDensity(nn.Module):
    """A normalizing-flow density on ``[0, 1)^D``; ``forward(x)`` is the Pyro model.

    :param int dim: ``D``. :param flow: ``"nice"`` or ``"real_nvp"`` (any name of
        ``FLOW_NAMES`` works, ``"spline"`` included), or a Pyro ``TransformModule`` on ``D``-vectors
        or a factory ``f(D)`` returning one (:mod:`pyro_seqlatent.transforms.foreign`); a zuko
        flow is refused here (it holds its own base, and this density needs its prior).
    :param int num_couplings: depth. :param hidden_dims: coupling MLP sizes.
    :param str prior: ``"normal"`` or ``"logistic"`` (NICE's prior).
    """

    def __init__(self, dim: int, flow: str = "real_nvp", num_couplings: int = 6,
                 hidden_dims=(128, 128), prior: str = "normal"):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.dim, self.prior = int(dim), prior
        self.flow = build_flow(flow, self.dim, num_couplings, hidden_dims)
        if is_zuko_flow(self.flow):
            raise TypeError("flow= is a zuko flow, which brings its own base distribution; "
                            "FlowDensity needs a transform (a name or a Pyro TransformModule)")
        self.register_buffer("_zero", torch.zeros(()))

    def distribution(self) -> dist.TransformedDistribution:
        ref = self._zero
        if self.prior == "logistic":
            base = standard_logistic(self.dim, dtype=ref.dtype, device=ref.device)
        else:
            base = dist.Normal(ref.new_zeros(self.dim), 1.0).to_event(1)
        scale = 1.0 / (1.0 - 2.0 * LOGIT_ALPHA)
        to_unit = [SigmoidTransform(), AffineTransform(-LOGIT_ALPHA * scale, scale, event_dim=1)]
        return dist.TransformedDistribution(base, [self.flow, *to_unit])

    def forward(self, x: torch.Tensor) -> None:
        pyro.module("flow_density", self)
        with pyro.plate("data", x.shape[-2], dim=-1):
            pyro.sample("x", self.distribution(), obs=x)


class NoLatents(nn.Module):
    """The guide of a model without latent variables: does nothing."""

    def forward(self, *args, **kwargs) -> None:
        return None


class DequantizedImages(Dataset):
    """Integer images ``k ∈ {0..L−1}^D`` served as ``(k + u) / L``; ``fixed_noise_seed`` freezes
    ``u`` (test sets), otherwise fresh noise every access (training)."""

    def __init__(self, levels_data: torch.Tensor, levels: int, fixed_noise_seed: int | None = None):
        self.data = levels_data.to(torch.float32)
        self.levels = int(levels)
        self.noise = None
        if fixed_noise_seed is not None:
            g = torch.Generator().manual_seed(fixed_noise_seed)
            self.noise = torch.rand(self.data.shape, generator=g)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i):
        u = self.noise[i] if self.noise is not None else torch.rand(self.data.shape[1:])
        return (self.data[i] + u) / self.levels


DIGITS_LEVELS = 17  # scikit-learn's 8x8 digits take values 0..16


def digits_splits(seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits, split 1,257 / 270 / 270 by a fixed permutation."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x = x[perm]
    return {"train": x[:1257], "valid": x[1257:1527], "test": x[1527:]}


def user_data(options: dict):
    """The ``data`` file of ``options`` as vectors (docs/own-data.md;
    :func:`pyro_seqlatent.data.user_files.load_user_data`), or ``None`` (the 8x8 digits)."""
    if not options.get("data"):
        return None
    from pyro_seqlatent.data.user_files import load_user_data

    return load_user_data(options["data"], "vectors")


def user_datasets(user) -> dict[str, Dataset]:
    """A user file's splits for the density: integer levels ``k ∈ {0..L−1}`` dequantized to
    ``(k + u)/L`` (fresh ``u`` for training, fixed for valid/test, as the digits), floats in
    ``[0, 1)`` as they are; other floats raise :class:`~pyro_seqlatent.data.user_files.
    UserDataError` with the fix."""
    from pyro_seqlatent.data.user_files import UserDataError

    if user.levels is not None:
        return {split: DequantizedImages(data.x, user.levels, seed)
                for (split, data), seed in zip(user.splits.items(), (None, 1, 2))}
    low = min(float(d.x.min()) for d in user.splits.values())
    high = max(float(d.x.max()) for d in user.splits.values())
    if low < 0 or high >= 1:
        raise UserDataError(
            f"data={user.source}: key 'x' holds floats from {low} to {high}; the flow density "
            "models [0, 1)^D: save integer levels (e.g. uint8 pixels, dequantized here) or "
            "floats scaled into [0, 1), e.g. (x - x.min()) / (x.max() - x.min()) * 0.999")
    return user.datasets()


def digits_datasets(options: dict, root=None) -> dict[str, Dataset]:
    user = user_data(options)
    if user is not None:
        return user_datasets(user)
    if options.get("dataset", "digits") != "digits":
        raise ValueError(f"dataset must be 'digits', got {options.get('dataset')!r}")
    splits = digits_splits()
    return {
        "train": DequantizedImages(splits["train"], DIGITS_LEVELS),
        "valid": DequantizedImages(splits["valid"], DIGITS_LEVELS, fixed_noise_seed=1),
        "test": DequantizedImages(splits["test"], DIGITS_LEVELS, fixed_noise_seed=2),
    }


def bits_per_dim(model: FlowDensity, data: Dataset, levels: int, batch_size: int = 500) -> float:
    """``−(log p(x) − D log L) / (D log 2)`` averaged over ``data``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = torch.stack([data[i] for i in range(start, min(len(data), start + batch_size))])
            x = x.to(model._zero.device)
            total += model.distribution().log_prob(x).sum().item()
            count += x.shape[0]
    D = model.dim
    return -(total / count - D * math.log(levels)) / (D * math.log(2))


def build(options: dict):
    hidden = int(options["hidden"])
    user = user_data(options)
    model = FlowDensity(user.dim if user else 64, options["flow"],
                        int(options["num_couplings"]), (hidden, hidden), options["prior"])
    return model, NoLatents()


def generate(model: FlowDensity, num_samples: int, options: dict) -> torch.Tensor:
    with torch.no_grad():
        x = model.distribution().sample((num_samples,)).clamp(0, 1 - 1e-6)
    user = user_data(options)
    if user is None:
        return torch.floor(x * DIGITS_LEVELS).reshape(num_samples, 8, 8)
    x = x if user.levels is None else torch.floor(x * user.levels)
    return x.reshape(num_samples, *user.item_shape)


register_model(ModelSpec(
    name="flow_density",
    build=build,
    datasets=digits_datasets,
    defaults={"flow": "real_nvp", "num_couplings": 6, "hidden": 128, "prior": "normal",
              "dataset": "digits", "data": ""},
    elbo="Trace_ELBO",
    batch_plate="data",
    generate=generate,
    train_defaults={"lr": 1e-3, "batch_size": 64, "num_epochs": 100},
    demo={"num_epochs": 20, "eval": {"num_samples": 1, "max_points": 270}},
    description="NICE / RealNVP density on dequantized 8x8 digits or your own file (maximum "
                "likelihood)",
    option_help={
        "flow": "nice (additive couplings) or real_nvp (affine couplings); any flow kind works",
        "num_couplings": "number of flows (couplings for nice / real_nvp)",
        "hidden": "width of the two hidden layers of each coupling network",
        "prior": "base distribution: normal or logistic (NICE's)",
        "dataset": "digits (the 8x8 digits of scikit-learn, dequantized)",
        "data": "your own vectors or images: a .npz or .pt file with x (N, D) or (N, H, W) "
                "of integer levels (dequantized) or floats in [0, 1) (docs/own-data.md); '': "
                "digits",
    },
    option_choices={"flow": list(FLOW_NAMES), "prior": list(PRIORS), "dataset": ["digits"]},
))
