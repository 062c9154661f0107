r"""Short validation runs that choose the registered defaults (issue 28 item 4).

Each row trains one registered system with :func:`pyro_seqlatent.experiments.systems.
train_system` for ``--minutes`` of CPU time of its process (``time_budget="process"``; run two
invocations side by side with ``OMP_NUM_THREADS=1``, one per core), validating every
``--valid-every`` steps, and records the validation curve (the negative ELBO per data point the
trainer logs) and three figures of it:

* ``best`` and ``last``: the lowest and the final validation loss;
* ``rises``: how many validations were above the one before (a smooth curve has few);
* ``worst_rise``: the largest rise of a validation above the best one before it,
  :math:`\max_i \bigl(v_i - \min_{j<i} v_j\bigr)` (0 for a curve that never goes back up),
  in the loss's units, and the same relative to that best, :math:`\max_i (v_i - b_i)/|b_i|`
  with :math:`b_i = \min_{j<i} v_j` (``worst_rise_rel``: 1.0 means the loss doubled).

Every row names all its model options and training settings that differ from the registry's, so
a row means the same thing after the registered defaults change: ``latent_ode-*`` rows differ
in ``lr`` only; ``vrnn-*-old`` is the registered VRNN before issue 28 (z 32, h = feature =
hidden = 128, no annealing, no averaging), ``vrnn-*-new`` the recipe of ``docs/vrnn.md``'s
regularised JSB rows (z 16, h = feature = hidden = 64, KL annealing from 0.1 over 8,000 steps,
Polyak averaging 0.999), without weight decay (it cost FSDD hundreds of nats per sequence).

Outputs under ``--out`` (default ``benchmarks/results/defaults``): ``results.json`` and
``results.md`` (rows of several invocations are merged by name), ``curves.png``.

    OMP_NUM_THREADS=1 python benchmarks/defaults.py --rows latent_ode-periodic-lr1e-2 --minutes 2.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import _results  # benchmarks/_results.py (this script's folder is on sys.path)
import pyro
import torch

from pyro_seqlatent.experiments.systems import train_system

OLD_VRNN = {"z_dim": 32, "h_dim": 128, "feature_dim": 128, "hidden_dim": 128}
NEW_VRNN = {"z_dim": 16, "h_dim": 64, "feature_dim": 64, "hidden_dim": 64}
OLD_VRNN_TRAIN = {"kl_anneal_steps": 0, "kl_anneal_start": 0.0, "ema_decay": 0.0}
NEW_VRNN_TRAIN = {"kl_anneal_steps": 8000, "kl_anneal_start": 0.1, "ema_decay": 0.999}

#: the toy series of docs/latent_ode.md's periodic table (the default "paper" recipe's stiff
#: series take ~8 CPU s per step: 21 steps in 2.5 minutes)
PERIODIC = {"dataset": "periodic", "recipe": "code"}
#: row -> (system, model options, training settings over the registry's train_defaults)
ROWS = {
    "latent_ode-periodic-lr1e-2": ("latent_ode", PERIODIC, {"lr": 1e-2}),
    "latent_ode-periodic-lr3e-3": ("latent_ode", PERIODIC, {"lr": 3e-3}),
    "latent_ode-periodic-lr1e-3": ("latent_ode", PERIODIC, {"lr": 1e-3}),
    "latent_ode-physionet-lr1e-2": ("latent_ode", {"dataset": "physionet"}, {"lr": 1e-2}),
    "latent_ode-physionet-lr3e-3": ("latent_ode", {"dataset": "physionet"}, {"lr": 3e-3}),
    "latent_ode-physionet-lr1e-3": ("latent_ode", {"dataset": "physionet"}, {"lr": 1e-3}),
    "vrnn-jsb-old": ("vrnn", {"dataset": "jsb", **OLD_VRNN}, OLD_VRNN_TRAIN),
    "vrnn-jsb-new": ("vrnn", {"dataset": "jsb", **NEW_VRNN}, NEW_VRNN_TRAIN),
    "vrnn-fsdd-old": ("vrnn", {"dataset": "fsdd", **OLD_VRNN}, OLD_VRNN_TRAIN),
    "vrnn-fsdd-new": ("vrnn", {"dataset": "fsdd", **NEW_VRNN}, NEW_VRNN_TRAIN),
}


def curve_figures(valid: list[float]) -> dict:
    """``best``, ``last``, ``rises`` and ``worst_rise`` of a validation curve (module doc)."""
    if not valid:
        return {"best": None, "last": None, "rises": 0, "worst_rise": 0.0, "worst_rise_rel": 0.0}
    rises = sum(1 for a, b in zip(valid, valid[1:]) if b > a)
    worst, relative, best = 0.0, 0.0, valid[0]
    for v in valid[1:]:
        worst = max(worst, v - best)
        relative = max(relative, (v - best) / abs(best)) if best else relative
        best = min(best, v)
    return {"best": min(valid), "last": valid[-1], "rises": rises, "worst_rise": worst,
            "worst_rise_rel": relative}


def command(row: str, args) -> str:
    return (f"OMP_NUM_THREADS=1 python benchmarks/defaults.py --rows {row} --minutes "
            f"{args.minutes:g}" + (f" --valid-every {args.valid_every}"
                                   if args.valid_every != 25 else "")
            + (f" --seed {args.seed}" if args.seed else ""))


def run_row(row: str, args) -> dict:
    system, options, settings = ROWS[row]
    pyro.set_rng_seed(args.seed)
    result, *_ = train_system(
        system, options, args.out / "runs" / row, num_steps=10**8,
        max_time_s=60.0 * args.minutes, time_budget="process", valid_every=args.valid_every,
        progress=False, seed=args.seed, **settings)
    curve = [(r["step"], r["valid_loss"]) for r in result.history if "valid_loss" in r]
    return {"row": row, "system": system, "options": options, "train_settings": settings,
            "steps": result.step, "cpu_s": round(result.budget_time_s, 1),
            "stopped": result.stopped, "curve": curve,
            **curve_figures([v for _, v in curve]), "command": command(row, args)}


def markdown(rows: list[dict]) -> str:
    lines = ["| row | system | changed settings | steps / CPU s | validations | best valid | "
             "last valid | rises | worst rise (relative) | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changed = {**r["options"], **r["train_settings"]}
        f = curve_figures([v for _, v in r["curve"]])  # rows stored before a figure existed too
        lines.append(
            f"| {r['row']} | {r['system']} | `{json.dumps(changed)}` | {r['steps']} / "
            f"{r['cpu_s']:.0f} | {len(r['curve'])} | {f['best']:.1f} | {f['last']:.1f} | "
            f"{f['rises']} | {f['worst_rise']:.1f} ({f['worst_rise_rel']:.0%}) | "
            f"`{r['command']}` |")
    lines += ["", "Validation loss: the negative ELBO per data point (a series for the Latent "
              "ODE, a sequence for the VRNN), β = 1, scored by the trainer every "
              "`--valid-every` steps; rises: validations above the one before; worst rise: the "
              "largest excess of a validation over the best one before it (relative: over "
              "|that best|)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["row"].rsplit("-", 1)[0] for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in rows:
            if r["row"].rsplit("-", 1)[0] == group and r["curve"]:
                steps, valid = zip(*r["curve"])
                ax.plot(steps, valid, "o-", ms=2, label=r["row"].rsplit("-", 1)[1])
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("valid −ELBO per data point")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="validation runs behind the defaults")
    parser.add_argument("--rows", default="latent_ode-periodic-lr1e-2",
                        help=f"comma list or 'all'; rows: {', '.join(ROWS)}")
    parser.add_argument("--minutes", type=float, default=2.5, help="CPU minutes per row")
    parser.add_argument("--valid-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/defaults"))
    parser.add_argument("--table", action="store_true",
                        help="only redraw results.md and curves.png from results.json")
    args = parser.parse_args(argv)
    if args.table:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "results.md").write_text(markdown(results))
        plot(results, args.out / "curves.png")
        return results
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; known: {list(ROWS)}")
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = []
    for row in rows:
        out = run_row(row, args)
        results = _results.merge_rows(path, [out], order=lambda r: list(ROWS).index(r["row"]))
        print(json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
        (args.out / "results.md").write_text(markdown(results))
        plot(results, args.out / "curves.png")
    return results


if __name__ == "__main__":
    main()
