r"""What the speed benchmarks share: paired interleaved timing rounds, and plain-PyTorch twins of
the project's models (the same networks and the same single-sample ELBO, written directly).

Used by ``overhead.py`` and ``vrnn_speed.py``. A speed figure on a shared machine is the median
of paired rounds with its range: every round runs each variant once, back to back, the order
reversed every other round (A B, B A, A B, ...), so that the machine's load and drift hit them
alike; each variant's ratio to the reference is taken within a round, and the figures are the
median and min–max of those ratios over the rounds.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def fix_threads(threads: int) -> None:
    """Run torch on ``threads`` threads (intra- and inter-op); ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS`` are set too, for libraries that read them later."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work has started: leave it
        pass


def spread(values: list[float]) -> dict:
    """``{"median", "min", "max", "values"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": list(values)}


def paired_rounds(variants: dict[str, Callable[[], tuple[float, float]]], rounds: int,
                  reference: str) -> dict:
    """Run every variant once per round, in the given order on even rounds and reversed on odd
    ones; a variant returns its ``(wall, cpu)`` seconds per step. Returns ``{"rounds",
    "wall": {"ms_per_step": {name: spread}, "ratio": {name: spread of the per-round ratio to
    reference}}, "cpu": {the same for process CPU time}}``."""
    if reference not in variants:
        raise ValueError(f"reference {reference!r} is not one of {sorted(variants)}")
    names = list(variants)
    seconds: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name].append(tuple(variants[name]()))
    out: dict = {"rounds": rounds}
    for i, clock in enumerate(("wall", "cpu")):
        per = {k: [v[i] for v in vals] for k, vals in seconds.items()}
        out[clock] = {
            "ms_per_step": {k: spread([1e3 * s for s in v]) for k, v in per.items()},
            "ratio": {k: spread([a / b for a, b in zip(per[k], per[reference])])
                      for k in names if k != reference}}
    return out


def ratio_text(s: dict, digits: int = 2) -> str:
    """``"1.23x (1.10–1.31)"``: a spread's median and range."""
    return f"{s['median']:.{digits}f}x ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def ms_text(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


class TensorBatches:
    """What a plain PyTorch loop does for batches: a fresh permutation each epoch and one
    ``index_select`` per tensor and batch (an epoch's last, shorter batch kept). ``next()``
    gives a tensor, or a list with several tensors."""

    def __init__(self, tensors: torch.Tensor | Sequence[torch.Tensor], batch_size: int,
                 seed: int = 0):
        self.tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
        self.n, self.batch_size = len(self.tensors[0]), batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(self.n, generator=self.generator), 0

    def next(self) -> torch.Tensor | list[torch.Tensor]:
        if self.at >= self.n:
            self.order, self.at = torch.randperm(self.n, generator=self.generator), 0
        index = self.order[self.at:self.at + self.batch_size]
        self.at += self.batch_size
        batch = [t.index_select(0, index) for t in self.tensors]
        return batch[0] if len(batch) == 1 else batch


class Clocks:
    """Wall and process CPU time since ``start()``."""

    def start(self) -> None:
        self.t0 = (time.perf_counter(), time.process_time())

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]


def timed_steps(loss_fn: Callable[[], torch.Tensor], params, steps: int, warmup: int = 2,
                lr: float = 1e-3) -> tuple[float, float]:
    """``(wall, cpu)`` seconds per ``zero_grad → loss_fn() → backward → Adam step`` over
    ``steps`` steps after ``warmup`` untimed ones (a fresh Adam, as a training run starts
    with)."""
    optimizer = torch.optim.Adam(params, lr=lr)
    clocks = Clocks()
    for i in range(warmup + steps):
        if i == warmup:
            clocks.start()
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    wall, cpu = clocks.since()
    return wall / steps, cpu / steps


# ------------------------------------------------------------------------------- the VAE twin
def plain_vae_loss(model, guide, x: torch.Tensor) -> torch.Tensor:
    r"""Negative single-sample ELBO of :class:`pyro_seqlatent.models.vae.VAE` (Bernoulli, no
    MAP weights) with a mean-field :class:`~pyro_seqlatent.models.vae.VAEGuide`, in plain
    PyTorch: :math:`-\sum_n [\log p(x_n\mid z_n) + \log p(z_n) - \log q(z_n\mid x_n)]` with
    :math:`z_n = \mu + \sigma\epsilon_n` (the Monte Carlo KL that ``Trace_ELBO`` uses), the
    same networks and the same noise draw as ``Normal.rsample``."""
    from pyro_seqlatent.guides.site import MIN_SCALE

    loc, raw = guide.site.net(guide.encoder(x)).chunk(2, dim=-1)
    scale = F.softplus(raw) + MIN_SCALE
    eps = torch.empty_like(loc).normal_()
    z = loc + scale * eps
    log_q = (-0.5 * eps.pow(2) - scale.log() - LOG_SQRT_2PI).sum(-1)
    log_p_z = (-0.5 * z.pow(2) - LOG_SQRT_2PI).sum(-1)
    logits = model.decoder.mlp(z)
    log_p_x = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    return -(log_p_x + log_p_z - log_q).sum()


# ------------------------------------------------------------------------------ the VRNN twin
def make_vrnn_problem(T: int, batch: int, h: int, z: int, x_dim: int, rnn: str = "gru",
                      seed: int = 0):
    """A VRNN of hidden size ``h`` (features and MLP layers too), latent ``z``, Bernoulli
    emissions over ``x_dim`` (JSB's shapes: x = 88), and one batch of sparse binary frames with
    a full mask."""
    import pyro

    from pyro_seqlatent.models.vrnn import build_vrnn

    pyro.set_rng_seed(seed)
    model, guide = build_vrnn(x_dim, z_dim=z, h_dim=h, feature_dim=h, hidden_dim=h, rnn=rnn,
                              emission="bernoulli")
    x = (torch.rand(batch, T, x_dim) < 0.1).float()
    mask = torch.ones(batch, T, dtype=torch.bool)
    return model, guide, x, mask


def plain_vrnn_loss(model, guide, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Negative single-sample ELBO of the VRNN in plain PyTorch (the reference):

    .. math:: \hat{\mathcal L} = \sum_{b,t} m_{bt}\bigl[\log p(z_t\mid h_{t-1})
              - \log q(z_t\mid\varphi^x(x_t), h_{t-1}) + \log p(x_t\mid z_t, h_{t-1})\bigr],
              \quad z_t = \mu_q + \sigma_q\,\epsilon_t,

    with the model's and guide's modules. Only the recurrence runs in the time loop (q's
    network, :math:`\varphi^z` and the RNN cell, which depend on :math:`z_{<t}`); φ_x of all
    steps, log q, the prior and the decoder run batched outside it."""
    from pyro_seqlatent.models.vrnn import cat_broadcast

    core, site = model.core, guide.site_guide
    if not bool(mask.all()):  # padding: zeroed, as the model does
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    phi_x = core.phi_x(x).unbind(1)
    state = core.rnn.initial_state(x.shape[:1], x)
    h_prev, phi_z, zs, locs, scales = [], [], [], [], []
    for t in range(x.shape[1]):
        h = core.rnn.hidden(state)
        loc, scale = site.loc_scale(cat_broadcast(phi_x[t], h))
        eps = torch.empty_like(loc).normal_()  # the same draw as Normal.rsample
        z = loc + scale * eps
        pz = core.phi_z(z)
        zs.append(z)
        locs.append(loc)
        scales.append(scale)
        h_prev.append(h)
        phi_z.append(pz)
        state = core.step(phi_x[t], pz, state)
    h_all, phi_z_all, z_all = torch.stack(h_prev, 1), torch.stack(phi_z, 1), torch.stack(zs, 1)
    log_q = torch.distributions.Normal(torch.stack(locs, 1), torch.stack(scales, 1)).log_prob(
        z_all).sum(-1)
    p_loc, p_scale = core.prior_params(h_all)
    log_p_z = torch.distributions.Normal(p_loc, p_scale).log_prob(z_all).sum(-1)
    log_p_x = core.emission_dist(phi_z_all, h_all).log_prob(x)
    per_step = log_p_z - log_q + log_p_x
    return -(per_step * mask).sum()


def agreement(plain: Callable[[], torch.Tensor], pyro_loss: Callable[[], torch.Tensor],
              num_seeds: int = 50) -> dict:
    """Whether two single-sample estimators are the same: the largest relative difference of
    their values for the same noise (the same seed), and the difference of their means over
    ``num_seeds`` independent seeds with its standard error."""
    import pyro

    exact, plain_vals, pyro_vals = [], [], []
    with torch.no_grad():
        for s in range(num_seeds):
            pyro.set_rng_seed(s)
            a = float(plain())
            pyro.set_rng_seed(s)
            b = float(pyro_loss())
            exact.append(abs(a - b) / abs(a))
            pyro.set_rng_seed(10_000 + s)
            plain_vals.append(float(plain()))
            pyro_vals.append(b)
    diff = statistics.mean(pyro_vals) - statistics.mean(plain_vals)
    se = (statistics.variance(pyro_vals) / num_seeds
          + statistics.variance(plain_vals) / num_seeds) ** 0.5
    return {"max_rel_diff_same_noise": max(exact), "mean_diff": diff, "mean_diff_se": se,
            "num_seeds": num_seeds}
