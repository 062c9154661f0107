"""Your own model with global latents: Bayesian logistic regression with ``AutoFlow`` (an
autoguide made of the library's flows), its evidence log p(y | X) by ``log_marginal`` (the
whole-batch estimate, with its ESS and Pareto k-hat), and ``posterior_check`` against NUTS.

    python examples/own_logistic.py --out docs/figures/own_logistic.png
    python examples/own_logistic.py --quick           # the test's run

Two weights and no intercept, so that a quadrature grid over w gives the exact evidence and
posterior to compare with (the example computes it; a model with more latents has only NUTS).
"""

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from torch.utils.data import TensorDataset

from pyro_seqlatent.guides import AutoFlow
from pyro_seqlatent.infer import log_marginal, train


def model(X, y=None):
    """w ~ N(0, I), y_n ~ Bernoulli(sigmoid(x_n . w)); a plain function, as for pyro.infer.SVI.
    ``(X * w).sum(-1)`` (not ``X @ w``) broadcasts over the particles of ``log_marginal`` and
    of vectorized ELBOs: there ``w`` is ``(K, 1, 2)``, its 1 the data plate's slot."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0], dim=-1):
        return pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


def generated_data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    w_true = torch.tensor([1.5, -1.0])
    y = torch.bernoulli(torch.sigmoid(X @ w_true), generator=g)
    return X, y


def quadrature(X, y, half_width=6.0, n=401):
    """Exact log p(y | X) and the posterior on a grid over w (trapezoid-free: cell sums)."""
    grid = torch.linspace(-half_width, half_width, n, dtype=torch.double)
    w = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    logits = w @ X.double().T
    log_joint = (dist.Bernoulli(logits=logits).log_prob(y.double()).sum(-1)
                 + dist.Normal(0.0, 1.0).log_prob(w).sum(-1))
    cell = math.log(float(grid[1] - grid[0]) ** 2)
    log_evidence = float(torch.logsumexp(log_joint, 0)) + cell
    weights = (log_joint - log_joint.max()).exp()
    weights = weights / weights.sum()
    mean = (weights[:, None] * w).sum(0)
    std = ((weights[:, None] * (w - mean) ** 2).sum(0)).sqrt()
    return {"log_evidence": log_evidence, "mean": mean.float(), "std": std.float(),
            "grid": grid, "density": weights.reshape(n, n)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test's run)")
    parser.add_argument("--out", default=None, help="figure: the guide against NUTS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    X, y = generated_data()
    guide = AutoFlow(model, flow="iaf", num_flows=2)
    result = train(model, guide, TensorDataset(X, y), batch_size=len(X), lr=1e-2,
                   num_steps=300 if args.quick else args.steps, progress=False)
    est = log_marginal(model, guide, (X, y), num_samples=2000 if args.quick else 20000)
    exact = quadrature(X, y)
    out = {"steps": result.step, "log_evidence": float(est.log_marginal),
           "elbo": float(est.elbo), "exact_log_evidence": exact["log_evidence"],
           "kind": est.kind, "ess": float(est.ess), "khat": float(est.khat),
           "posterior_mean": guide.median()["w"].tolist()}
    print(f"trained {result.step} steps; log p(y | X): {out['log_evidence']:.3f} "
          f"(exact by quadrature {out['exact_log_evidence']:.3f}; ELBO {out['elbo']:.3f}; "
          f"ESS {out['ess']:.0f}, k-hat {out['khat']:.2f})")
    check = posterior_check_report(guide, X, y, args, exact)
    out.update(check)
    return out


def posterior_check_report(guide, X, y, args, exact):
    """``posterior_check`` against NUTS; the quadrature grid is the exact reference here (the
    latent is 2-D), and NUTS's own error shows against it."""
    from pyro_seqlatent.infer import posterior_check

    check = posterior_check(model, guide, (X, y), num_draws=200 if args.quick else 2000,
                            warmup_steps=100 if args.quick else 500,
                            num_particles=1000 if args.quick else 20000, figure=args.out)
    print(check.summary())
    for label, mean, std in (("exact (grid)", exact["mean"], exact["std"]),
                             ("NUTS", check.nuts_mean, check.nuts_std),
                             ("AutoFlow", check.guide_mean, check.guide_std)):
        print(f"  {label:13s} mean {[round(v, 3) for v in mean.tolist()]}  "
              f"sd {[round(v, 3) for v in std.tolist()]}")
    if args.out:
        print(f"wrote {args.out}")
    return {"energy_distance": check.energy_distance, "noise_floor": check.noise_floor,
            "evidence_gap": check.evidence_gap, "guide_mean": check.guide_mean.tolist(),
            "nuts_mean": check.nuts_mean.tolist(), "exact_mean": exact["mean"].tolist(),
            "exact_std": exact["std"].tolist(), "guide_std": check.guide_std.tolist()}


if __name__ == "__main__":
    main()
