r"""Fit every flow to Rezende & Mohamed's 2-D energies U1–U4 by reverse KL.

For a target ``p(z) = exp(−U(z)) / Z`` and a flow ``q`` on a standard-normal base we minimise

.. math:: \mathrm{KL}(q\,\|\,p) = \mathbb E_{q}[\log q(z) + U(z)] + \log Z,

with reparameterized samples (``rsample``; ``log q`` read from the flow's cache). ``log Z`` is
computed by quadrature on a grid, so the reported KL is absolute (0 = perfect fit). U2–U4 are not
normalizable along ``z1``; we multiply them by the smooth, nearly flat box factor
``exp(−(z1/4)^8)`` (documented in docs/flows.md), which leaves the plotted window unchanged.

Run (small defaults, ~6 minutes on one core)::

    OMP_NUM_THREADS=1 python benchmarks/flows_2d.py

Writes ``benchmarks/results/flows_2d.{json,md,png}``, built from the fits of the run itself
(no run folders are written), so rebuilding them means running it again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pyro.distributions as dist
import torch

from pyro_seqlatent.transforms import flow_stack

RESULTS = Path(__file__).resolve().parent / "results"


def _w1(z):
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z):
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z):
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def _box(z):
    return (z[..., 0] / 4) ** 8


def u1(z):
    ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
    modes = torch.logaddexp(-0.5 * ((z[..., 0] - 2) / 0.6) ** 2,
                            -0.5 * ((z[..., 0] + 2) / 0.6) ** 2)
    return ring - modes


def u2(z):
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2 + _box(z)


def u3(z):
    a = -0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2
    b = -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _box(z)


def u4(z):
    a = -0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2
    b = -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _box(z)


ENERGIES = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def grid(half=6.0, n=600, dtype=torch.float64):
    g = torch.linspace(-half, half, n, dtype=dtype)
    zz = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)
    return zz, (g[1] - g[0]) ** 2


def log_normalizer(energy) -> float:
    """log Z = log ∫ exp(−U) by the rectangle rule on a fine grid (the mass is inside ±6)."""
    zz, cell = grid()
    return (torch.logsumexp(-energy(zz).flatten(), 0) + torch.log(cell)).item()


def fit(energy, kind, K, steps, batch, lr, hidden, seed):
    torch.manual_seed(seed)
    flow = flow_stack(kind, 2, K, hidden_dims=(hidden, hidden))
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        # anneal the energy (β from 0.1 to 1 over the first half) as Rezende & Mohamed do
        beta = min(1.0, 0.1 + 0.9 * step / max(1, steps // 2))
        z = q.rsample((batch,))
        loss = (q.log_prob(z) + beta * energy(z)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        sched.step()
    return flow, q


def reverse_kl(q, energy, log_z, num=8192) -> float:
    with torch.no_grad():
        z = q.sample((num,))
        return ((q.log_prob(z) + energy(z)).mean() + log_z).item()


def plot(fitted, log_zs, kinds, K, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zz, _ = grid(half=4.0, n=200, dtype=torch.float32)
    fig, axes = plt.subplots(len(ENERGIES), 1 + len(kinds), figsize=(2.2 * (1 + len(kinds)),
                                                                    2.2 * len(ENERGIES)))
    for i, (ename, energy) in enumerate(ENERGIES.items()):
        axes[i, 0].imshow((-energy(zz) - log_zs[ename]).exp(), origin="lower",
                          extent=(-4, 4, -4, 4), cmap="viridis")
        axes[i, 0].set_title(f"{ename} target", fontsize=8)
        for j, kind in enumerate(kinds):
            q = fitted.get((ename, kind))
            ax = axes[i, j + 1]
            if q is not None:
                with torch.no_grad():
                    dens = q.log_prob(zz.reshape(-1, 2)).exp().reshape(zz.shape[:2])
                ax.imshow(dens, origin="lower", extent=(-4, 4, -4, 4), cmap="viridis")
            ax.set_title(f"{kind} K={K}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", default="planar,radial,iaf,nice,real_nvp")
    p.add_argument("--ks", default="2,8,32")
    p.add_argument("--energies", default="U1,U2,U3,U4")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    kinds = args.flows.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    names = args.energies.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_zs = {name: log_normalizer(ENERGIES[name]) for name in ENERGIES}
    rows, fitted = [], {}
    start = time.time()
    for kind in kinds:
        for K in ks:
            for name in names:
                t0 = time.time()
                _, q = fit(ENERGIES[name], kind, K, args.steps, args.batch, args.lr,
                           args.hidden, args.seed)
                kl = reverse_kl(q, ENERGIES[name], log_zs[name])
                rows.append({"flow": kind, "K": K, "energy": name, "kl": kl,
                             "seconds": time.time() - t0})
                print(f"{kind:9s} K={K:3d} {name}: KL={kl:.3f} ({time.time() - t0:.1f}s)",
                      flush=True)
                if K == max(ks):
                    fitted[(name, kind)] = q
    command = "OMP_NUM_THREADS=1 python benchmarks/flows_2d.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "log_z": log_zs, "args": vars(args),
            "total_seconds": time.time() - start}
    (out / "flows_2d.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [f"Reverse KL(q‖p) in nats after {args.steps} steps (batch {args.batch}); "
             f"`{meta['command']}`", "", "| flow | K | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for kind in kinds:
        for K in ks:
            kl = {r["energy"]: r["kl"] for r in rows if r["flow"] == kind and r["K"] == K}
            lines.append(f"| {kind} | {K} | " + " | ".join(f"{kl[n]:.3f}" for n in names) + " |")
    (out / "flows_2d.md").write_text("\n".join(lines) + "\n")
    if set(names) == set(ENERGIES):
        plot(fitted, log_zs, kinds, max(ks), out / "flows_2d.png")
    print("\n".join(lines))
    print(f"total {meta['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
