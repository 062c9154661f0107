"""Sigmoid belief network (one, or with ``--layers``, more layers of 200 binary units) on
statically binarized MNIST, trained with each discrete-latent estimator for the same CPU time:
test -log p(x) and the guide's gradient variance and SNR along training, beside the published
NVIL and VIMCO figures.

Every row trains the registered ``sbn`` system (``pyro_seqlatent.models.sbn``: linear
recognition model, as NVIL's SBN) from the same seed and the same initial parameters (decoder
bias at the training pixels' marginal log-odds) with one estimator of
``pyro_seqlatent.infer.estimators`` (``make_estimator(name, K)``), Adam, batches of 20, for
``--minutes`` CPU minutes of one thread (``train(..., time_budget="process")``), validating every
``--valid-every`` steps with the row's own objective and keeping the best-validation
parameters. Then:

* test -log p(x): ``evaluate`` (importance sampling with the guide, ``--num-samples`` draws) on
  ``--test-points`` test images drawn at random (``fixed_subset(test, seed 0)``), and the
  one-sample test -ELBO;
* gradient variance and SNR of the row's estimator for the guide (and model) parameters
  (``gradient_stats``, ``--draws`` draws on one fixed batch of 50 validation images, a stateful
  baseline gets its ``warmup`` draws first) at the initial parameters, at 5 %, 25 % and 50 % of
  the budget and at the best-validation parameters.

    OMP_NUM_THREADS=1 python benchmarks/sbn.py --rows vimco-K5 reinforce_loo-K5 --minutes 20
    OMP_NUM_THREADS=1 python benchmarks/sbn.py --minutes 0.2 --num-samples 50 --test-points 50 \\
        --out /tmp/sbn                                                         # smoke test
    python benchmarks/sbn.py --table          # rewrite results.md from results.json
    OMP_NUM_THREADS=1 python benchmarks/sbn.py --rescore vimco-K5 --num-samples 5000
    OMP_NUM_THREADS=1 python benchmarks/sbn.py --layers 2 --rows vimco-K5 --minutes 20 \\
        --out benchmarks/results/sbn/deep                            # 200H-200H-784V

Rows are merged into ``benchmarks/results/sbn/results.json`` by name, so several invocations
(``--rows``, one per core) may run at once. Run folders (``sbn_runs/<row>/``, with
``best.pt`` and ``metrics.jsonl``) are git-ignored; ``load_run`` reads them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import _results  # benchmarks/_results.py (this script's folder is on sys.path)
import pyro
import torch

from pyro_seqlatent.data.mnist import BinarizedMNIST
from pyro_seqlatent.data.subsets import fixed_subset
from pyro_seqlatent.infer import evaluate, train
from pyro_seqlatent.infer.estimators import ESTIMATORS, gradient_stats, make_estimator
from pyro_seqlatent.infer.run import RUN_CONFIG
from pyro_seqlatent.infer.run_files import write_json
from pyro_seqlatent.registry import get_model, load_builtin_models

OUT = Path(__file__).resolve().parent / "results" / "sbn"
ROWS = {  # row -> (estimator, K)
    "score_nn_baseline": ("score_nn_baseline", 1),
    "score_avg_baseline": ("score_avg_baseline", 1),
    "vimco-K5": ("vimco", 5),
    "reinforce_loo-K5": ("reinforce_loo", 5),
    "concrete": ("concrete", 1),
}
SNAPSHOTS = (0.05, 0.25, 0.5)  # fractions of the budget at which the gradient is measured
# Published test -log p(x) (nats) of the same one-layer linear SBN, 200 binary latents ->
# 784 pixels ("(200H - 784V)"), on statically binarized MNIST: Maddison, Mnih & Teh 2017 ("The
# Concrete distribution", ICLR), Table 1, test NLL by L_50000 over the whole test set; their
# m = 1 "VIMCO" column is NVIL (Mnih & Gregor 2014), m = 5 is VIMCO (Mnih & Rezende 2016).
PUBLISHED = {
    "score_nn_baseline": ("NVIL, m = 1", 104.4),
    "vimco-K5": ("VIMCO, m = 5", 101.9),
    "concrete": ("Concrete, m = 1", 107.3),
}
PUBLISHED_NOTES = (
    "Maddison, Mnih & Teh 2017 (The Concrete distribution, ICLR), Table 1, MNIST, binary "
    "model (200H – 784V) (linear, 200 binary latents: this SBN), test NLL estimated with "
    "L_50,000 on the whole test set: NVIL (m = 1) 104.4, VIMCO m = 5 101.9, m = 50 98.8; "
    "Concrete m = 1 107.3, m = 5 104.9, m = 50 104.3 (the table's 'VIMCO' column at m = 1 is "
    "NVIL). Their units take values in {-1, 1}, ours in {0, 1} (the same model family up to "
    "a reparameterization of W and c); their temperatures were tuned, ours is 0.5.",
)
IS_NOTE = ("Our -log p(x) uses {samples} importance samples per image on {points} test images "
           "(their 50,000 on all 10,000): the log of an average is biased upwards, so a part of "
           "the gap is the estimator's (`--rescore ROW --num-samples N` measures it).")


# The two-layer linear model "(200H - 200H - 784V)", the same table (test NLL, L_50000).
PUBLISHED_DEEP: dict[int, dict[str, tuple[str, float]]] = {  # layers -> row -> figure
    2: {"score_nn_baseline": ("NVIL, m = 1", 92.9), "vimco-K5": ("VIMCO, m = 5", 91.7),
        "concrete": ("Concrete, m = 1", 102.1)},
}
PUBLISHED_NOTES_DEEP: dict[int, tuple[str, ...]] = {
    2: ("Maddison, Mnih & Teh 2017 (The Concrete distribution, ICLR), Table 1, MNIST, binary "
        "model (200H – 200H – 784V) (two linear layers of 200 binary latents: this SBN with "
        "--layers 2), test NLL estimated with L_50,000 on the whole test set: NVIL (m = 1) "
        "92.9, VIMCO m = 5 91.7, m = 50 90.7; Concrete m = 1 102.1, m = 5 99.9, m = 50 99.5. "
        "Their units take values in {-1, 1}, ours in {0, 1}; their temperatures were tuned, "
        "ours is 0.5.",),
}


def _layers(rows: list[dict]) -> int:
    layers = {r.get("layers", 1) for r in rows}
    if len(layers) > 1:
        raise SystemExit(f"rows of different depths {sorted(layers)} in one results.json: "
                         "give each depth its own --out")
    return layers.pop() if layers else 1


def _model_label(rows: list[dict]) -> str:
    hidden = rows[0].get("hidden_dim", 200) if rows else 200
    return "–".join([f"{hidden}H"] * _layers(rows) + ["784V"])


def _published(row: dict) -> dict:
    layers = row.get("layers", 1)
    return PUBLISHED if layers == 1 else PUBLISHED_DEEP.get(layers, {})


def _row_settings(name: str) -> tuple[str, int]:
    if name not in ROWS:
        raise SystemExit(f"unknown row {name!r}; choose from {list(ROWS)}")
    return ROWS[name]


def _snapshot(model, guide) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "guide": copy.deepcopy(guide.state_dict())}


def _restore(model, guide, snap: dict) -> None:
    model.load_state_dict(snap["model"])
    guide.load_state_dict(snap["guide"])


def build_pair(args, train_data):
    """The ``sbn`` pair of every row: same seed, decoder bias at the marginal log-odds."""
    load_builtin_models()
    spec = get_model("sbn")
    options = spec.options(hidden_dim=args.hidden_dim, layers=args.layers,
                           guide_hidden=args.guide_hidden, valid_limit=args.valid_points)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model, guide = spec.build(options)
    with torch.no_grad():
        mean = train_data.images.mean(0).clamp(1e-3, 1 - 1e-3)
        model.decoder.bias.copy_(torch.logit(mean))
    return spec, options, model, guide


def norm_snr(group) -> float:
    """Signal norm over noise norm, the noise's share of the squared mean norm removed."""
    total = float(group.var.double().sum())
    signal = float(group.mean.double().pow(2).sum()) - total / group.num_draws
    return math.sqrt(max(signal, 0.0) / total) if total > 0 else math.inf


def grad_point(model, guide, batch, estimator, spec, args, label: str, step, cpu_s) -> dict:
    stats = gradient_stats(model, guide, batch, estimator, num_draws=args.draws,
                           warmup=spec.warmup, seed=args.seed)
    point = {"at": label, "step": step, "cpu_s": cpu_s, "loss": stats.loss_mean / len(batch),
             "draws": args.draws}
    for group in ("guide", "model"):
        g = stats.groups[group]
        s = g.summary()
        point[group] = {"mean_variance": s["mean_variance"], "mean_snr": s["mean_snr"],
                        "median_snr": s["median_snr"], "norm_snr": norm_snr(g), "flag": g.flag}
    return point


def run_row(name: str, args, out: Path) -> dict:
    estimator_name, k = _row_settings(name)
    spec_est = ESTIMATORS[estimator_name]
    data = {"train": BinarizedMNIST("train"),
            "valid": BinarizedMNIST("valid", limit=args.valid_points)}
    spec, options, model, guide = build_pair(args, data["train"])
    run_dir = out / "sbn_runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json({"model": "sbn", "options": options, "data_root": None}, run_dir / RUN_CONFIG)
    estimator = make_estimator(estimator_name, k)
    budget = args.minutes * 60
    snaps = [("init", 0, 0.0, _snapshot(model, guide))]
    pending = list(SNAPSHOTS)

    def callback(record, model_, guide_):
        if pending and record["time_s"] >= pending[0] * budget:
            snaps.append((f"{round(pending.pop(0) * 100)}%", record["step"],
                          round(record["time_s"], 1), _snapshot(model_, guide_)))

    t0 = time.perf_counter()
    result = train(model, guide, data["train"], valid_data=data["valid"], elbo=estimator,
                   run_dir=run_dir, batch_size=args.batch_size, lr=args.lr, num_epochs=10_000,
                   max_time_s=budget, time_budget="process", valid_every=args.valid_every,
                   checkpoint_every=10_000, return_best=True, seed=args.seed, progress=False,
                   drop_last=True, callbacks=[callback])
    wall = time.perf_counter() - t0
    best = _snapshot(model, guide)
    row = {"row": name, "estimator": estimator_name, "K": k, "steps": result.step,
           "best_step": result.best_step,
           "train_cpu_s": round(result.budget_time_s, 1), "wall_s": round(wall, 1),
           "minutes": args.minutes, "lr": args.lr, "batch_size": args.batch_size,
           "layers": args.layers, "hidden_dim": args.hidden_dim,
           "biased": spec_est.biased, "bound": spec_est.bound}
    row.update(score(model, guide, args))
    batch = torch.stack(list(fixed_subset(BinarizedMNIST("valid"), 50, seed=1)))
    points = []
    for label, step, cpu_s, snap in snaps + [("best", result.best_step,
                                              row["train_cpu_s"], best)]:
        _restore(model, guide, snap)
        points.append(grad_point(model, guide, batch, estimator, spec_est, args, label, step,
                                 cpu_s))
    _restore(model, guide, best)
    row["gradients"] = points
    row["run_dir"] = str(run_dir)
    row["command"] = (f"OMP_NUM_THREADS=1 python benchmarks/sbn.py --rows {name} --minutes "
                      f"{args.minutes} --num-samples {args.num_samples} --test-points "
                      f"{args.test_points} --draws {args.draws}"
                      + (f" --layers {args.layers}" if args.layers != 1 else "")
                      + (f" --out {args.out}" if args.out != OUT else ""))
    return row


def score(model, guide, args) -> dict:
    test = fixed_subset(BinarizedMNIST("test"), args.test_points)
    ev = evaluate(model, guide, test, num_samples=args.num_samples, batch_size=50,
                  chunk_size=500, seed=args.seed)
    return {"test_nll": -ev["log_marginal"], "test_nll_sem": ev["log_marginal_sem"],
            "test_neg_elbo": -ev["elbo"], "test_neg_elbo_sem": ev["elbo_sem"],
            "num_samples": args.num_samples, "test_points": ev["num_points"],
            "test_subset": "fixed_subset(test, seed 0)"}


def rescore(names: list[str], args, path: Path) -> list[dict]:
    """The rows ``names`` of ``results.json`` scored again from their run folders' best
    checkpoints (``load_run``) with this invocation's ``--num-samples`` / ``--test-points``;
    training figures and gradients are kept."""
    from pyro_seqlatent.infer import load_run

    rows = {r["row"]: r for r in json.loads(path.read_text())}
    missing = [n for n in names if n not in rows]
    if missing:
        raise SystemExit(f"--rescore: no rows {missing} in {path}")
    fresh = []
    for name in names:
        run = load_run(rows[name]["run_dir"], which="best")
        row = {**rows[name], **score(run.model, run.guide, args)}
        row["command"] = row["command"].split(" && python benchmarks/sbn.py --rescore")[0]
        row["command"] += (f" && python benchmarks/sbn.py --rescore {name} --num-samples "
                           f"{args.num_samples} --test-points {args.test_points}"
                           + (f" --out {args.out}" if args.out != OUT else ""))
        fresh.append(row)
    return _results.merge_rows(path, fresh, order=_order)


def _f(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _g(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def write_markdown(rows: list[dict], path: Path) -> None:
    draws = min((r["gradients"][0].get("draws", 300) for r in rows), default=300)
    floor = f"{math.sqrt(2 / (math.pi * draws)):.3f}"
    lines = [
        f"# Sigmoid belief network ({_model_label(rows)}) on binarized MNIST: estimators at "
        "equal CPU time",
        "",
        "Test −log p(x) by importance sampling (nats, mean ± s.e. over the test subset; lower "
        "is better) at each row's best-validation parameters. Guide gradient of the row's own "
        "estimator on one batch of 50 validation images, at the initial parameters → at the "
        "best ones: mean per-coordinate variance, median per-coordinate SNR |ḡ_i|/sd_i (noise "
        "floor for a zero-mean coordinate ≈ {floor}) and norm SNR (signal norm over noise norm, "
        "the noise's share of the squared mean removed; 0: no signal detectable in the "
        "draws).".replace("{floor}", floor),
        "",
        "| row | K | CPU min | steps | best step | test −log p(x) | test −ELBO | guide var "
        "| guide median SNR | guide norm SNR | published | gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g0, g1 = r["gradients"][0]["guide"], r["gradients"][-1]["guide"]
        pub = _published(r).get(r["row"])
        gap = f"{r['test_nll'] - pub[1]:+.1f}" if pub else "–"
        bias = " (biased)" if r.get("biased") else ""
        bias += " (see notes)" if r.get("note") else ""
        lines.append(
            f"| {r['row']}{bias} | {r['K']} | {_f(r['train_cpu_s'] / 60, 1)} | {r['steps']} | "
            f"{r['best_step']} | {_f(r['test_nll'])} ± {_f(r['test_nll_sem'])} | "
            f"{_f(r['test_neg_elbo'])} | {_g(g0['mean_variance'])} → {_g(g1['mean_variance'])} "
            f"| {_g(g0['median_snr'])} → {_g(g1['median_snr'])} | "
            f"{_g(g0['norm_snr'])} → {_g(g1['norm_snr'])} | "
            f"{f'{pub[1]} ({pub[0]})' if pub else '–'} | {gap} |")
    samples = sorted({r["num_samples"] for r in rows})
    points = sorted({r["test_points"] for r in rows})
    notes = PUBLISHED_NOTES if _layers(rows) == 1 else PUBLISHED_NOTES_DEEP.get(_layers(rows), ())
    lines += ["", "Published figures:", ""] + [f"* {n}" for n in notes] + [
        "* " + IS_NOTE.format(samples=" / ".join(map(str, samples)),
                              points=" / ".join(map(str, points)))]
    lines += ["", "Learning curves (each row's own validation objective against CPU minutes): "
              "![learning curves](curves.png)"]
    lines += ["", "Guide gradient along training (mean variance / median SNR / norm SNR; the "
              "mean per-coordinate SNR is not shown: coordinates whose gradient is nearly "
              "constant, e.g. saturated units under leave-one-out baselines, make it "
              "meaningless):", "",
              "| row | " + " | ".join(["init", "5%", "25%", "50%", "best"]) + " |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{_g(p['guide']['mean_variance'])} / {_g(p['guide']['median_snr'])} / "
                 f"{_g(p['guide']['norm_snr'])}" for p in r["gradients"]]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    by_k = [r for r in rows if r.get("nll_by_samples")]
    if by_k:
        ks = sorted({int(k) for r in by_k for k in r["nll_by_samples"]})
        lines += ["", "Test −log p(x) against the number of importance samples (the same "
                  "parameters; the estimate falls towards −log p(x) as K grows):", "",
                  "| row | " + " | ".join(f"K = {k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        lines += [f"| {r['row']} | " + " | ".join(_f(r["nll_by_samples"].get(str(k)))
                                                  for k in ks) + " |" for r in by_k]
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"* {r['row']}: {r['note']}" for r in notes]
    lines += ["", "Commands:", ""] + [f"* `{r['command']}`" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(rows: list[dict], path: Path) -> bool:
    """``curves.png``: each row's validation objective (its own bound, nats per image: the
    ELBO, or the K-sample bound for VIMCO, or the relaxed ELBO for Concrete) against CPU
    minutes, read from the run folders' ``metrics.jsonl``; False when none is on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for r in rows:
        log = Path(r["run_dir"]) / "metrics.jsonl"
        if not log.exists():
            continue
        points = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        points = [(p["time_s"] / 60, p["valid_loss"]) for p in points if "valid_loss" in p]
        if points:
            bound = {"elbo": "−ELBO", "iwae": f"−{r['K']}-sample bound"}.get(
                r.get("bound"), f"−{r.get('bound')}")
            bias = ", relaxed" if r.get("biased") else ""
            ax.plot(*zip(*points), label=f"{r['row']} ({bound}{bias})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("CPU minutes (one thread)")
    ax.set_ylabel("validation objective (nats per image)")
    lows = [r["test_nll"] for r in rows]
    ax.set_ylim(min(lows) - 5, min(lows) + 45)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"SBN {_model_label(rows)}: each row's own objective on 1,000 validation "
                 "images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _order(row: dict) -> int:
    return list(ROWS).index(row["row"]) if row["row"] in ROWS else len(ROWS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="CPU minutes of training per row (one thread)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--test-points", type=int, default=1000)
    parser.add_argument("--valid-points", type=int, default=1000)
    parser.add_argument("--valid-every", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--hidden-dim", type=int, default=200)
    parser.add_argument("--layers", type=int, default=1,
                        help="stochastic layers of --hidden-dim units (2: 200H-200H-784V); "
                        "write them to their own --out")
    parser.add_argument("--guide-hidden", default="")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rescore", nargs="+", choices=list(ROWS), metavar="ROW",
                        help="score these rows again from their run folders (no training)")
    parser.add_argument("--table", action="store_true",
                        help="only rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.num_samples < 1 or args.test_points < 1 or args.draws < 2:
        parser.error("--minutes must be > 0, --num-samples and --test-points >= 1, --draws >= 2")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    if args.table:
        rows = json.loads(path.read_text())
        write_markdown(rows, args.out / "results.md")
        plot_curves(rows, args.out / "curves.png")
        return
    if path.exists() and not args.rescore:  # one depth per results folder, checked up front
        known = {r.get("layers", 1) for r in json.loads(path.read_text())}
        if known and known != {args.layers}:
            parser.error(f"{path} holds rows with layers={sorted(known)}; give --layers "
                         f"{args.layers} its own --out (e.g. benchmarks/results/sbn/deep)")
    torch.set_num_threads(1)
    if args.rescore:
        rows = rescore(args.rescore, args, path)
        with _results.locked(args.out / "results.md"):
            write_markdown(rows, args.out / "results.md")
        return
    for name in args.rows:
        row = run_row(name, args, args.out)
        rows = _results.merge_rows(path, [row], order=_order)
        with _results.locked(args.out / "results.md"):
            write_markdown(rows, args.out / "results.md")
            plot_curves(rows, args.out / "curves.png")
        print(f"{name}: test -log p(x) {row['test_nll']:.2f} ± {row['test_nll_sem']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
