"""SNR of IWAE and DReG gradients against K on a Gaussian model where the published rates apply:
a check of the estimator lab itself, beside the VAE measurement of ``snr_vs_k.py``.

The model and guide follow the Gaussian example of Rainforth et al. 2018 (§4, "Tighter
variational bounds are not necessarily better"):

.. math:: z \\sim \\mathcal N(\\mu, I_D),\\quad x \\mid z \\sim \\mathcal N(z, I_D),\\qquad
          q(z \\mid x) = \\mathcal N(A x + b, \\tfrac23 I_D),

with ``D = 20``, data ``x ~ N(mu_true, 2 I)``, and the guide's ``A, b`` set to the optimum of
the ELBO (``A = I/2``, ``b = mu/2``) plus ``N(0, 0.01^2)`` noise, ``mu`` at its true value plus
the same noise. Near the optimum the guide's weights are nearly equal (effective sample size
close to K), the regime of the O(1/K) expansions behind the published rates: the IWAE guide
gradient's SNR falls like ``1/sqrt(K)``, the model gradient's rises like ``sqrt(K)``, and DReG's
guide SNR does not fall (Tucker et al. 2018).

    OMP_NUM_THREADS=1 python benchmarks/snr_vs_k_gaussian.py     # ~1 CPU minute

Writes ``benchmarks/results/snr_vs_k/gaussian/results.{json,md}``; SNR is measured by the lab's
``gradient_stats`` on one data point per draw (mean per-coordinate ``|g_i| / sd_i`` and the
norm SNR of ``snr_vs_k.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from snr_vs_k import coordinate_snr, norm_snr  # benchmarks/ is on sys.path

from pyro_seqlatent.infer.estimators import gradient_stats, make_estimator

OUT = Path(__file__).parent / "results" / "snr_vs_k" / "gaussian"
PUBLISHED = {("iwae", "guide"): "-1/2", ("iwae", "model"): "+1/2",
             ("dreg", "guide"): "does not fall", ("dreg", "model"): "+1/2"}


def model(x):
    mu = pyro.param("mu")
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def guide(x):
    a, b = pyro.param("A"), pyro.param("b")
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ a.T + b, math.sqrt(2 / 3)).to_event(1))


def set_parameters(dim: int, seed: int) -> torch.Tensor:
    """Parameters near the optimum and one data point drawn from the model."""
    gen = torch.Generator().manual_seed(seed)
    mu_true = torch.randn(dim, generator=gen)
    pyro.clear_param_store()
    noise = lambda *shape: 0.01 * torch.randn(*shape, generator=gen)  # noqa: E731
    mu = mu_true + noise(dim)
    b = mu / 2 + noise(dim)
    pyro.param("mu", mu.clone())
    pyro.param("A", torch.eye(dim) / 2 + noise(dim, dim))
    pyro.param("b", b)
    return (mu_true + math.sqrt(2) * torch.randn(dim, generator=gen)).unsqueeze(0)


def measure(args) -> list[dict]:
    x = set_parameters(args.dim, args.seed)
    groups = {"guide": [pyro.param("A").unconstrained(), pyro.param("b").unconstrained()],
              "model": [pyro.param("mu").unconstrained()]}
    rows = []
    for name in ("iwae", "dreg"):
        for k in args.ks:
            t0 = time.process_time()
            stats = gradient_stats(model, guide, x, make_estimator(name, k), args.draws,
                                   groups=groups, seed=args.seed)
            row = {"estimator": name, "K": k, "cpu_s": round(time.process_time() - t0, 2)}
            for group in ("guide", "model"):
                g = stats.groups[group]
                row[group] = {**coordinate_snr(g), "norm_snr": norm_snr(g)}
            rows.append(row)
            print(f"{name} K={k}: guide {row['guide']['mean_snr']:.4g}, "
                  f"model {row['model']['mean_snr']:.4g}", flush=True)
    return rows


def slope(rows, name, group, key) -> float:
    pts = [(math.log(r["K"]), math.log(r[group][key])) for r in rows
           if r["estimator"] == name and r[group][key] > 0]
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return (sum((a - mx) * (b - my) for a, b in pts)
            / sum((a - mx) ** 2 for a, _ in pts))


def write(rows, args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fits = [{"estimator": n, "group": g, "key": key, "slope": round(slope(rows, n, g, key), 3),
             "published": PUBLISHED[(n, g)]}
            for n in ("iwae", "dreg") for g in ("guide", "model")
            for key in ("mean_snr", "norm_snr")]
    command = (f"OMP_NUM_THREADS=1 python benchmarks/snr_vs_k_gaussian.py --dim {args.dim} "
               f"--draws {args.draws} --ks {' '.join(map(str, args.ks))} --seed {args.seed}")
    (OUT / "results.json").write_text(json.dumps(
        {"command": command, "rows": rows, "slopes": fits}, indent=1) + "\n")
    lines = ["# SNR against K on the Gaussian model of Rainforth et al. 2018 (§4)", "",
             f"Command: `{command}`. D = {args.dim}; guide and model near the ELBO optimum "
             "(see the script's docstring); one data point, "
             f"{args.draws} gradient draws per cell by `gradient_stats`.", "",
             "| estimator | K | guide mean SNR | guide norm SNR | model mean SNR | "
             "model norm SNR |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['estimator']} | {r['K']} | {r['guide']['mean_snr']:.4g} | "
              f"{r['guide']['norm_snr']:.4g} | {r['model']['mean_snr']:.4g} | "
              f"{r['model']['norm_snr']:.4g} |" for r in rows]
    lines += ["", "Least-squares slopes of log SNR against log K:", "",
              "| estimator | group | SNR | measured slope | published |", "|---|---|---|---|---|"]
    lines += [f"| {f['estimator']} | {f['group']} | {f['key']} | {f['slope']:+.3f} | "
              f"{f['published']} |" for f in fits]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    write(measure(args), args)
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    main()
