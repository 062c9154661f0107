"""Your own sequence model: a deep Markov model written by hand, with the library's FlowGuide
(conditional IAFs) as the guide of every step, trained by ``pyro_seqlatent.infer.train``,
scored by ``log_marginal`` (importance-sampled log p(x)) and by the forecast path (CRPS of
held-out continuations, quantile bands, figure).

    python examples/own_dmm.py --out docs/figures/own_dmm_forecast.png      # generated data
    PYRO_SEQLATENT_DATA=../shared/data python examples/own_dmm.py --data jsb --steps 1000
    python examples/own_dmm.py --quick                                        # the test's run

The model (Krishnan et al. 2017, as Pyro's examples/dmm.py, in 60 lines):
    z_t ~ N(loc(z_{t-1}), scale(z_{t-1})),  x_t ~ p(x_t | z_t)  (Gaussian or Bernoulli)
and the guide q(z_t | z_{t-1}, a_t), a_t a backward GRU state over x_{t:T}, a FlowGuide per
step whose context is [z_{t-1}, a_t]. It follows the forecast protocol
(``pyro_seqlatent.models.sequence_forecast``): ``guide(x, mask)``, ``model(x, mask, horizon=H)``.
"""

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_seqlatent.data.sequences import SequenceDataset, pad_collate
from pyro_seqlatent.guides import FlowGuide
from pyro_seqlatent.infer import log_marginal, train
from pyro_seqlatent.models.sequence_forecast import forecast_scores, plot_forecast
from pyro_seqlatent.nn import MLP


class DMM(nn.Module):
    """p(x_{1:T}, z_{1:T}); ``model(x, mask, horizon=H)`` also continues each sequence."""

    def __init__(self, x_dim, z_dim=4, hidden=32, emission="gaussian"):
        super().__init__()
        self.z_dim, self.emission = z_dim, emission
        self.trans = MLP(z_dim, (hidden,), 2 * z_dim)  # z_{t-1} -> (loc, scale) of z_t
        self.emit = MLP(z_dim, (hidden,), x_dim if emission == "bernoulli" else 2 * x_dim)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))

    def p_z(self, z_prev):
        loc, raw = self.trans(z_prev).chunk(2, -1)
        return dist.Normal(z_prev + loc, nn.functional.softplus(raw) + 1e-3).to_event(1)

    def p_x(self, z):
        if self.emission == "bernoulli":
            return dist.Bernoulli(logits=self.emit(z)).to_event(1)
        loc, raw = self.emit(z).chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-2).to_event(1)

    def forward(self, x, mask, horizon=0):
        z, future = self.z_0.expand(x.shape[0], -1), []
        with pyro.plate("data", x.shape[0], dim=-1):
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t}", self.p_z(z).mask(mask[:, t]))
                pyro.sample(f"x_{t}", self.p_x(z).mask(mask[:, t]), obs=x[:, t])
            for t in pyro.markov(range(x.shape[1], x.shape[1] + horizon)):
                z = pyro.sample(f"z_{t}", self.p_z(z))
                future.append(pyro.sample(f"x_{t}", self.p_x(z)))
        if not future:
            return x
        new = torch.stack(future, -2)
        return torch.cat([x.expand(new.shape[:-2] + x.shape[-2:]), new], -2)


class DMMGuide(nn.Module):
    """q(z_t | z_{t-1}, a_t) = FlowGuide([z_{t-1}, a_t]) with ``num_flows`` conditional IAFs."""

    def __init__(self, x_dim, z_dim=4, rnn_dim=32, num_flows=2):
        super().__init__()
        self.rnn = nn.GRU(x_dim, rnn_dim, batch_first=True)
        self.site = FlowGuide(z_dim + rnn_dim, z_dim, flow="iaf", num_flows=num_flows,
                              hidden_dims=(rnn_dim,))
        self.z_0 = nn.Parameter(torch.zeros(z_dim))

    def forward(self, x, mask, horizon=0):
        a = self.rnn(x.flip(1))[0].flip(1)  # a_t has read x_{t:T} (padding at the end only
        z = self.z_0.expand(x.shape[0], -1)  # reaches the padded steps, which are masked)
        with pyro.plate("data", x.shape[0], dim=-1):
            for t in pyro.markov(range(x.shape[1])):
                batch = torch.broadcast_shapes(z.shape[:-1], a.shape[:1])  # (particles, B)
                context = torch.cat([z.expand(batch + z.shape[-1:]),
                                     a[:, t].expand(batch + a.shape[-1:])], -1)
                z = pyro.sample(f"z_{t}", self.site(context).mask(mask[:, t]))


def generated_sequences(n, length=40, seed=0):
    """Noisy 2-D rotations of random frequency, phase and amplitude: (length, 2) each."""
    g = torch.Generator().manual_seed(seed)
    omega = 0.25 + 0.35 * torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    amp = 0.5 + torch.rand(n, 1, generator=g)
    angle = omega * torch.arange(length) + phase
    x = amp[..., None] * torch.stack([angle.sin(), angle.cos()], -1)
    return list(x + 0.05 * torch.randn(x.shape, generator=g))


def datasets(data, quick):
    if data == "jsb":
        from pyro_seqlatent.data.jsb import load_jsb_splits

        splits = load_jsb_splits(max_sequences=8 if quick else None)
        return splits["train"], splits["test"], 88, "bernoulli"
    n = 64 if quick else 512
    return (SequenceDataset(generated_sequences(n)), SequenceDataset(
        generated_sequences(32 if quick else 128, seed=1)), 2, "gaussian")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="generated", choices=["generated", "jsb"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test's run)")
    parser.add_argument("--out", default=None, help="forecast figure (.png)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    train_set, test_set, x_dim, emission = datasets(args.data, args.quick)
    model = DMM(x_dim, emission=emission)
    guide = DMMGuide(x_dim)
    result = train(model, guide, train_set, collate_fn=pad_collate, lr=3e-3, batch_size=32,
                   num_steps=5 if args.quick else args.steps, clip_norm=10.0, progress=False)
    test = [test_set[i] for i in range(min(len(test_set), 16 if args.quick else 64))]
    est = log_marginal(model, guide, pad_collate(test), num_samples=8 if args.quick else 200)
    steps = sum(len(s) for s in test)
    prefix, horizon = (10, 5) if args.quick else (20, 20)
    scores = forecast_scores(model, guide, test, prefix, horizon,
                             num_samples=10 if args.quick else 200)
    out = {"steps": result.step, "train_loss": result.final_loss,
           "log_px_per_step": float(est.log_marginal.sum()) / steps,
           "elbo_per_step": float(est.elbo.sum()) / steps, **scores}
    print(f"trained {result.step} steps; test log p(x)/step {out['log_px_per_step']:.3f} "
          f"(ELBO/step {out['elbo_per_step']:.3f}); forecast {horizon} steps after {prefix}: "
          f"CRPS {scores['crps']:.3f}, MAE of the mean {scores['mae_of_mean']:.3f}, "
          f"90 % band coverage {scores['coverage_90']:.2f}")
    if args.out:
        feature = None if emission == "bernoulli" else 0
        plot_forecast(model, guide, test, prefix, horizon, args.out, feature=feature,
                      num_samples=10 if args.quick else 200,
                      ylabel="notes sounding" if emission == "bernoulli" else "x[0]")
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
