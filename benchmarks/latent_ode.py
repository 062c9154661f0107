"""Latent ODE / ODE-RNN / RNN-Δt benchmark: test MSE per cell, time per step and NFE, learning
curves and figures, plus the union-grid vs time-rescaled solve comparison.

Each cell trains one registered system for ``--minutes`` of wall time (the trainer's
``max_time_s``) and reports the masked test MSE of the posterior-predictive mean (Latent ODE, 8
samples of z0) or of the one-step predictions (baselines), on the entries the task scores.

    python benchmarks/latent_ode.py --minutes 2 \\
        --cells periodic:interp:0.5 periodic:extrap physionet:interp \\
        --models latent_ode ode_rnn rnn_dt --out benchmarks/results/latent_ode

Rows of earlier commands with the same ``--out`` are kept (a re-run cell replaces its row).
Writes ``results.json``, ``results.md``, per-cell run folders with ``metrics.jsonl``,
``learning_curve.png`` and figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from torch.utils.data import DataLoader

from pyro_seqlatent.cli import train_system
from pyro_seqlatent.data.irregular import apply_task, padded_collate, union_grid_collate
from pyro_seqlatent.data.periodic import make_periodic
from pyro_seqlatent.models.latent_ode import (
    LatentODEModel,
    masked_mse,
    nfe_metrics,
    predict,
    reset_nfe,
)
from pyro_seqlatent.registry import get_model
from pyro_seqlatent.report import plot_learning_curve

ANCHORS = {  # paper values (MSE); see FIELD-NOTES
    ("hopper", "interp", "latent_ode"): {0.1: 0.360e-2, 0.2: 0.295e-2, 0.3: 0.300e-2,
                                         0.5: 0.285e-2},
    ("hopper", "extrap", "latent_ode"): {0.1: 1.441e-2, 0.2: 1.400e-2, 0.3: 1.175e-2,
                                         0.5: 1.258e-2},
    ("hopper", "interp", "ode_rnn"): {0.1: 1.647e-2, 0.2: 1.209e-2, 0.3: 0.986e-2,
                                      0.5: 0.665e-2},
    ("physionet", "interp", "latent_ode"): {1.0: 2.118e-3},
    ("physionet", "interp", "latent_ode+poisson"): {1.0: 2.789e-3},
    ("physionet", "interp", "ode_rnn"): {1.0: 2.361e-3},
}


def parse_cell(text: str) -> dict:
    parts = text.split(":")
    dataset, task = parts[0], parts[1]
    fraction = float(parts[2]) if len(parts) > 2 else (1.0 if dataset == "physionet" else 0.5)
    return {"dataset": dataset, "task": task, "fraction": fraction}


@torch.no_grad()
def test_mse(model, guide, dataset, batch_size=50, num_samples=8) -> float:
    model.eval()
    sse = count = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=union_grid_collate):
        pred = predict(model, guide, batch, num_samples=num_samples)
        s, c = masked_mse(pred, batch["values"], batch["mask"])
        sse, count = sse + s, count + c
    model.train()
    return sse / max(count, 1.0)


def step_cost(model, guide, dataset, batch_size) -> dict:
    """Seconds and NFE of one training step (loss + backward) on one batch."""
    batch = union_grid_collate([dataset[i] for i in range(min(batch_size, len(dataset)))])
    elbo = pyro.infer.Trace_ELBO()
    reset_nfe(model, guide)
    t0 = time.perf_counter()
    loss = elbo.differentiable_loss(model, guide, **batch)
    forward = nfe_metrics(model, guide)
    loss.backward()
    out = {"step_s": time.perf_counter() - t0, **nfe_metrics(model, guide)}
    out.update({k: v for k, v in forward.items() if k.endswith("nfe_forward")})
    model.zero_grad(set_to_none=True)
    guide.zero_grad(set_to_none=True)
    return out


def run_cell(name, cell, args, out_dir: Path) -> dict:
    spec = get_model("latent_ode" if name == "latent_ode_poisson" else name)
    options = {"dataset": cell["dataset"], "task": cell["task"], "fraction": cell["fraction"],
               "n_series": args.n_series, "recipe": args.recipe,
               "quantization": args.quantization, "n_records": args.n_records}
    label = name
    if name == "latent_ode_poisson":
        label = "latent_ode+poisson"
        options.update(poisson=True)
    options = {k: v for k, v in options.items() if k in spec.defaults}
    run_dir = out_dir / f"{cell['dataset']}-{cell['task']}-{cell['fraction']}-{label}"
    settings = dict(spec.train_defaults, num_steps=10**6, max_time_s=60 * args.minutes,
                    batch_size=args.batch_size, progress=False, valid_every=None)
    result, model, guide, datasets = train_system(spec.name, options, run_dir, **settings)
    epochs = result.history[-1]["epoch"] if result.history else float("nan")
    row = {
        "model": label, **cell, "options": options, "steps": result.step,
        "epochs": epochs, "train_s": result.wall_time_s,
        "s_per_epoch": result.wall_time_s / epochs if epochs else None,
        "test_mse": test_mse(model, guide, datasets["test"]),
        **step_cost(model, guide, datasets["train"], args.batch_size),
        "command": (f"python benchmarks/latent_ode.py --minutes {args.minutes} --cells "
                    f"{cell['dataset']}:{cell['task']}:{cell['fraction']} --models {name} "
                    f"--n-series {args.n_series} --recipe {args.recipe} --quantization "
                    f"{args.quantization} --n-records {args.n_records} "
                    f"--batch-size {args.batch_size}"),
    }
    anchor = ANCHORS.get((cell["dataset"], cell["task"], label), {}).get(cell["fraction"])
    row["anchor_mse"] = anchor
    figures = [plot_learning_curve(run_dir, title=f"{label} {cell}")]
    if spec.plot is not None:
        figures += list(spec.plot(model, guide, datasets, spec.options(**options), run_dir))
    row["figures"] = [str(f) for f in figures]
    return row


def union_vs_rescaled(n_series=30, n_points=100, repeats=3, seed=0) -> dict:
    """NFE and seconds of one forward+backward solve on (a) the union grid and (b) per-sequence
    rescaled times (dopri5, rtol 1e-3 / atol 1e-4), and their largest difference in z(t_i)."""
    torch.manual_seed(seed)
    items = apply_task(make_periodic(n_series, n_points, recipe="paper", seed=seed), "interp")
    union, padded = union_grid_collate(items), padded_collate(items)
    model = LatentODEModel(1, 6, (32, 32))
    z0 = torch.randn(n_series, 6)
    out = {}
    zs = {}
    for key, batch in (("union", union), ("rescaled", padded)):
        times = []
        for _ in range(repeats):
            model.func.reset_nfe()
            t0 = time.perf_counter()
            z, _ = model.solve(z0, batch["times"])
            z.square().sum().backward()
            times.append(time.perf_counter() - t0)
        zs[key] = z.detach()
        out[key] = {"grid": list(batch["times"].shape), "s": min(times), **model.func.nfe}
    grid = union["times"].tolist()
    diff = 0.0
    for b, item in enumerate(items):
        idx = [grid.index(v) for v in item["times"].tolist()]
        diff = max(diff, float((zs["union"][b, idx] - zs["rescaled"][b, : len(idx)]).abs().max()))
    out["max_abs_diff"] = diff
    return out


def row_key(row: dict) -> tuple:
    return row["dataset"], row["task"], float(row["fraction"]), row["model"]


def load_previous(path: Path) -> tuple[list, dict | None]:
    """Rows and solve benchmark of an earlier run into the same ``--out`` (so that cells run
    by separate commands end up in one table); empty when there is none."""
    if not path.exists():
        return [], None
    saved = json.loads(path.read_text())
    return list(saved.get("rows", [])), saved.get("solve")


def merge_row(rows: list, new: dict) -> list:
    """``rows`` with ``new`` replacing the row of the same dataset/task/fraction/model."""
    return [r for r in rows if row_key(r) != row_key(new)] + [new]


def markdown(rows, solve) -> str:
    lines = ["# Latent ODE benchmark", "",
             "Test MSE on the scored entries (interp: all points; extrap: the second half). "
             "`anchor` = the paper's value where it reports one. Short CPU budgets: the gap "
             "to the anchors is the budget, see the learning curves.", "",
             "| dataset | task | observed | model | test MSE | anchor | gap (÷ anchor) | steps | "
             "epochs | s/epoch | s/step | gen NFE fwd/bwd | enc NFE fwd/bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=row_key)
    for r in rows:
        anchor = "–" if r["anchor_mse"] is None else f"{r['anchor_mse']:.4g}"
        gap = "–" if r["anchor_mse"] is None else f"{r['test_mse'] / r['anchor_mse']:.2f}×"
        gen = f"{r.get('gen_nfe_forward', '–')}/{r.get('gen_nfe_backward', '–')}"
        enc = f"{r.get('enc_nfe_forward', '–')}/{r.get('enc_nfe_backward', '–')}"
        spe = "–" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:.1f}"
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['fraction']} | {r['model']} | "
            f"{r['test_mse']:.4g} | {anchor} | {gap} | {r['steps']} | {r['epochs']:.2f} | {spe} | "
            f"{r['step_s']:.2f} | {gen} | {enc} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    if solve:
        lines += ["", "## Per-sequence times: union grid (a) vs time rescaling (b)", "",
                  "One forward + backward solve of the generative ODE (dopri5, rtol 1e-3, "
                  "atol 1e-4) for 30 toy series with their own 100 times (paper recipe).", "",
                  "| variant | grid | seconds | NFE fwd | NFE bwd |", "|---|---|---|---|---|"]
        for key in ("union", "rescaled"):
            s = solve[key]
            lines.append(f"| {key} | {s['grid']} | {s['s']:.3f} | {s['nfe_forward']} | "
                         f"{s['nfe_backward']} |")
        lines += ["", f"Largest |z_a(t_i) − z_b(t_i)|: {solve['max_abs_diff']:.2e}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per cell")
    p.add_argument("--cells", nargs="+", default=["periodic:interp:0.5", "periodic:extrap"])
    p.add_argument("--models", nargs="+", default=["latent_ode", "ode_rnn", "rnn_dt"],
                   help="latent_ode, latent_ode_poisson, ode_rnn, rnn_dt")
    p.add_argument("--n-series", type=int, default=1000)
    p.add_argument("--recipe", default="code", choices=["paper", "code"])
    p.add_argument("--quantization", type=float, default=0.1)
    p.add_argument("--n-records", type=int, default=0, help="PhysioNet subset (0 = all 8000)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--no-solve-bench", action="store_true")
    p.add_argument("--out", default="benchmarks/results/latent_ode")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, solve = load_previous(out / "results.json")
    for text in args.cells:
        cell = parse_cell(text)
        for name in args.models:
            print(f"[latent_ode bench] {cell} {name}", flush=True)
            rows = merge_row(rows, run_cell(name, cell, args, out))
            (out / "results.json").write_text(json.dumps({"rows": rows, "solve": solve},
                                                         indent=2, default=str))
    if not args.no_solve_bench:
        solve = union_vs_rescaled()
    (out / "results.json").write_text(json.dumps({"rows": rows, "solve": solve}, indent=2,
                                                 default=str))
    (out / "results.md").write_text(markdown(rows, solve))
    print(markdown(rows, solve))


if __name__ == "__main__":
    main()
