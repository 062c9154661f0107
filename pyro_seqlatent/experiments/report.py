"""Learning-curve figures and the one-page report of ``make demo`` (``pyro-seqlatent demo``).

:func:`run_demo` trains every registered system that declares a ``demo`` briefly
(:func:`~pyro_seqlatent.experiments.systems.train_system`), evaluates it, draws its figures and
adds the demo sections other experiment drivers register (e.g. EM vs SVI).
"""

from __future__ import annotations

import json
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from pyro_seqlatent.data.subsets import fixed_subset
from pyro_seqlatent.infer.run import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(run_dir: str | Path, out: str | Path | None = None,
                        title: str | None = None) -> Path:
    """Training loss (running mean) and validation loss per step, from ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"no metrics in {run_dir}")
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    loss = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
    window = max(1, len(rows) // 50)
    smooth = torch.nn.functional.avg_pool1d(loss[None, None], window, 1).flatten()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss.numpy(), color="0.8", lw=0.8, label="train (per step)")
    ax.plot(steps[window - 1:], smooth.numpy(), color="C0", label=f"train (mean of {window})")
    valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    if valid:
        ax.plot(*zip(*valid), "o-", color="C1", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO per data point")
    lo, hi = float(smooth.min()), float(torch.quantile(loss, 0.95))
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.legend(frameon=False)
    ax.set_title(textwrap.fill(title or run_dir.name, 60), fontsize=9)  # long tags wrap
    fig.tight_layout()
    out = Path(out or run_dir / "learning_curve.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def split_demo(spec) -> tuple[dict, dict, dict]:
    """``(model options, train settings, eval settings)`` of a spec's ``demo`` entry, given either
    as ``{"options": ..., "train": ..., "eval": ...}`` or as one flat dict of both kinds of keys."""
    from pyro_seqlatent.infer.config import GROUP_OF

    demo = dict(spec.demo)
    ev = demo.pop("eval", None) or {}
    if "options" in demo or "train" in demo:
        return dict(demo.get("options") or {}), dict(demo.get("train") or {}), ev
    train_keys = set(GROUP_OF)  # every training setting by its flat name
    options = {k: v for k, v in demo.items() if k in spec.defaults}
    settings = {k: v for k, v in demo.items() if k in train_keys and k not in options}
    unknown = set(demo) - set(options) - set(settings)
    if unknown:
        raise ValueError(f"demo entry of {spec.name!r} has unknown keys {sorted(unknown)}")
    return options, settings, ev


def run_demo(out: Path, models: list[str] | None = None, data_root: str | None = None,
             device: str = "cpu") -> Path:
    """Train every registered system that declares a ``demo`` briefly on real data, evaluate it,
    draw its figures and write ``out/report.md`` (+ ``report.json``)."""
    from pyro_seqlatent.experiments.systems import train_system
    from pyro_seqlatent.infer import evaluate
    from pyro_seqlatent.registry import get_model, list_demo_sections, list_models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections_available = list_demo_sections()
    unknown = [m for m in (models or []) if m not in list_models() and m not in
               sections_available]
    if unknown:
        raise ValueError(f"unknown demo entries {unknown}; models: {list_models()}, sections: "
                         f"{sorted(sections_available)}")
    names = [m for m in (models or list_models()) if m in list_models() and get_model(m).demo]
    rows, sections, failures = [], [], []
    t_start = time.perf_counter()
    for name in names:
        spec = get_model(name)
        demo = spec.demo
        if not demo:
            continue
        print(f"[demo] {name}: training", flush=True)
        run_dir = out / name
        t0 = time.perf_counter()
        try:
            options, settings, ev = split_demo(spec)
            result, model, guide, datasets = train_system(
                name, options, run_dir, data_root=data_root, device=device, **settings)
            row: dict[str, Any] = {
                "model": name,
                "options": options,
                "steps": result.step,
                "train_s": round(result.wall_time_s, 1),
                "final_train_loss": result.final_loss,
                "best_valid_loss": result.best_valid,
            }
            if ev:
                test = datasets["test"]
                test = fixed_subset(test, ev.get("max_points"))
                metrics = evaluate(model, guide, test, num_samples=ev.get("num_samples", 100),
                                   batch_size=ev.get("batch_size", 100),
                                   collate_fn=spec.collate_fn, batch_plate=spec.batch_plate,
                                   device=device)
                row.update(test_points=metrics["num_points"], K=metrics["num_samples"],
                           test_elbo=metrics["elbo"], test_log_px=metrics["log_marginal"])
            figures = [plot_learning_curve(run_dir, title=f"{name}: learning curve")]
            if spec.plot is not None:
                figures += list(spec.plot(model, guide, datasets, spec.options(**options),
                                          run_dir) or [])
            row["figures"] = [str(Path(f).relative_to(out)) for f in figures]
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
        except Exception as err:  # report it, keep going, fail at the end
            traceback.print_exc()
            failures.append((name, repr(err)))
    for name, section in sections_available.items():
        if models and name not in models:
            continue
        print(f"[demo] {name}", flush=True)
        try:
            sections.append((name, section(out / name, data_root, device)))
        except Exception as err:
            traceback.print_exc()
            failures.append((name, repr(err)))
    total = time.perf_counter() - t_start
    lines = [
        "# pyro_seqlatent demo report",
        "",
        f"Short end-to-end runs of every registered system on real data ({total / 60:.1f} min "
        f"in all, device {device}). Made by `make demo` (`pyro-seqlatent demo --out {out}`). "
        "These are minutes-long smoke runs, not the benchmark tables (see `benchmarks/`).",
        "",
        "| model | options | steps | train s | final train loss | test ELBO | test log p(x) | K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {r['model']} | {opts} | {r['steps']} | {r['train_s']} | "
            f"{_fmt(r['final_train_loss'])} | {_fmt(r.get('test_elbo'))} | "
            f"{_fmt(r.get('test_log_px'))} | {_fmt(r.get('K'))} |"
        )
    lines.append("")
    lines.append("Losses are negative ELBOs per data point (per sequence for sequence models); "
                 "test figures are per data point on the first test points, in nats.")
    for r in rows:
        lines += ["", f"## {r['model']}", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in r["figures"]]
    for name, markdown in sections:
        lines += ["", f"## {name}", "", markdown]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {n}: `{e}`" for n, e in failures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"rows": rows, "failures": failures,
                                                 "total_s": total}, indent=2, default=str))
    print(f"[demo] wrote {report}")
    if failures:
        raise SystemExit(f"demo failed for: {[n for n, _ in failures]}")
    return report
