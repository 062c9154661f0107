"""VAE on statically binarized MNIST: guide kind x K flows -> test ELBO and -log p(x).

Every row trains the same decoder (40 latents, 400 hidden units, as Rezende & Mohamed 2015's
MNIST setup) with a different guide for a fixed wall-clock budget through the project's one
``train``, then scores a fixed test subset with ``evaluate`` (importance sampling, K samples).
Writes ``benchmarks/results/vae_mnist.{json,md}`` and learning curves. Optional ``--nuts``
compares each guide's q(z|x) with NUTS draws from the true posterior for a 2-D latent model.

    python benchmarks/vae_mnist.py --minutes 60 --num-samples 5000 --test-points 1000
    python benchmarks/vae_mnist.py --minutes 3 --num-samples 500 --test-points 500   # quick
    python benchmarks/vae_mnist.py --full-test meanfield iaf-K4   # whole test set, trained rows
    python benchmarks/vae_mnist.py --figures   # samples/reconstructions, 2-D manifold

The budget is CPU minutes of the training process (``time_budget="process"``) with one thread
(``OMP_NUM_THREADS=1``), so two rows can run side by side, one per core, without one row's
load shortening the other's budget. Every row is scored at its best-validation checkpoint.
Rows are merged into the JSON file by name, so several invocations (``--rows``) may run at once.

Only ``vae_mnist.{json,md}`` and the figures are kept in git; the run folders
(``vae_mnist_runs/<row>/``) stay on the disk that trained them (benchmarks/README.md).
``--rescore ROW ...`` rebuilds those rows from their run folders without training (their
best checkpoints scored again; needs the data); ``--rescore`` alone rewrites the table from
``vae_mnist.json``. The learning-curve figure reads every row's ``metrics.jsonl`` and is kept
as it is where some run folder is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _results  # benchmarks/_results.py (this script's folder is on sys.path)
import pyro
import torch

from pyro_seqlatent.data.mnist import BinarizedMNIST
from pyro_seqlatent.data.subsets import fixed_subset
from pyro_seqlatent.experiments.systems import train_system
from pyro_seqlatent.infer import evaluate, load_run, posterior_check
from pyro_seqlatent.infer.posterior_check import energy_distance
from pyro_seqlatent.infer.run import read_metrics
from pyro_seqlatent.infer.train import BEST, restore_modules

ROWS = [
    ("meanfield", 0),
    ("planar", 10),
    ("planar", 40),
    ("iaf", 4),
    ("real_nvp", 4),
    ("nice", 4),
]
ANCHORS = {  # -log p(x) in nats on statically binarized MNIST (upper bounds in the papers)
    "planar": ("Rezende & Mohamed 2015, planar K=80", 85.1),
    "nice": ("Rezende & Mohamed 2015, NICE K=80", 87.2),
    "iaf": ("Kingma et al. 2016, IAF (conv ResNet nets)", 79.88),
}


def run_row(guide: str, flows: int, args, out: Path) -> dict:
    name = f"{guide}" + (f"-K{flows}" if flows else "")
    run_dir = out / "vae_mnist_runs" / name
    options = {"guide": guide, "num_flows": max(flows, 1), "latent_dim": args.latent_dim,
               "hidden_dims": args.hidden_dims, "valid_limit": 1000}
    t0 = time.perf_counter()
    train_system(
        "vae", options, run_dir, num_epochs=args.max_epochs, batch_size=100, lr=args.lr,
        lr_schedule=None, clip_norm=100.0, valid_every=args.valid_every,
        max_time_s=args.minutes * 60, time_budget="process", seed=args.seed,
        progress=not args.quiet, checkpoint_every=2000,
    )
    return score_row(guide, flows, run_dir, args, wall_s=time.perf_counter() - t0)


def score_row(guide: str, flows: int, run_dir: Path, args, wall_s: float | None = None) -> dict:
    """The table row of a trained run: its training figures from ``metrics.jsonl`` and the test
    ELBO and -log p(x) of its best-validation checkpoint on a fixed random subset of
    ``args.test_points`` test images (``data.subsets.fixed_subset``, seed 0)."""
    name = f"{guide}" + (f"-K{flows}" if flows else "")
    test = fixed_subset(BinarizedMNIST("test"), args.test_points)
    run = load_run(run_dir, which="best")
    pyro.set_rng_seed(0)
    ev = evaluate(run.model, run.guide, test, num_samples=args.num_samples, batch_size=50,
                  chunk_size=500, seed=args.seed)
    metrics = read_metrics(run_dir)
    best = min((m for m in metrics if "valid_loss" in m), key=lambda m: m["valid_loss"],
               default=None)
    last = metrics[-1]
    budget_min = round(last["time_s"] / 60)
    command = (f"pyro-seqlatent train vae --guide {guide} --num-flows {max(flows, 1)} "
               f"--latent-dim {args.latent_dim} --hidden-dims {args.hidden_dims} "
               f"--max-time-s {budget_min * 60} --time-budget process "
               f"--num-epochs {args.max_epochs} "
               f"--lr {args.lr} --clip-norm 100 --valid-every {args.valid_every} "
               f"--run-dir {run_dir} && pyro-seqlatent evaluate {run_dir} --num-samples "
               f"{args.num_samples} --max-points {args.test_points}")
    return {
        "row": name, "guide": guide, "K": flows, "steps": last["step"],
        "epochs": round(last["epoch"], 2), "train_s": round(last["time_s"], 1),
        "wall_s": round(wall_s, 1) if wall_s is not None else None,
        "best_epoch": best["epoch"] if best else None,
        "test_elbo": ev["elbo"], "test_elbo_sem": ev["elbo_sem"],
        "test_nll": -ev["log_marginal"], "test_nll_sem": ev["log_marginal_sem"],
        "num_samples": args.num_samples, "test_points": ev["num_points"],
        "test_subset": "fixed_subset(test, seed 0)",
        "nll_points": [round(-float(v), 4) for v in ev["log_marginal_per_point"]],
        "run_dir": str(run_dir), "command": command,
    }


def full_test(row: dict, args) -> dict:
    """Score a trained row on the whole 10,000-image test set (best-validation checkpoint)."""
    run = load_run(row["run_dir"], which="best")
    pyro.set_rng_seed(0)
    ev = evaluate(run.model, run.guide, BinarizedMNIST("test"), num_samples=args.num_samples,
                  batch_size=50, chunk_size=500, seed=args.seed, progress=not args.quiet)
    return {**row, "full_test_elbo": ev["elbo"], "full_test_elbo_sem": ev["elbo_sem"],
            "full_test_nll": -ev["log_marginal"], "full_test_nll_sem": ev["log_marginal_sem"],
            "full_test_points": ev["num_points"], "full_test_num_samples": args.num_samples,
            "full_test_command": f"pyro-seqlatent evaluate {row['run_dir']} --num-samples "
                                 f"{args.num_samples}"}


def figures(rows: list[dict], out: Path) -> list[Path]:
    """Test images, reconstructions and samples of the row with the lowest test -log p(x), and
    the latent manifold of the 2-D mean-field decoder trained for the NUTS check."""
    from pyro_seqlatent.models.vae import plot

    paths = []
    fig_dir = out / "vae_figures"
    fig_dir.mkdir(exist_ok=True)
    data = {"test": BinarizedMNIST("test")}
    best = min((r for r in rows if Path(r["run_dir"]).is_dir()), key=lambda r: r["test_nll"],
               default=None)
    if best is not None:
        run = load_run(best["run_dir"], which="best")
        for path in plot(run.model, run.guide, data, {}, fig_dir):
            paths.append(path.rename(fig_dir / f"{best['row']}_{path.name}"))
    two_d = out / "vae_mnist_runs" / "nuts-meanfield"
    if two_d.is_dir():
        run = load_run(two_d, which="best")
        for path in plot(run.model, run.guide, data, {}, fig_dir):
            if path.name == "vae_manifold.png":
                paths.append(path)
            else:  # the 2-D model's samples: not a figure of the table
                path.unlink()
    return paths


def merge_rows(table: Path, new: list[dict]) -> list[dict]:
    """Rows already in ``table`` with the new ones replacing those of the same name, in order
    (under a lock: rows run by several invocations at once)."""
    order = [g + (f"-K{k}" if k else "") for g, k in ROWS]
    return _results.merge_rows(table, new, order=lambda r: order.index(r["row"]))


def plot_curves(rows, out: Path) -> Path:
    """Validation -ELBO against wall time (the budget) and against epochs (the data seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "vae_mnist_curves.png"
    missing = [r["row"] for r in rows if not read_metrics(r["run_dir"])]
    if missing:  # run folders are not in git: a clone keeps the figure drawn where they were
        print(f"[vae_mnist] no metrics.jsonl for rows {missing}: {path} not redrawn")
        return path
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, row in enumerate(rows):
        metrics = read_metrics(row["run_dir"])
        valid = [(m["time_s"] / 60, m["epoch"], m["valid_loss"]) for m in metrics
                 if "valid_loss" in m]
        if valid:
            minutes, epochs, losses = zip(*valid)
            axes[0].plot(minutes, losses, "-", color=f"C{i}", label=row["row"])
            axes[1].plot(epochs, losses, "-", color=f"C{i}", label=row["row"])
    for ax, xlabel in zip(axes, ("training time (CPU min of the process)", "epoch")):
        ax.axhline(85.1, ls=":", color="k", lw=0.8, label="planar K=80 anchor (-log p)")
        ax.set_xlabel(xlabel)
        ax.set_ylim(80, 130)
    axes[0].set_ylabel("validation -ELBO (nats, 1,000 images)")
    axes[1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(rows, args, out: Path, extra: str = "") -> Path:
    budgets = sorted({round(r["train_s"] / 60) for r in rows})
    lines = [
        "# VAE on statically binarized MNIST",
        "",
        f"Decoder 40-400-784 (Bernoulli), encoder 784-400; Adam lr {args.lr}, batch 100; "
        f"a budget of {args.minutes:g} CPU minutes of training per row (one thread, "
        "`time_budget=\"process\"`) on this machine's CPU; every row is scored at its "
        "best-validation checkpoint (1,000 validation images, validated every epoch): test ELBO "
        "and -log p(x) by importance sampling with K samples on a fixed random subset of `points` "
        "test images (`fixed_subset`, seed 0: the test file is sorted by digit class), "
        "± one standard error over images. The last columns score the whole 10,000-image test "
        "set where it was run.",
        "",
        "| guide | K | epochs | best epoch | train CPU s | K samples | points | test ELBO "
        "| test -log p(x) | anchor | gap | full test -log p(x) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchor = ANCHORS.get(r["guide"])
        nll = r.get("full_test_nll", r["test_nll"])
        gap = f"{nll - anchor[1]:+.2f}" if anchor else "–"
        full = (f"{r['full_test_nll']:.2f} ± {r['full_test_nll_sem']:.2f}"
                if "full_test_nll" in r else "–")
        mark = "" if "test_subset" in r else " †"
        lines.append(
            f"| {r['guide']}{mark} | {r['K'] or '–'} | {r['epochs']} | "
            f"{r.get('best_epoch', '–')} | "
            f"{r['train_s']} | {r['num_samples']} | {r['test_points']} | "
            f"{r['test_elbo']:.2f} ± {r['test_elbo_sem']:.2f} | "
            f"{r['test_nll']:.2f} ± {r['test_nll_sem']:.2f} | "
            f"{f'{anchor[1]} ({anchor[0]})' if anchor else '–'} | {gap} | {full} |"
        )
    base = next((r for r in rows if r["row"] == "meanfield" and "nll_points" in r), None)
    paired = [r for r in rows if base is not None and r is not base and "nll_points" in r
              and len(r["nll_points"]) == len(base["nll_points"])]
    if paired:
        lines += ["", "Each guide against the mean-field guide on the same test images "
                  "(-log p(x) of the row minus mean-field's; negative = the row is better; "
                  "paired standard error over images):", "",
                  "| guide | K | Δ -log p(x) vs mean-field | paired s.e. |", "|---|---|---|---|"]
        ref = torch.tensor(base["nll_points"], dtype=torch.float64)
        for r in paired:
            d = torch.tensor(r["nll_points"], dtype=torch.float64) - ref
            lines.append(f"| {r['guide']} | {r['K'] or '–'} | {float(d.mean()):+.2f} | "
                         f"{float(d.std() / len(d) ** 0.5):.2f} |")
    if any("test_subset" not in r for r in rows):
        lines += ["", "† An older row: a wall-clock budget, scored at its last checkpoint on the "
                  "*first* `points` test images. The test file is sorted by digit class, so "
                  "those images are nearly all zeros and the row is not comparable with the "
                  "others; it awaits its 60-minute run."]
    if len(budgets) > 1:
        lines += ["", f"Rows differ in budget (train CPU minutes {budgets}): compare rows of "
                  "one budget only."]
    lines += ["", "The gap is to the full-test -log p(x) where the row has it, else to the "
              "subset's.", "", "Commands:", ""]
    lines += [f"- {r['row']}: `{r['command']}`" for r in rows]
    lines += [f"- {r['row']} (full test set): `{r['full_test_command']}`" for r in rows
              if "full_test_command" in r]
    nuts = out / "vae_nuts.md"
    extra = extra or (nuts.read_text() if nuts.exists() else "")
    lines += ["", "![learning curves](vae_mnist_curves.png)", extra]
    path = out / "vae_mnist.md"
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def grid_posterior(model, x: torch.Tensor, lim: float = 5.0, n: int = 201, refine: int = 8,
                   draws: int = 600, seed: int = 0) -> dict:
    r"""The exact posterior of a 2-D latent by quadrature, an independent reference for NUTS
    and for the importance-sampled :math:`\log p(x)`.

    Midpoint rule on an ``n × n`` grid over :math:`[-lim, lim]^2` (doubled while a border cell
    is within 30 nats of the mode, up to 40); every cell whose log joint is
    within 30 nats of the largest is split into ``refine × refine`` sub-cells (posteriors of a
    trained decoder can be narrower than a coarse cell):
    :math:`\log p(x) \approx \log \sum_c p(z_c)\,p(x \mid z_c)\,|c|`. ``draws`` samples
    are drawn from the cells (uniform within a cell)."""

    def log_joint(z):
        return torch.cat([torch.distributions.Normal(0.0, 1.0).log_prob(zc).sum(-1)
                          + model.observation(zc).log_prob(x.expand(len(zc), -1))
                          for zc in z.split(8192)])

    while True:  # widen the box until no cell on its border is within 30 nats of the mode
        edges = torch.linspace(-lim, lim, n + 1)
        centres = (edges[1:] + edges[:-1]) / 2
        h = float(edges[1] - edges[0])
        z = torch.cartesian_prod(centres, centres)
        coarse = log_joint(z)
        hot = coarse > coarse.max() - 30.0
        border = (z.abs() >= centres[-1] - 1e-6).any(-1)
        if not (hot & border).any() or lim >= 40.0:
            break
        lim *= 2.0
    offsets = (torch.arange(refine) + 0.5) / refine * h - h / 2
    sub = torch.cartesian_prod(offsets, offsets)
    fine_z = (z[hot][:, None, :] + sub[None]).reshape(-1, 2)
    centres_all = torch.cat([z[~hot], fine_z])
    widths = torch.cat([torch.full(((~hot).sum(),), h), torch.full((len(fine_z),), h / refine)])
    log_w = torch.cat([coarse[~hot], log_joint(fine_z)]) + 2 * widths.log()
    log_px = float(torch.logsumexp(log_w, 0))
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(torch.softmax(log_w, 0), draws, replacement=True, generator=g)
    samples = centres_all[idx] + (torch.rand(draws, 2, generator=g) - 0.5) * widths[idx, None]
    return {"log_px": log_px, "samples": samples, "grid": z, "log_joint": coarse, "n": n,
            "lim": lim}


def nuts_check(rows, args, out: Path) -> str:
    r"""NUTS on p(z | x) for a 2-D latent VAE vs the trained guides.

    Each guide is trained with its own decoder (``--nuts-minutes`` CPU minutes; with
    ``--nuts-reuse`` an earlier run folder is loaded instead) and compared with the posterior of
    *its* decoder on ``--nuts-images`` test images drawn by ``fixed_subset`` (seed 0; the test
    file is sorted by class, so its first images are all zeros). The posterior is drawn by NUTS
    (4 chains started from prior draws, 150 warm-up + 150 draws each) and, because the latent
    is 2-D, also computed exactly on a grid (:func:`grid_posterior`): the grid checks that NUTS
    visited every mode (a single chain can sit in a minor mode of a multimodal posterior). NUTS,
    the guide's draws and the importance-sampled evidence come from
    :func:`~pyro_seqlatent.infer.posterior_check.posterior_check`. Reported per guide: the gap
    :math:`\log p(x) - \mathrm{ELBO}` (IS, K = 2000), the IS
    :math:`\log p(x)` against the grid's, and energy distances of the guide's draws to the
    NUTS and to the grid draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = fixed_subset(BinarizedMNIST("test"), args.nuts_images)
    shown = min(args.nuts_images, 4)
    guides = args.nuts_guides
    fig, axes = plt.subplots(len(guides), shown + 1, figsize=(2.6 * (shown + 1), 2.6 * len(guides)),
                             squeeze=False)
    per_guide, budgets = {}, {}
    for row_axes, guide in zip(axes, guides):
        options = {"guide": guide, "num_flows": 8, "latent_dim": 2, "hidden_dims": "400"}
        run_dir = out / "vae_mnist_runs" / f"nuts-{guide}"
        if args.nuts_reuse and run_dir.is_dir():
            run = load_run(run_dir)
            model, q = run.model, run.guide
            cfg = run.train_config
            budget = cfg.get("max_time_s")
            budgets[guide] = (("an unknown time" if budget is None else
                               f"{budget / 60:g} "
                               f"{'CPU' if cfg.get('time_budget') == 'process' else 'wall'} "
                               "minutes")
                              + f" (reused run folder, {Path(run.checkpoint).name})")
        else:
            _, model, q, _ = train_system("vae", options, run_dir, num_epochs=1000,
                                          batch_size=100, lr=1e-3, clip_norm=100.0,
                                          max_time_s=args.nuts_minutes * 60,
                                          time_budget="process", progress=False)
            scored = "last state"
            if (run_dir / BEST).exists():
                restore_modules(run_dir / BEST, model, q)
                scored = "best.pt"
            budgets[guide] = f"{args.nuts_minutes:g} CPU minutes ({scored})"
        stats = {k: [] for k in ("gap", "is_gap", "is_vs_grid", "ed_nuts", "ed_grid",
                                 "nuts_vs_grid", "grid_vs_grid", "lim")}
        for i in range(args.nuts_images):
            x = test[i][None]
            pyro.set_rng_seed(args.seed + i)
            # 4 NUTS chains from prior draws, 150 warm-up + 150 draws each; 600 guide draws;
            # log p(x) and the ELBO by importance sampling with K = 2000
            check = posterior_check(model, q, x, num_chains=4, warmup_steps=150, num_draws=150,
                                    guide_draws=600, num_particles=2000)
            zp, zq = check.nuts_draws.float(), check.guide_draws.float()
            grid = grid_posterior(model, x, draws=1200, seed=args.seed + i)
            exact, exact2 = grid["samples"][:600], grid["samples"][600:]  # 2nd: noise level
            stats["gap"].append(grid["log_px"] - check.elbo)
            stats["is_gap"].append(check.evidence_gap)
            stats["is_vs_grid"].append(check.log_marginal - grid["log_px"])
            stats["lim"].append(grid["lim"])
            stats["grid_vs_grid"].append(energy_distance(exact, exact2))
            stats["ed_nuts"].append(check.energy_distance)  # energy_distance(zp, zq)
            stats["ed_grid"].append(energy_distance(exact, zq))
            stats["nuts_vs_grid"].append(energy_distance(zp, exact))
            if i < shown:
                ax = row_axes[i + 1]
                n = grid["n"]
                dens = torch.softmax(grid["log_joint"], 0).view(n, n)
                gx = grid["grid"][:, 0].view(n, n)
                gy = grid["grid"][:, 1].view(n, n)
                ax.contour(gx, gy, dens, levels=5, colors="k", linewidths=0.5)
                ax.scatter(*zp.T, s=2, alpha=0.35, label="NUTS p(z|x)")
                ax.scatter(*zq.T, s=2, alpha=0.35, label="q(z|x)")
                both = torch.cat([zp, zq, exact])
                lo, hi = both.quantile(0.005, 0), both.quantile(0.995, 0)
                pad = 0.15 * (hi - lo)
                ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
                ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
                ax.set_title(f"image {i}: gap {stats['gap'][-1]:.2f} nats", fontsize=8)
                ax.tick_params(labelsize=6)
                if i == 0:
                    ax.legend(frameon=False, fontsize=6, markerscale=3)
        row_axes[0].imshow(torch.cat([test[i].view(28, 28) for i in range(shown)], 1),
                           cmap="Greys")
        row_axes[0].set_title(f"{guide}: images 0..{shown - 1}", fontsize=8)
        row_axes[0].axis("off")
        per_guide[guide] = stats
    lines = ["", "## True posterior (NUTS) vs guides, 2-D latent", "",
             "| guide | mean log p(x) − ELBO | per image | same, IS log p(x) "
             "| IS log p(x) − grid log p(x) | energy distance q vs NUTS | q vs grid "
             "| NUTS vs grid | grid vs grid (noise) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def mean(v):
        return sum(v) / len(v)

    for guide, st in per_guide.items():
        lines.append(f"| {guide} | {mean(st['gap']):.3f} | "
                     + ", ".join(f"{g:.2f}" for g in st["gap"])
                     + f" | {mean(st['is_gap']):.3f} | {mean(st['is_vs_grid']):+.3f} (largest "
                     f"{max(abs(v) for v in st['is_vs_grid']):.3f}) | {mean(st['ed_nuts']):.4f} | "
                     f"{mean(st['ed_grid']):.4f} | {mean(st['nuts_vs_grid']):.4f} | "
                     f"{mean(st['grid_vs_grid']):.4f} |")
    fig.tight_layout()
    fig.savefig(out / "vae_nuts_scatter.png", dpi=110)
    plt.close(fig)
    trained = "; ".join(f"{g} {b}" for g, b in budgets.items())
    lines += ["", f"Over {args.nuts_images} random test images (`fixed_subset`, seed 0); each "
              f"guide with its own decoder, trained for {trained}; best.pt = the best-validation "
              "checkpoint. NUTS: 4 chains from prior draws, 150 warm-up + 150 draws "
              "each. Grid: the exact posterior by quadrature on 201 × 201 cells over [−5, 5]² "
              "(widened while the border holds mass; widest box used: "
              f"±{max(max(st['lim']) for st in per_guide.values()):g}), cells within 30 nats "
              "of the mode split 8 × 8, 600 draws. The gap log p(x) − ELBO uses the grid's "
              "log p(x); the importance-sampled one (q as proposal) is lower where q misses "
              "posterior mass. ELBO and IS log p(x) with K = 2000. Energy distance between "
              "600 guide draws and the posterior draws (a U-statistic: 0 in expectation iff "
              "the laws agree; the last column is its noise, two independent sets of grid "
              "draws). Contours in the figure: the grid posterior.",
              "", f"Command: `python benchmarks/vae_mnist.py --nuts --rows --nuts-minutes "
              f"{args.nuts_minutes:g} --nuts-images {args.nuts_images}"
              + (" --nuts-reuse" if args.nuts_reuse else "") + "`",
              "", "![NUTS vs guide](vae_nuts_scatter.png)"]
    (out / "vae_nuts.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget per row")
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--test-points", type=int, default=1000)
    parser.add_argument("--latent-dim", type=int, default=40)
    parser.add_argument("--hidden-dims", default="400")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--valid-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="*", default=None,
                        help="subset of rows, e.g. meanfield planar-K10")
    parser.add_argument("--full-test", nargs="*", default=None,
                        help="score these trained rows on the whole test set, then stop")
    parser.add_argument("--rescore", nargs="*", default=None,
                        help="score these trained rows again from their run folders, then stop")
    parser.add_argument("--figures", action="store_true",
                        help="draw samples/reconstructions of the best row and the 2-D manifold")
    parser.add_argument("--nuts", action="store_true", help="add the NUTS posterior check")
    parser.add_argument("--nuts-guides", nargs="*", default=["meanfield", "iaf"])
    parser.add_argument("--nuts-minutes", type=float, default=5.0)
    parser.add_argument("--nuts-images", type=int, default=5)
    parser.add_argument("--nuts-reuse", action="store_true",
                        help="load the NUTS check's trained 2-D runs instead of training them")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "vae_mnist.json"
    if args.figures:
        for path in figures(json.loads(table.read_text()), out):
            print(path)
        return
    if args.rescore is not None:  # trained rows scored again (on the current test subset)
        for guide, flows in ROWS:
            name = guide + (f"-K{flows}" if flows else "")
            run_dir = out / "vae_mnist_runs" / name
            if name in args.rescore and (run_dir / "metrics.jsonl").exists():
                rows = merge_rows(table, [score_row(guide, flows, run_dir, args)])
                print(json.dumps(rows[[r["row"] for r in rows].index(name)]), flush=True)
        rows = json.loads(table.read_text())
        plot_curves(rows, out)
        print(write_table(rows, args, out).read_text())
        return
    if args.full_test:
        rows = json.loads(table.read_text())
        for row in rows:
            if row["row"] in args.full_test:
                merged = merge_rows(table, [full_test(row, args)])
                print(json.dumps(next(r for r in merged if r["row"] == row["row"])), flush=True)
        print(write_table(json.loads(table.read_text()), args, out).read_text())
        return
    for guide, flows in ROWS:
        name = guide + (f"-K{flows}" if flows else "")
        if args.rows is not None and name not in args.rows:
            continue
        row = run_row(guide, flows, args, out)
        rows = merge_rows(table, [row])
        plot_curves(rows, out)
        write_table(rows, args, out)
        print(json.dumps(row), flush=True)
    rows = json.loads(table.read_text()) if table.exists() else []
    extra = nuts_check(rows, args, out) if args.nuts else ""
    print(write_table(rows, args, out, extra).read_text())


if __name__ == "__main__":
    main()
