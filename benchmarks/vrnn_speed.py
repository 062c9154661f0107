r"""SVI step time of the Pyro VRNN against a plain-PyTorch VRNN of the same networks.

Both compute the same single-sample ELBO estimate

.. math:: \hat{\mathcal L} = \sum_{b,t} m_{bt}\bigl[\log p(z_t\mid h_{t-1})
          - \log q(z_t\mid\varphi^x(x_t), h_{t-1}) + \log p(x_t\mid z_t, h_{t-1})\bigr],
          \quad z_t = \mu_q + \sigma_q\,\epsilon_t,

(the Monte Carlo KL that ``Trace_ELBO`` uses) with the same modules; one step is
``zero_grad → loss → backward → Adam step``. The plain reference is written as well as the Pyro
one (φ_x of all steps, the prior and the decoder batched outside the loop), so the ratio
measures what Pyro costs, not a difference in structure. Before timing, the script checks that
both losses agree: exactly for the same noise (same RNG draws), and in mean over many seeds.

    python benchmarks/vrnn_speed.py            # T=100, batch 64, h=64, z=16, x=88, GRU
    python benchmarks/vrnn_speed.py --json benchmarks/results/vrnn_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO

from pyro_seqlatent.infer import DeviceTrace_ELBO
from pyro_seqlatent.models.vrnn import build_vrnn, cat_broadcast


def plain_vrnn_loss(model, guide, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative single-sample ELBO of the VRNN in plain PyTorch (the reference)."""
    core, site = model.core, guide.site_guide
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    phi_x = core.phi_x(x).unbind(1)
    state = core.rnn.initial_state(x.shape[:1], x)
    h_prev, phi_z, zs, log_q = [], [], [], []
    for t in range(x.shape[1]):
        h = core.rnn.hidden(state)
        loc, scale = site.loc_scale(cat_broadcast(phi_x[t], h))
        eps = torch.empty_like(loc).normal_()  # the same draw as Normal.rsample
        z = loc + scale * eps
        log_q.append(torch.distributions.Normal(loc, scale).log_prob(z).sum(-1))
        pz = core.phi_z(z)
        zs.append(z)
        h_prev.append(h)
        phi_z.append(pz)
        state = core.step(phi_x[t], pz, state)
    h_all, phi_z_all, z_all = torch.stack(h_prev, 1), torch.stack(phi_z, 1), torch.stack(zs, 1)
    p_loc, p_scale = core.prior_params(h_all)
    log_p_z = torch.distributions.Normal(p_loc, p_scale).log_prob(z_all).sum(-1)
    log_p_x = core.emission_dist(phi_z_all, h_all).log_prob(x)
    per_step = log_p_z - torch.stack(log_q, 1) + log_p_x
    return -(per_step * mask).sum()


def make_problem(T: int, batch: int, h: int, z: int, x_dim: int, rnn: str, seed: int = 0):
    pyro.set_rng_seed(seed)
    model, guide = build_vrnn(x_dim, z_dim=z, h_dim=h, feature_dim=h, hidden_dim=h, rnn=rnn,
                              emission="bernoulli")
    x = (torch.rand(batch, T, x_dim) < 0.1).float()
    mask = torch.ones(batch, T, dtype=torch.bool)
    return model, guide, x, mask


def check_agreement(model, guide, x, mask, num_seeds: int = 200) -> dict:
    """Same seed → same loss; and the means over ``num_seeds`` seeds agree."""
    elbo = Trace_ELBO()
    exact = []
    plain_vals, pyro_vals = [], []
    with torch.no_grad():
        for s in range(num_seeds):
            pyro.set_rng_seed(s)
            a = float(plain_vrnn_loss(model, guide, x, mask))
            pyro.set_rng_seed(s)
            b = float(elbo.differentiable_loss(model, guide, x, mask))
            exact.append(abs(a - b) / abs(a))
            pyro.set_rng_seed(10_000 + s)
            plain_vals.append(float(plain_vrnn_loss(model, guide, x, mask)))
            pyro_vals.append(b)
    diff = statistics.mean(pyro_vals) - statistics.mean(plain_vals)
    se = (statistics.variance(pyro_vals) / num_seeds + statistics.variance(plain_vals)
          / num_seeds) ** 0.5
    return {"max_rel_diff_same_noise": max(exact), "mean_diff": diff, "mean_diff_se": se,
            "num_seeds": num_seeds}


def time_steps(step_fn, params, n: int) -> float:
    opt = torch.optim.Adam(params, lr=1e-4)
    for _ in range(3):
        opt.zero_grad()
        step_fn().backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(n):
        opt.zero_grad()
        step_fn().backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--h", type=int, default=64)
    parser.add_argument("--z", type=int, default=16)
    parser.add_argument("--x", type=int, default=88)
    parser.add_argument("--rnn", default="gru")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jit", action="store_true", help="also time JitTrace_ELBO")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=False,
                        help="Pyro/torch distribution validation (off when training for speed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    model, guide, x, mask = make_problem(args.T, args.batch, args.h, args.z, args.x, args.rnn)
    params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
    agreement = check_agreement(model, guide, x, mask, num_seeds=50)
    elbo = Trace_ELBO(max_plate_nesting=1)
    device_elbo = DeviceTrace_ELBO(max_plate_nesting=1)

    def pyro_step():
        return elbo.differentiable_loss(model, guide, x, mask)

    def device_step():  # the same estimator without Pyro's per-site .item()
        return device_elbo.differentiable_loss(model, guide, x, mask)

    def plain_step():
        return plain_vrnn_loss(model, guide, x, mask)

    def naive_step():
        model.core.reuse_guide_states = False
        try:
            return elbo.differentiable_loss(model, guide, x, mask)
        finally:
            model.core.reuse_guide_states = True

    variants = {"plain": plain_step, "pyro": pyro_step, "pyro_device_elbo": device_step,
                "pyro_naive": naive_step}
    if args.jit:
        jit = JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)

        def jit_step():  # the jit trace takes parameters from Pyro's param store
            model.register_params = guide.register_params = True
            try:
                return jit.differentiable_loss(model, guide, x, mask)
            finally:
                model.register_params = guide.register_params = False

        variants["pyro_jit"] = jit_step
    times = {k: [] for k in variants}
    for _ in range(args.rounds):  # interleaved rounds: the machine's load hits all alike
        for name, fn in variants.items():
            times[name].append(time_steps(fn, params, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "torch": torch.__version__, "pyro": pyro.__version__,
        "step_ms_median": {k: 1e3 * v for k, v in med.items()},
        "ratio_vs_plain": {k: med[k] / med["plain"] for k in med if k != "plain"},
        "agreement": agreement,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
