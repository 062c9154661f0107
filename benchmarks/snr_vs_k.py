r"""Signal-to-noise ratio of IWAE and DReG gradients against the number of particles K.

Reproduces, as a check of the estimator lab itself, the result of Rainforth et al. 2018
("Tighter variational bounds are not necessarily better"): for the K-sample IWAE bound
:math:`\mathbb E\log\frac1K\sum_k w_k`, the SNR of the inference network's (guide's) gradient
falls as :math:`O(1/\sqrt K)` while the generative network's (model's) rises as
:math:`O(\sqrt K)`; and of Tucker et al. 2018: the doubly-reparameterized gradient (DReG) of the
same bound keeps the guide's SNR from falling (it rises with K too).

Set-up: the registered ``vae`` system (``--latent-dim`` latents, default 40; 400 hidden units;
mean-field guide) on statically binarized MNIST, trained for ``--train-minutes`` CPU minutes
with ``Trace_ELBO`` (best-validation checkpoint), then frozen. At those parameters, for K in
``--ks`` and each of ``iwae`` and ``dreg`` (``make_estimator(name, K)``),
:func:`gradient_stats` draws ``--draws`` independent gradients on one fixed batch of
``--batch`` test images (``fixed_subset(test, seed 0)``), per parameter group (``guide`` =
encoder, ``model`` = decoder):

* ``mean_snr``: the mean over coordinates of :math:`|\bar g_i|/\sqrt{v_i}` (the lab's SNR;
  coordinates with no variance, such as weights of never-active ReLU units, left out);
  its noise floor for a coordinate whose true mean is zero is
  :math:`\sqrt{2/(\pi N)}` (N draws), written to the table;
* ``norm_snr``: :math:`\sqrt{\max(\lVert\bar g\rVert^2 - \sum_i v_i/N, 0)} / \sqrt{\sum_i
  v_i}`, the group's signal norm over its noise norm with the noise's share of
  :math:`\lVert\bar g\rVert^2` removed (unbiased for :math:`\lVert\mathbb E g\rVert^2`).

The slope of :math:`\log \mathrm{SNR}` against :math:`\log K` (least squares over all K) is
compared with the published rates (-1/2 for the IWAE guide, +1/2 for the model).

    OMP_NUM_THREADS=1 python benchmarks/snr_vs_k.py                  # ~10 CPU minutes
    OMP_NUM_THREADS=1 python benchmarks/snr_vs_k.py --train-minutes 0.5 --draws 20 --ks 1 4
    OMP_NUM_THREADS=1 python benchmarks/snr_vs_k.py --train-steps 300 --out DIR   # a stage
    python benchmarks/snr_vs_k.py --stages DIR1 DIR2 ... --out DIR   # DIR/stages.md: the slopes
                                                                    # and ESS/K of each stage

Writes ``benchmarks/results/snr_vs_k/{results.json,results.md,snr_vs_k.png}``; the trained
pair stays in ``benchmarks/results/snr_vs_k/vae_runs/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch

from pyro_seqlatent.data.mnist import BinarizedMNIST
from pyro_seqlatent.data.subsets import fixed_subset
from pyro_seqlatent.experiments.systems import train_system
from pyro_seqlatent.infer import load_run
from pyro_seqlatent.infer.estimators import gradient_stats, make_estimator

OUT = Path(__file__).resolve().parent / "results" / "snr_vs_k"
ESTIMATORS = ("iwae", "dreg")
GROUPS = ("guide", "model")
PUBLISHED = {("iwae", "guide"): -0.5, ("iwae", "model"): 0.5, ("dreg", "model"): 0.5}


def train_pair(args, out: Path):
    """The frozen VAE: trained once (``--train-minutes`` CPU minutes, or ``--train-steps``
    steps into ``vae_runs/steps-N``), reused when present."""
    steps = getattr(args, "train_steps", None)
    run_dir = out / "vae_runs" / ("meanfield" if steps is None else f"steps-{steps}")
    if not (run_dir / "best.pt").exists() or args.retrain:
        length = ({"num_epochs": 100, "max_time_s": args.train_minutes * 60,
                   "time_budget": "process", "valid_every": 250} if steps is None else
                  {"num_steps": steps, "valid_every": min(250, steps)})
        train_system("vae", {"latent_dim": args.latent_dim, "hidden_dims": "400",
                             "valid_limit": 1000},
                     run_dir, batch_size=100, lr=1e-3, clip_norm=100.0, seed=0,
                     progress=False, **length)
    run = load_run(run_dir, which="best")
    for p in list(run.model.parameters()) + list(run.guide.parameters()):
        p.requires_grad_(True)
    return run.model, run.guide, run_dir


def coordinate_snr(group) -> dict:
    """Mean and median over coordinates of :math:`|\\bar g_i|/\\sqrt{v_i}`, over the coordinates
    whose variance is positive in float32 (a coordinate with no variance, e.g. a weight of a
    ReLU unit that is never active, would give 0/0 or an infinite ratio), and how many there
    were."""
    keep = group.var > 0
    snr = group.mean[keep].abs() / group.var[keep].sqrt()
    return {"mean_snr": float(snr.mean()) if snr.numel() else math.nan,
            "median_snr": float(snr.median()) if snr.numel() else math.nan,
            "coordinates": int(keep.sum())}


def weight_diagnostics(model, guide, batch, ks=(64, 5000), seed: int = 0) -> list[dict]:
    """Per image of the batch: the effective sample size over K of the importance weights
    (``log_marginal``'s ``ess / K``) and :math:`\\log\\hat p(x) - \\mathrm{ELBO}`, at each K:
    how far the frozen pair is from the regime where the O(1/K) expansions behind the
    published rates hold (ESS growing like K)."""
    from pyro_seqlatent.infer import log_marginal

    out = []
    for k in ks:
        pyro.set_rng_seed(seed)
        est = log_marginal(model, guide, batch, num_samples=k)
        out.append({"K": k, "ess_over_k": [round(float(e) / k, 5) for e in est.ess],
                    "log_p_minus_elbo": [round(float(a - b), 3)
                                         for a, b in zip(est.log_marginal, est.elbo)]})
    return out


def norm_snr(group) -> float:
    r""":math:`\sqrt{\max(\lVert\bar g\rVert^2 - \sum v/N, 0)/\sum v}` of a ``GroupStats``."""
    total = float(group.var.double().sum())
    signal = float(group.mean.double().pow(2).sum()) - total / group.num_draws
    return math.sqrt(max(signal, 0.0) / total) if total > 0 else math.inf


def measure(model, guide, batch, args) -> list[dict]:
    rows = []
    for name in ESTIMATORS:
        for k in args.ks:
            t0 = time.process_time()
            pyro.clear_param_store()
            stats = gradient_stats(model, guide, (batch,), make_estimator(name, k),
                                   num_draws=args.draws, seed=args.seed)
            row = {"estimator": name, "K": k, "draws": args.draws,
                   "cpu_s": round(time.process_time() - t0, 1), "loss": stats.loss_mean}
            for group in GROUPS:
                g = stats.groups[group]
                row[group] = {**coordinate_snr(g), "norm_snr": norm_snr(g),
                              "mean_variance": g.summary()["mean_variance"], "flag": g.flag}
            rows.append(row)
            print(f"{name} K={k}: guide {row['guide']['mean_snr']:.4g} / "
                  f"{row['guide']['norm_snr']:.4g}, model {row['model']['mean_snr']:.4g} / "
                  f"{row['model']['norm_snr']:.4g} ({row['cpu_s']} s)", flush=True)
    return rows


def slope(rows: list[dict], name: str, group: str, key: str) -> float | None:
    """Least-squares slope of log SNR against log K (finite, positive values only)."""
    pts = [(math.log(r["K"]), math.log(r[group][key])) for r in rows
           if r["estimator"] == name and 0 < r[group][key] < math.inf]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def slopes(rows) -> list[dict]:
    return [{"estimator": n, "group": g, "key": key, "slope": slope(rows, n, g, key),
             "published": PUBLISHED.get((n, g))}
            for n in ESTIMATORS for g in GROUPS for key in ("mean_snr", "norm_snr")]


def _fmt(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def write_markdown(result: dict, path: Path) -> None:
    rows, cfg = result["rows"], result["config"]
    floor = math.sqrt(2 / (math.pi * cfg["draws"]))
    lines = [
        "# SNR of IWAE and DReG gradients against K (VAE, binarized MNIST)",
        "",
        f"Command: `{cfg['command']}`. Frozen `vae` ({cfg.get('latent_dim', 40)} latents, 400 "
        "hidden, mean-field guide) "
        + (f"trained {cfg['train_steps']} steps" if cfg.get("train_steps")
           else f"trained {cfg['train_minutes']} CPU min")
        + " with `Trace_ELBO` (best-validation "
        f"checkpoint, step {cfg.get('best_step')}, validation −ELBO "
        f"{_fmt(cfg.get('best_valid_loss'))}); {cfg['draws']} gradient draws per cell on "
        f"one batch of {cfg['batch']} test images (`fixed_subset(test, seed 0)`). "
        f"`mean` = mean per-coordinate SNR |ḡ_i|/sd_i (noise floor for a zero-mean coordinate "
        f"≈ {floor:.3f}); `norm` = signal norm over noise norm, noise share removed.",
        "",
        "| K | iwae guide mean | iwae guide norm | dreg guide mean | dreg guide norm "
        "| iwae model mean | iwae model norm | dreg model mean | dreg model norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["estimator"], r["K"]): r for r in rows}
    for k in cfg["ks"]:
        cells = [_fmt(by[(n, k)][g][key]) if (n, k) in by else "–"
                 for g in GROUPS for n in ESTIMATORS for key in ("mean_snr", "norm_snr")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Slopes of log SNR against log K (least squares over all K):", "",
              "| estimator | group | SNR | measured slope | published rate |",
              "|---|---|---|---|---|"]
    for s in result["slopes"]:
        pub = {None: "– (not stated)", -0.5: "−1/2 (Rainforth et al. 2018)",
               0.5: "+1/2 (Rainforth et al. 2018)"}[s["published"]]
        if s["estimator"] == "dreg" and s["group"] == "guide":
            pub = "does not fall (Tucker et al. 2018)"
        lines.append(f"| {s['estimator']} | {s['group']} | {s['key']} | "
                     f"{_fmt(s['slope'], 3)} | {pub} |")
    if result.get("weights"):
        lines += ["", "The importance weights of the frozen pair on the same batch "
                  "(`log_marginal`, per image): effective sample size over K, and "
                  "log p̂(x) − ELBO:", "", "| K | ESS / K | log p̂(x) − ELBO (nats) |",
                  "|---|---|---|"]
        for w in result["weights"]:
            lines.append(f"| {w['K']} | {', '.join(f'{v:.3g}' for v in w['ess_over_k'])} | "
                         f"{', '.join(f'{v:.2f}' for v in w['log_p_minus_elbo'])} |")
    path.write_text("\n".join(lines) + "\n")


def write_stages(folders: list[Path], path: Path) -> None:
    """One line per training stage (one ``results.json`` per folder): how degenerate the
    importance weights are (mean ESS/K at K = 64 over the batch's images) beside the measured
    slopes, so one can read where the published rates hold."""
    lines = ["# SNR slopes against log K along training (VAE, binarized MNIST)", "",
             "Each line is one frozen pair (`snr_vs_k.py` results folder). Slopes of log SNR "
             "against log K, mean per-coordinate / norm SNR; published: iwae guide −1/2, "
             "model +1/2, dreg guide does not fall.", "",
             "| stage | best step | validation −ELBO | mean ESS/K at K = 64 | iwae guide "
             "| dreg guide | model |",
             "|---|---|---|---|---|---|---|"]
    for folder in folders:
        result = json.loads((folder / "results.json").read_text())
        cfg = result["config"]
        steps = cfg.get("train_steps")
        stage = (f"{steps} step{'s' if steps != 1 else ''}" if steps
                 else f"{cfg['train_minutes']} CPU min")
        ess = next((sum(w["ess_over_k"]) / len(w["ess_over_k"])
                    for w in result.get("weights", [])
                    if w["K"] == 64), None)
        by = {(s["estimator"], s["group"], s["key"]): s["slope"] for s in result["slopes"]}
        cells = [f"{_fmt(by[(n, g, 'mean_snr')], 2)} / {_fmt(by[(n, g, 'norm_snr')], 2)}"
                 for n, g in (("iwae", "guide"), ("dreg", "guide"), ("iwae", "model"))]
        lines.append(f"| {stage} | {cfg.get('best_step')} | "
                     f"{_fmt(cfg.get('best_valid_loss'), 4)} | {_fmt(ess, 3)} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Commands: " + "; ".join(
        f"`{json.loads((f / 'results.json').read_text())['config']['command']}`"
        for f in folders)]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in zip(axes, ("mean_snr", "norm_snr"),
                              ("mean per-coordinate SNR", "norm SNR (noise share removed)")):
        for name, color in zip(ESTIMATORS, ("C0", "C3")):
            for group, style in zip(GROUPS, ("-o", "--s")):
                pts = [(r["K"], r[group][key]) for r in rows if r["estimator"] == name
                       and 0 < r[group][key] < math.inf]
                hollow = name == "iwae" and group == "model"  # drawn under dreg's: same numbers
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{name} {group}",
                            markersize=11 if hollow else 6,
                            markerfacecolor="none" if hollow else color)
        ks = result["config"]["ks"]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (particles)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("SNR")
    axes[0].legend(fontsize=8)
    fig.suptitle("IWAE vs DReG gradient SNR against K (VAE, binarized MNIST); the model "
                 "(decoder) gradients of iwae and dreg are the same estimator", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-minutes", type=float, default=4.0)
    parser.add_argument("--train-steps", type=int, default=None,
                        help="train for this many steps instead of --train-minutes (1: "
                        "practically the initial parameters); the pair is kept in "
                        "vae_runs/steps-N")
    parser.add_argument("--stages", type=Path, nargs="+", default=None,
                        help="only write OUT/stages.md: one line per results folder given "
                        "(ESS/K and the slopes at each training stage)")
    parser.add_argument("--latent-dim", type=int, default=40)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--table", action="store_true",
                        help="only rewrite results.md and the figure from results.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.ks) or args.draws < 2 or args.batch < 1:
        parser.error("--ks must be positive integers, --draws >= 2, --batch >= 1")
    if args.train_steps is not None and args.train_steps < 1:
        parser.error("--train-steps must be a positive integer")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stages:
        write_stages(args.stages, args.out / "stages.md")
        print((args.out / "stages.md").read_text())
        return
    if args.table:
        result = json.loads((args.out / "results.json").read_text())
        if "weights" not in result and (args.out / "vae_runs" / "meanfield" / "best.pt").exists():
            torch.set_num_threads(1)
            model, guide, _ = train_pair(args, args.out)
            batch = torch.stack(list(fixed_subset(BinarizedMNIST("test"),
                                                  result["config"]["batch"])))
            result["weights"] = weight_diagnostics(model, guide, batch)
            (args.out / "results.json").write_text(json.dumps(result, indent=1))
        write_markdown(result, args.out / "results.md")
        plot(result, args.out / "snr_vs_k.png")
        return
    torch.set_num_threads(1)
    t0 = time.process_time()
    model, guide, run_dir = train_pair(args, args.out)
    batch = torch.stack([x for x in fixed_subset(BinarizedMNIST("test"), args.batch)])
    rows = measure(model, guide, batch, args)
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/snr_vs_k.py" + (
        f" --ks {' '.join(map(str, args.ks))} --draws {args.draws} --batch {args.batch} "
        + (f"--train-minutes {args.train_minutes}" if args.train_steps is None
           else f"--train-steps {args.train_steps}")
        + (f" --latent-dim {args.latent_dim}" if args.latent_dim != 40 else "")
        + (f" --out {args.out}" if args.out != OUT else ""))
    result = {"config": {"ks": args.ks, "latent_dim": args.latent_dim, "draws": args.draws,
                         "batch": args.batch,
                         "train_minutes": args.train_minutes,
                         "train_steps": args.train_steps, "seed": args.seed,
                         "best_step": best["state"].get("best_step"),
                         "best_valid_loss": best["state"].get("best_valid"),
                         "command": command,
                         "cpu_s": round(time.process_time() - t0, 1)},
              "rows": rows}
    result["slopes"] = slopes(rows)
    result["weights"] = weight_diagnostics(model, guide, batch)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "results.md")
    plot(result, args.out / "snr_vs_k.png")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
