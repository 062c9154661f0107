r"""The variational autoencoder (Kingma & Welling 2014; Rezende et al. 2014) with flow guides.

Model, for each data point :math:`x_n` in the plate ``"data"``:

.. math::
    z_n \sim \mathcal N(0, I_d), \qquad
    x_n \mid z_n \sim \prod_{j} \mathrm{Bernoulli}\bigl(\sigma(f_\theta(z_n))_j\bigr)
    \quad\text{or}\quad \mathcal N\bigl(f_\theta(z_n), \operatorname{diag} s^2\bigr).

Guide: an encoder :math:`h = g_\phi(x_n)` gives the context of a *site guide* (see
:mod:`pyro_seqlatent.guides`): the mean-field Gaussian :math:`\mathcal N(\mu(h), \sigma(h)^2)` or
that Gaussian pushed through :math:`K` amortized flows (planar, radial, IAF, NICE, RealNVP).

SGVB estimators (Kingma & Welling 2014): estimator A is ``Trace_ELBO`` (Monte-Carlo KL),
estimator B is ``TraceMeanField_ELBO`` (analytic KL where it exists, i.e. for the mean-field
guide); the AEVB protocol M = 100, L = 1 is the default.

MAP for θ: ``weight_prior_scale=s`` puts :math:`\mathcal N(0, s^2)` priors on the decoder's
weights and biases (sites ``decoder.*`` outside the data plate) and the guide holds a point
estimate (``Delta``) for each, so SVI maximises
:math:`\log p(\theta) + \frac{N}{B}\sum_{n \in \text{batch}} \mathrm{ELBO}_n` (set ``num_data=N``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_seqlatent.guides import FlowGuide, HamiltonianGuide, LangevinGuide, MeanFieldGuide
from pyro_seqlatent.nn import MLP
from pyro_seqlatent.registry import ModelSpec, register_model

LIKELIHOODS = ("bernoulli", "gaussian")
GUIDES = ("meanfield", "planar", "radial", "iaf", "iaf_gated", "nice", "real_nvp")
# guides whose flow follows the model's gradient (pyro_seqlatent.guides.hamiltonian): a
# mean-field VAEGuide moved by K = num_flows Hamiltonian (HVAE) or annealed Langevin steps
MODEL_FLOWS = ("hamiltonian", "langevin")


class Decoder(nn.Module):
    """Maps ``z`` to observation parameters; weights may be passed in (MAP sampling sites)."""

    def __init__(self, latent_dim: int, hidden_dims: Sequence[int], out_dim: int):
        super().__init__()
        self.mlp = MLP(latent_dim, hidden_dims, out_dim)
        self.linears = [m for m in self.mlp.modules() if isinstance(m, nn.Linear)]

    def forward(self, z: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        if weights is None:
            return self.mlp(z)
        h = z
        for i, _ in enumerate(self.linears):
            h = F.linear(h, weights[2 * i], weights[2 * i + 1])
            if i < len(self.linears) - 1:
                h = F.relu(h)
        return h


class _Bernoulli(dist.Bernoulli):
    """``Bernoulli`` whose ``log_prob`` is torch's, the same kernel and values, without
    ``F.binary_cross_entropy_with_logits``' Python check that the (broadcast, so equal) sizes
    match: ``torch.jit`` tracing (``JitTrace_ELBO``) reports that check as a TracerWarning."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -torch.binary_cross_entropy_with_logits(logits, value, None, None, 0)  # 0: none


def _point_value(value: torch.Tensor, event_dim: int) -> torch.Tensor:
    """A global point-estimate site seen inside a particle plate carries identical copies along
    its leading dims; keep one (and refuse a real distribution over weights)."""
    extra = value.dim() - event_dim
    if extra <= 0:
        return value
    flat = value.reshape(-1, *value.shape[extra:])
    if not torch.equal(flat[:1].expand_as(flat), flat):
        raise ValueError(
            "decoder weights differ across particles: the VAE's weight sites must have point "
            "estimates (a Delta guide, as VAEGuide gives with map_decoder=True)"
        )
    return flat[0]


def _shape_of(x) -> object:
    return tuple(x.shape) if torch.is_tensor(x) else type(x).__name__


def prepare_images(x: torch.Tensor, data_dim: int, likelihood: str | None = None,
                   labels: tuple = ()) -> torch.Tensor:
    r"""The batch the VAE and its guide score: ``x`` itself for a float ``(B, data_dim)``
    batch (no copy), else ``x`` converted: images ``(B, H, W)`` or ``(B, C, H, W)`` with
    :math:`CHW` = ``data_dim`` flattened to ``(B, data_dim)``, integer or bool dtypes (``uint8``
    images, 0/1 integers) cast to torch's default float dtype with their values unchanged.
    Then :func:`check_images`. ``labels``: further entries of the batch (a dataset of ``(image,
    label)`` pairs); they must have the batch size and are otherwise ignored."""
    if torch.jit.is_tracing():
        return x
    if torch.is_tensor(x) and x.dim() > 2 and x.shape[0] > 0 and \
            math.prod(x.shape[1:]) == data_dim:
        x = x.reshape(x.shape[0], data_dim)
    if torch.is_tensor(x) and not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.get_default_dtype())
    check_images(x, data_dim, likelihood)
    for i, y in enumerate(labels):
        if torch.is_tensor(y) and y.dim() > 0 and y.shape[0] != x.shape[0]:
            raise ValueError(
                f"batch entry {i + 1} (labels?) has {y.shape[0]} rows but x has {x.shape[0]}; "
                "the VAE ignores labels, but every entry of a batch must have the batch size")
    return x


def check_images(x: torch.Tensor, data_dim: int, likelihood: str | None = None) -> None:
    """``ValueError`` naming ``x`` and the fix for a batch that is not a float ``(batch,
    data_dim)`` tensor, holds NaN/inf or, for ``likelihood="bernoulli"``, values other than 0
    and 1; shared by :class:`VAE` and :class:`VAEGuide`. One pass over a valid float batch;
    nothing while ``torch.jit`` traces (``JitTrace_ELBO`` checks its first batch before tracing,
    and a check in the trace would be frozen into a constant)."""
    if torch.jit.is_tracing():
        return
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] != data_dim:
        side = math.isqrt(data_dim)
        image = f" (images: {side}x{side} pixels)" if side * side == data_dim else ""
        raise ValueError(
            f"x must have shape (batch, {data_dim}) (flattened images{image}), got "
            f"{_shape_of(x)}; flatten each image to {data_dim} values (x.reshape(len(x), -1)) "
            f"or build the VAE and its guide with data_dim= the number of values per example")
    if x.is_floating_point():  # the usual case in one pass; the messages come from below
        if likelihood == "bernoulli":
            # x (x - 1) is exactly 0 at 0 and 1 only (NaN and inf give NaN or inf)
            if not bool(torch.count_nonzero(x * (x - 1))):
                return
        elif bool(torch.isfinite(x.sum())):  # only a NaN/inf (or an overflow) is not
            return
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values; drop or impute those examples first "
                         "(the VAE has no missing-value mask)")
    if likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
        raise ValueError(
            "x must be binary (0/1) for the Bernoulli decoder; binarize the data (e.g. "
            "(x > 0.5).float(), or x / 255 > 0.5 for 8-bit images) or use likelihood='gaussian'"
        )


class VAE(nn.Module):
    """The generative model ``p(x, z)``; ``forward(x)`` with ``x`` of shape ``(B, data_dim)``.

    :param likelihood: ``"bernoulli"`` (binary data) or ``"gaussian"``.
    :param obs_scale: Gaussian observation std; ``None`` learns one per pixel.
    :param weight_prior_scale: if set, MAP mode with ``N(0, s²)`` priors on decoder parameters.
    :param num_data: dataset size; when set, the data plate scales the likelihood (and the KL)
        by ``N/B`` so that the weight prior counts once per dataset, as MAP needs.
    """

    def __init__(self, data_dim: int = 784, latent_dim: int = 40,
                 hidden_dims: Sequence[int] = (400,), likelihood: str = "bernoulli",
                 obs_scale: float | None = None, weight_prior_scale: float | None = None,
                 num_data: int | None = None):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r}: use one of {LIKELIHOODS}")
        self.data_dim, self.latent_dim, self.likelihood = data_dim, latent_dim, likelihood
        self.decoder = Decoder(latent_dim, hidden_dims, data_dim)
        self.obs_scale = obs_scale
        if likelihood == "gaussian" and obs_scale is None:
            self.log_obs_scale = nn.Parameter(torch.zeros(data_dim))
        self.weight_prior_scale = weight_prior_scale
        self.num_data = num_data

    def weight_sites(self) -> list[tuple[str, torch.Size]]:
        """Names and shapes of the decoder's parameter sites (MAP mode)."""
        out = []
        for i, linear in enumerate(self.decoder.linears):
            out += [(f"decoder.{i}.weight", linear.weight.shape),
                    (f"decoder.{i}.bias", linear.bias.shape)]
        return out

    def check_data(self, x: torch.Tensor) -> None:
        """``ValueError`` for a batch of the wrong shape, with NaN/inf or, for the Bernoulli
        decoder, values other than 0 and 1 (see :func:`check_images`)."""
        check_images(x, self.data_dim, self.likelihood)

    def observation(self, z: torch.Tensor, weights=None) -> dist.Distribution:
        out = self.decoder(z, weights)
        if self.likelihood == "bernoulli":
            return _Bernoulli(logits=out, validate_args=False).to_event(1)
        scale = (self.log_obs_scale.exp() if self.obs_scale is None
                 else out.new_tensor(self.obs_scale))
        return dist.Normal(out, scale).to_event(1)

    def _weights(self):
        if self.weight_prior_scale is None:
            return None
        weights = []
        for name, shape in self.weight_sites():
            prior = dist.Normal(0.0, self.weight_prior_scale).expand(shape).to_event(len(shape))
            weights.append(_point_value(pyro.sample(name, prior), len(shape)))
        return weights

    def forward(self, x: torch.Tensor, *labels) -> torch.Tensor:
        """Score a batch ``x`` ``(B, data_dim)`` (images ``(B, H, W)`` or ``(B, C, H, W)`` and
        integer dtypes are converted by :func:`prepare_images`); extra batch entries such as
        labels (a dataset of ``(image, label)`` pairs) are ignored: the VAE is unsupervised."""
        x = prepare_images(x, self.data_dim, self.likelihood, labels)
        weights = self._weights()
        with _data_plate(x, self.num_data):
            loc = x.new_zeros(self.latent_dim)  # scale a tensor too: no constant in a JIT trace
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", self.observation(z, weights), obs=x)
        return z

    @torch.no_grad()
    def generate(self, num_samples: int) -> torch.Tensor:
        r"""Means of :math:`p(x \mid z)` for ``z ~ p(z)`` (Bernoulli probabilities for binary
        data): the usual way to show VAE samples."""
        device = next(self.parameters()).device
        z = torch.randn(num_samples, self.latent_dim, device=device)
        fn = self.observation(z).base_dist
        return fn.probs if self.likelihood == "bernoulli" else fn.loc


def _data_plate(x: torch.Tensor, num_data: int | None):
    batch = x.shape[-2]
    if num_data is None:
        return pyro.plate("data", batch)
    return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))


class VAEGuide(nn.Module):
    """``q(z | x)``: an MLP encoder and a site guide (mean-field or flow) for ``"z"``.

    :param guide: ``"meanfield"`` or a flow kind (``planar, radial, iaf, iaf_gated, nice,
        real_nvp``) with ``num_flows`` flows.
    :param map_decoder: also hold point estimates for the model's decoder sites (MAP mode).
    """

    def __init__(self, data_dim: int = 784, latent_dim: int = 40,
                 hidden_dims: Sequence[int] = (400,), guide: str = "meanfield",
                 num_flows: int = 4, model: VAE | None = None, map_decoder: bool = False):
        super().__init__()
        if guide not in GUIDES:
            raise ValueError(f"guide={guide!r}: use one of {GUIDES}")
        if not hidden_dims:
            raise ValueError("hidden_dims must have at least one layer (the context size)")
        context = hidden_dims[-1]
        self.encoder = nn.Sequential(MLP(data_dim, hidden_dims[:-1], context), nn.ReLU())
        if guide == "meanfield":
            self.site = MeanFieldGuide(context, latent_dim)
        else:
            self.site = FlowGuide(context, latent_dim, flow=guide, num_flows=num_flows)
        self.num_data = model.num_data if model is not None else None
        self.data_dim = data_dim
        #: the model's likelihood when built with ``model=`` (the guide then refuses non-binary
        #: data for a Bernoulli model too); ``None``: shape, dtype and finite values only
        self.likelihood = model.likelihood if model is not None else None
        self.map_names: list[str] = []
        if map_decoder:
            if model is None or model.weight_prior_scale is None:
                raise ValueError("map_decoder=True needs the model built with weight_prior_scale")
            # The point estimates ARE the model decoder's parameters (shared tensors), so the
            # trained weights are where model.generate / sample / plots look for them.
            self.map_values = nn.ParameterList(
                [p for m in model.decoder.linears for p in (m.weight, m.bias)])
            self.map_names = [name for name, _ in model.weight_sites()]

    def forward(self, x: torch.Tensor, *labels) -> torch.Tensor:
        """``z ~ q(z | x)`` for the batch ``x`` (converted and checked as the model does it, by
        :func:`prepare_images`, so bad data gets the same message before the encoder runs);
        labels are ignored."""
        x = prepare_images(x, self.data_dim, self.likelihood, labels)
        for name, value in zip(self.map_names, getattr(self, "map_values", [])):
            pyro.sample(name, dist.Delta(value, event_dim=value.dim()))
        with _data_plate(x, self.num_data):
            return self.site.sample("z", self.encoder(x))


# ----------------------------------------------------------------------------- registration


def build(options: dict) -> tuple[VAE, VAEGuide]:
    hidden = tuple(int(h) for h in str(options["hidden_dims"]).split(",") if h)
    map_mode = options["weight_prior_scale"] > 0
    user = user_data(options)
    dim = user.dim if user else 784
    num_train = len(user.splits["train"]) if user else \
        min(options["train_limit"] or 50000, 50000)
    model = VAE(dim, options["latent_dim"], hidden, "bernoulli",
                weight_prior_scale=options["weight_prior_scale"] if map_mode else None,
                num_data=num_train if map_mode else None)
    kind = options["guide"]
    guide = VAEGuide(dim, options["latent_dim"], hidden,
                     "meanfield" if kind in MODEL_FLOWS else kind, options["num_flows"],
                     model=model, map_decoder=map_mode)
    if kind in MODEL_FLOWS:
        wrapper = HamiltonianGuide if kind == "hamiltonian" else LangevinGuide
        guide = wrapper(model, guide, options["latent_dim"], steps=options["num_flows"])
    return model, guide


def user_data(options: dict):
    """The ``data`` file of ``options`` as binary vectors (docs/own-data.md;
    :func:`pyro_seqlatent.data.user_files.load_user_data`), or ``None`` (binarized MNIST)."""
    if not options.get("data"):
        return None
    from pyro_seqlatent.data.user_files import load_user_data

    return load_user_data(options["data"], "vectors", binary=True)


def datasets(options: dict, root=None) -> dict:
    user = user_data(options)
    if user is not None:
        return user.first(train=options["train_limit"], valid=options["valid_limit"])
    from pyro_seqlatent.data.mnist import BinarizedMNIST

    limit = options["train_limit"] or None
    return {"train": BinarizedMNIST("train", root, limit=limit),
            "valid": BinarizedMNIST("valid", root, limit=options["valid_limit"] or None),
            "test": BinarizedMNIST("test", root)}


def generate(model: VAE, num_samples: int, options: dict) -> torch.Tensor:
    user = user_data(options)
    shape = user.item_shape if user else (28, 28)
    return model.generate(num_samples).reshape(num_samples, *shape)


def _image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    n = images.shape[0]
    cols = math.ceil(n / rows)
    grid = images.new_ones(rows * 28, cols * 28)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = images[i].reshape(28, 28)
    return grid


def plot(model: VAE, guide: VAEGuide, data: dict, options: dict, out_dir) -> list:
    """Samples, reconstructions and (for a 2-D latent) the latent-space manifold grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        x = torch.stack([data["test"][i] for i in range(16)]).to(device)
        z = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["value"]  # any guide's draw
        recon = model.observation(z).base_dist.probs
        panels = [("test images", x), ("reconstructions (mean of p(x|z), z ~ q(z|x))", recon),
                  ("samples (mean of p(x|z), z ~ p(z))", model.generate(16))]
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
        for ax, (title, imgs) in zip(axes, panels):
            ax.imshow(_image_grid(imgs.cpu(), 4), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        paths.append(out_dir / "vae_samples.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        if model.latent_dim == 2:
            from scipy.stats import norm

            n = 15
            grid = torch.tensor(norm.ppf(torch.linspace(0.05, 0.95, n).numpy()),
                                dtype=torch.float32)
            zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), -1)
            imgs = model.observation(zz.reshape(-1, 2).to(device)).base_dist.probs.cpu()
            fig, ax = plt.subplots(figsize=(6, 6))
            ax.imshow(_image_grid(imgs, n), cmap="gray_r")
            ax.set_title("2-D latent manifold: decoder means on a grid of Φ⁻¹ quantiles")
            ax.axis("off")
            paths.append(out_dir / "vae_manifold.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    return paths


register_model(ModelSpec(
    name="vae",
    build=build,
    datasets=datasets,
    defaults={
        "latent_dim": 40,
        "hidden_dims": "400",
        "guide": "meanfield",
        "num_flows": 4,
        "weight_prior_scale": 0.0,
        "train_limit": 0,
        "valid_limit": 2000,
        "data": "",
    },
    elbo="Trace_ELBO",
    generate=generate,
    plot=plot,
    train_defaults={"batch_size": 100, "lr": 1e-3, "valid_every": 500, "clip_norm": 100.0},
    demo={
        "options": {"latent_dim": 2, "guide": "iaf", "num_flows": 2, "valid_limit": 1000},
        "train": {"num_steps": 1500, "batch_size": 100, "lr": 2e-3, "valid_every": 500},
        "eval": {"num_samples": 200, "max_points": 500},
    },
    description="VAE on statically binarized MNIST with mean-field or flow guides",
    option_help={
        "latent_dim": "size of z",
        "hidden_dims": "comma-separated hidden sizes of encoder and decoder",
        "guide": f"site guide for z: one of {', '.join(GUIDES + MODEL_FLOWS)} (the last two: "
                 "a mean-field guide moved by the model's gradient, K = num_flows steps)",
        "num_flows": "K, the number of flows of a flow guide (leapfrog / Langevin steps)",
        "weight_prior_scale": "> 0: MAP mode with N(0, s^2) priors on decoder weights",
        "train_limit": "use only the first N training images (0: all 50,000)",
        "valid_limit": "use only the first N validation images (0: all 10,000)",
        "data": "your own binary vectors or images: a .npz or .pt file with x (N, D) or (N, "
                "H, W) in {0, 1} (docs/own-data.md); '': binarized MNIST",
    },
    option_choices={"guide": list(GUIDES + MODEL_FLOWS)},
))
