"""Gradient estimators on a discrete latent: a Gaussian mixture with one categorical assignment
per data point (docs/estimators.md, "Discrete latents").

What it does, in about ten seconds on one CPU thread:

1. runs the estimator lab's default set on the pair (``compare_estimators``): the estimators
   that need reparameterizable sites (``analytic_kl``, ``stl``, ``iwae``, ``dreg``) are listed
   as not applicable with the reason, ``reparam`` is noted to be the score function here;
2. checks each estimator's mean gradient against the exact gradient, computed by summing over
   the three assignments of every point (``exact_bound``), and prints the relative error and the
   largest deviation in standard errors (the Concrete relaxation, with ``--one-hot``, is biased);
3. trains the pair with ``reparam`` (score function), ``vimco`` and ``enum`` and prints the exact
   ELBO per point reached by each.

Run::

    python examples/discrete_estimators.py            # report in runs/discrete-estimators
    python examples/discrete_estimators.py --one-hot  # OneHotCategorical: concrete applies too

``make_pair`` is also a ``--pair`` for the command line::

    pyro-seqlatent compare-estimators --pair examples.discrete_estimators:make_pair \\
        --pretrain-steps 0 --num-draws 100 --batch-size 50
"""

from __future__ import annotations

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_seqlatent.infer import train
from pyro_seqlatent.infer.estimators import (
    ESTIMATORS,
    compare_estimators,
    exact_bound,
    make_estimator,
    write_report,
)


class Mixture(nn.Module):
    """z_n ~ Categorical(softmax(π)), x_n | z_n ~ N(μ_{z_n}, σ²); ``one_hot`` writes z_n as a
    one-hot vector (``z @ μ``), which the Concrete relaxation needs."""

    def __init__(self, k: int = 3, one_hot: bool = False):
        super().__init__()
        self.pi = nn.Parameter(torch.zeros(k))
        self.locs = nn.Parameter(torch.linspace(-1.0, 1.0, k))
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.one_hot = one_hot

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            if self.one_hot:
                z = pyro.sample("z", dist.OneHotCategorical(logits=self.pi))
                loc = z @ self.locs
            else:
                z = pyro.sample("z", dist.Categorical(logits=self.pi))
                loc = self.locs[z]
            pyro.sample("x", dist.Normal(loc, self.log_scale.exp()), obs=x)


class AssignmentGuide(nn.Module):
    """q(z_n | x_n) = Categorical(softmax(a x_n + b x_n² + c)): an amortized guide."""

    def __init__(self, k: int = 3, one_hot: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(k))
        self.b = nn.Parameter(torch.zeros(k))
        self.c = nn.Parameter(torch.zeros(k))
        self.one_hot = one_hot

    def forward(self, x):
        x = x.unsqueeze(-1)
        logits = self.a * x + self.b * x**2 + self.c
        with pyro.plate("data", x.shape[0]):
            cls = dist.OneHotCategorical if self.one_hot else dist.Categorical
            pyro.sample("z", cls(logits=logits))


def make_data(n: int = 200, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([-2.5, 0.0, 2.0])
    z = torch.randint(0, 3, (n,), generator=gen)
    return centres[z] + 0.6 * torch.randn(n, generator=gen)


def make_pair(n: str = "200", one_hot: str = "false"):
    """``(model, guide, train_data)`` for ``compare-estimators --pair``."""
    flag = str(one_hot).lower() in ("1", "true", "yes")
    return Mixture(one_hot=flag), AssignmentGuide(one_hot=flag), make_data(int(n))


def _exact_grad(model, guide, x, k: int) -> torch.Tensor:
    """∇(−Σ_n bound_K(x_n)): per data point, as the estimators weight it."""
    bound = sum(exact_bound(model, guide, x[n:n + 1], num_particles=k) for n in range(len(x)))
    params = list(model.parameters()) + list(guide.parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(-bound, params)])


def check_against_exact(stats, model, guide, batch, num_particles: int) -> dict[str, dict]:
    """Relative error ‖E g − ∇‖/‖∇‖ and the largest |E g_i − ∇_i| / s.e. of each estimator."""
    exact = {1: _exact_grad(model, guide, batch, 1),
             num_particles: _exact_grad(model, guide, batch, num_particles)}
    rows = {}
    for name, st in stats.items():
        spec = ESTIMATORS[name]
        ref = exact[num_particles if spec.bound == "iwae" else 1].double()
        mean = torch.cat([st.groups["model"].mean, st.groups["guide"].mean]).double()
        sem = torch.cat([st.groups["model"].sem, st.groups["guide"].sem]).double()
        exact_draws = bool((sem == 0).all())  # enum: no noise, so no standard error
        rows[name] = {"bound": spec.bound,
                      "relative_error": float((mean - ref).norm() / ref.norm()),
                      "max_z": math.nan if exact_draws else float(((mean - ref).abs()
                                                                   / sem).max()),
                      "guide_variance": float(st.groups["guide"].var.mean())}
    return rows


def _elbo_per_point(model, guide, x) -> float:
    with torch.no_grad():
        return float(sum(exact_bound(model, guide, x[n:n + 1]) for n in range(len(x)))) / len(x)


def train_each(names, x, one_hot: bool, steps: int, num_particles: int) -> dict[str, float]:
    out = {}
    for name in names:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = Mixture(one_hot=one_hot), AssignmentGuide(one_hot=one_hot)
        spec = ESTIMATORS[name]
        est = make_estimator(name, num_particles if spec.multi_sample else None)
        train(model, guide, x, elbo=est, num_steps=steps, batch_size=50, lr=0.05,
              progress=False, seed=0)
        out[name] = _elbo_per_point(model, guide, x)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-hot", action="store_true", help="OneHotCategorical sites")
    parser.add_argument("--quick", action="store_true", help="fewer draws and steps (tests)")
    parser.add_argument("--out", default="runs/discrete-estimators", help="report folder")
    args = parser.parse_args(argv)
    draws, steps, k = (40, 40, 3) if args.quick else (100, 200, 5)
    pyro.set_rng_seed(0)
    model, guide, x = make_pair(one_hot=str(args.one_hot))
    batch = x[:50]
    stats = compare_estimators(model, guide, batch, num_draws=draws, num_particles=k,
                               warmup=20 if args.quick else None)
    report = write_report(args.out, "Estimators on a Gaussian mixture", stats,
                          notes=f"{draws} draws per estimator on 50 points; K = {k}.")
    print(f"ran: {', '.join(stats)}")
    for name, reason in stats.skipped.items():
        print(f"not run: {name}: {reason}")
    checks = check_against_exact(stats, model, guide, batch, k)
    print(f"\n{'estimator':<20}{'bound':>7}{'rel. error':>12}{'max |z|':>10}{'guide var':>12}")
    for name, row in checks.items():
        print(f"{name:<20}{row['bound']:>7}{row['relative_error']:>12.3g}{row['max_z']:>10.2f}"
              f"{row['guide_variance']:>12.3g}")
    trained = train_each(["reparam", "vimco", "enum"], x, args.one_hot, steps, k)
    start = _elbo_per_point(Mixture(one_hot=args.one_hot), AssignmentGuide(one_hot=args.one_hot),
                            x)
    print(f"\nexact ELBO per point: initial {start:.3f}; after {steps} steps: "
          + ", ".join(f"{n} {v:.3f}" for n, v in trained.items()))
    print(f"report: {report}")
    return {"ran": list(stats), "skipped": dict(stats.skipped), "checks": checks,
            "trained": trained, "initial_elbo": start, "report": str(report)}


if __name__ == "__main__":
    main()
