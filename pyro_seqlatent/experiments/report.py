r"""Learning-curve figures and the one-page report of ``make demo`` (``pyro-seqlatent demo``).

:func:`run_demo` trains every registered system that declares a ``demo`` briefly
(:func:`~pyro_seqlatent.experiments.systems.train_system`), evaluates it, draws its figures and
adds the demo sections other experiment drivers register (e.g. EM vs SVI). For every system with
a latent it also reports the posterior-collapse diagnostics (:mod:`pyro_seqlatent.infer.collapse`)
on the evaluated test points: the KL term per data point, the active units, the gap
:math:`\log\hat p(x) - \mathrm{ELBO}` and a warning when the latent is unused, and draws them
(:func:`plot_collapse`, with the values logged at each validation).
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


def _collapse_history(rows: list[dict]) -> list[tuple[int, dict]]:
    return [(r["step"], r["collapse"]) for r in rows if isinstance(r.get("collapse"), dict)]


def plot_collapse(run_dir: str | Path, diagnostics=None, out: str | Path | None = None,
                  title: str | None = None) -> Path | None:
    """The posterior-collapse figure of a run: the KL of each latent dimension per observed
    step (nats; per data point for a latent without steps) against the collapse threshold, the
    KL of each step for a sequence latent (sites ``z_0, z_1, ...``), from ``diagnostics`` (a
    :class:`~pyro_seqlatent.infer.collapse.CollapseDiagnostics`, e.g. on test data) or else the
    last validation's record, and, where ``metrics.jsonl`` holds them (``collapse_every``), the
    KL term and the active units at each validation. ``None`` when there is nothing to draw
    (no latent)."""
    run_dir = Path(run_dir)
    history = _collapse_history(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() \
        else []
    last = diagnostics.record() if diagnostics is not None else (history[-1][1] if history
                                                                 else None)
    if last is None or not last["num_units"]:
        return None
    plt = _pyplot()
    sequence = any(len(steps) > 1 for steps in last["kl_per_step"].values())
    panels = 1 + sequence + bool(history)
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.4), squeeze=False)
    axes = list(axes[0])
    source = "test" if diagnostics is not None else f"validation, step {history[-1][0]}"
    _draw_kl_per_dim(axes.pop(0), last, source)
    if sequence:
        _draw_kl_per_step(axes.pop(0), last, source)
    if history:
        _draw_history(axes.pop(0), history)
    fig.suptitle(textwrap.fill(title or f"{run_dir.name}: posterior collapse", 90), fontsize=9)
    fig.tight_layout()
    out = Path(out or run_dir / "collapse.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_kl_per_dim(ax, record: dict, source: str) -> None:
    x0 = 0
    for i, (group, dims) in enumerate(record["kl_per_dim_step"].items()):
        whole = record["kl_per_dim"][group] is None  # a flow guide: the group's KL only
        label = f"{group} (whole site: no per-dim density)" if whole else group
        ax.bar(range(x0, x0 + len(dims)), dims, color=f"C{i}", label=label)
        x0 += len(dims) + 1
    ax.axhline(record.get("kl_threshold", 0.01), color="0.5", lw=0.8, ls="--",
               label="collapse threshold")
    ax.set_yscale("symlog", linthresh=0.001)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL per step (nats)")
    units = ", ".join(f"{g}: {a}/{record['num_units'][g]}"
                      for g, a in record["active_units"].items())
    ax.set_title(f"KL per dimension ({source})\nactive units {units}", fontsize=8)
    ax.legend(frameon=False, fontsize=7)


def _draw_kl_per_step(ax, record: dict, source: str) -> None:
    for i, (group, steps) in enumerate(record["kl_per_step"].items()):
        ax.plot(range(len(steps)), steps, "o-", ms=2, color=f"C{i}", label=group)
    ax.set_xlabel("step t (site z_t)")
    ax.set_ylabel("KL of step t (nats)")
    ax.set_title(f"KL per time step, mean over observed points ({source})", fontsize=8)
    ax.legend(frameon=False, fontsize=7)


def _draw_history(ax, history: list[tuple[int, dict]]) -> None:
    steps = [s for s, _ in history]
    ax.plot(steps, [r["kl"] for _, r in history], "o-", ms=3, color="C0", label="KL term")
    ax.set_xlabel("step")
    ax.set_ylabel("KL (nats per data point)", color="C0")
    twin = ax.twinx()
    twin.plot(steps, [sum(r["active_units"].values()) for _, r in history], "s--", ms=3,
              color="C3")
    twin.set_ylabel("active units", color="C3")
    twin.set_ylim(bottom=0)
    ax.set_title("at each validation", fontsize=8)


def collapse_row(model, guide, data, spec, metrics: dict | None, device: str = "cpu"):
    r"""``(row entries, diagnostics)``: the collapse diagnostics of ``model``/``guide`` on
    ``data`` (the evaluated test points) and, from ``metrics`` (:func:`~pyro_seqlatent.infer.
    evaluate`'s), the gap :math:`\log\hat p(x) - \mathrm{ELBO}` in nats per data point;
    ``({}, None)`` for a system without a local latent."""
    from pyro_seqlatent.infer.collapse import collapse_diagnostics
    from pyro_seqlatent.infer.loader import make_loader

    loader = make_loader(data, batch_size=100, collate_fn=spec.collate_fn)
    diag = collapse_diagnostics(model, guide, loader, device=device)
    if not diag.num_units:
        return {}, None
    row = {"kl": diag.kl, "active_units": sum(diag.active_units.values()),
           "latent_units": sum(diag.num_units.values()), "collapsed": diag.collapsed(),
           "collapse_warning": diag.warning()}
    if metrics:
        row["is_elbo_gap"] = metrics["log_marginal"] - metrics["elbo"]
    return row, diag


#: published per-time-step anchors of the sequence data sets (negative test ELBO per step, nats;
#: FIELD-NOTES.md, benchmarks/results/vrnn/results.md)
PER_STEP_ANCHORS = {"jsb": "Pyro DMM −ELBO/step 6.87 (Krishnan et al. 6.93)"}


def per_step_figures(data, spec, metrics: dict, options: dict) -> dict:
    r"""For a padded-sequence system (``pad_collate``: the VRNN and RNN models), the test
    figures per scored time step, the unit of the JSB anchors: :math:`-\mathrm{ELBO/step} =
    \sum_n -\mathrm{ELBO}_n / \sum_n T_n` and the same for the NLL
    (:func:`~pyro_seqlatent.infer.scoring.sequence_steps`); ``{}`` for other systems."""
    from pyro_seqlatent.data.sequences import pad_collate
    from pyro_seqlatent.infer.loader import make_loader
    from pyro_seqlatent.infer.scoring import sequence_steps

    if spec.collate_fn is not pad_collate:
        return {}
    with torch.random.fork_rng():
        steps = sum(int(sequence_steps(b).sum())
                    for b in make_loader(data, batch_size=100, collate_fn=pad_collate))
    points = metrics["num_points"]
    return {"test_steps": steps,
            "test_neg_elbo_per_step": -metrics["elbo"] * points / steps,
            "test_nll_per_step": -metrics["log_marginal"] * points / steps,
            "per_step_anchor": PER_STEP_ANCHORS.get(options.get("dataset", ""))}


def forecast_baselines(model, guide, data, spec) -> dict:
    """For an irregular-series system (``union_grid_collate``: the Latent ODE family), the test
    MSE of its posterior-predictive mean on the scored entries (pooled over observations,
    :func:`~pyro_seqlatent.models.forecast_metrics.predictive_mse`) beside the baselines that
    need no training (:data:`~pyro_seqlatent.models.forecast_metrics.BASELINES`: persistence,
    LOCF, linear interpolation) on the same series; ``{}`` for other systems."""
    from pyro_seqlatent.data.irregular import union_grid_collate
    from pyro_seqlatent.models.forecast_metrics import BASELINES, baseline_mse, predictive_mse

    if spec.collate_fn is not union_grid_collate:
        return {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mse = {"model": predictive_mse(model, guide, data)}
    mse.update({kind: baseline_mse(data, "ours", kind)["test_mse"] for kind in BASELINES})
    return {"forecast_mse": mse}


def _forecast_lines(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if "forecast_mse" in r]
    if not rows:
        return []
    lines = ["", "Irregular series: test MSE on the scored entries (pooled over observations) of "
             "the model's posterior-predictive mean and of the baselines without training, on "
             "the same test series (docs/latent_ode.md, Baselines without training).", "",
             "| model | model MSE | persistence | LOCF | linear interpolation |",
             "|---|---|---|---|---|"]
    for r in rows:
        m = r["forecast_mse"]
        lines.append(f"| {r['model']} | {m['model']:.4g} | {m['persistence']:.4g} | "
                     f"{m['locf']:.4g} | {m['linear_interp']:.4g} |")
    return lines


def _per_step_lines(rows: list[dict]) -> list[str]:
    seq = [r for r in rows if "test_steps" in r]
    if not seq:
        return []
    lines = ["", "Sequence models per scored time step (the unit of the JSB anchors; the table "
             "above is per sequence): total over the test sequences / their unpadded steps.", "",
             "| model | test sequences | steps | −ELBO/step | NLL/step (IS) | anchor (per step) |",
             "|---|---|---|---|---|---|"]
    for r in seq:
        lines.append(f"| {r['model']} | {r['test_points']} | {r['test_steps']} | "
                     f"{r['test_neg_elbo_per_step']:.4g} | {r['test_nll_per_step']:.4g} | "
                     f"{r.get('per_step_anchor') or '–'} |")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _units(row: dict) -> str:
    if "active_units" not in row:
        return "–"
    return f"{row['active_units']}/{row['latent_units']}"


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
        try:
            rows.append(_demo_system(name, spec, out, data_root, device))
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
        "| model | options | steps | train s | final train loss | test ELBO | test log p(x) | K "
        "| KL | active units | log p(x) − ELBO |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {r['model']} | {opts} | {r['steps']} | {r['train_s']} | "
            f"{_fmt(r['final_train_loss'])} | {_fmt(r.get('test_elbo'))} | "
            f"{_fmt(r.get('test_log_px'))} | {_fmt(r.get('K'))} | {_fmt(r.get('kl'))} | "
            f"{_units(r)} | {_fmt(r.get('is_elbo_gap'))} |"
        )
    lines.append("")
    lines.append("Losses are negative ELBOs per data point (per sequence for sequence models); "
                 "test figures are per data point on a fixed random subset of the test points, "
                 "in nats. KL: the KL term of the negative ELBO on those points; active units: "
                 "latent units with Cov_x(E_q[z_u]) > 0.01 (Burda et al. 2015; a sequence "
                 "model's unit counts when it is active at some step); log p(x) − ELBO: the "
                 "gap between the importance-sampled log-likelihood and the ELBO "
                 "(pyro_seqlatent.infer.collapse).")
    lines += _per_step_lines(rows) + _forecast_lines(rows)
    warned = [r for r in rows if r.get("collapse_warning")]
    if warned:
        lines += ["", "**Warnings.**", ""]
        lines += [f"- {r['model']}: {r['collapse_warning']}" for r in warned]
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


def _demo_system(name: str, spec, out: Path, data_root: str | None, device: str) -> dict:
    """Train, evaluate and draw one registered system of the demo; its report row."""
    from pyro_seqlatent.experiments.systems import train_system
    from pyro_seqlatent.infer import evaluate

    run_dir = out / name
    t0 = time.perf_counter()
    options, settings, ev = split_demo(spec)
    if "valid_every" in settings:  # the collapse diagnostics at each validation
        settings.setdefault("collapse_every", 1)
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
    metrics, test = None, fixed_subset(datasets["test"], (ev or {}).get("max_points", 500))
    if ev:
        metrics = evaluate(model, guide, test, num_samples=ev.get("num_samples", 100),
                           batch_size=ev.get("batch_size", 100),
                           collate_fn=spec.collate_fn, batch_plate=spec.batch_plate,
                           device=device)
        row.update(test_points=metrics["num_points"], K=metrics["num_samples"],
                   test_elbo=metrics["elbo"], test_log_px=metrics["log_marginal"])
        row.update(per_step_figures(test, spec, metrics, spec.options(**options)))
    row.update(forecast_baselines(model, guide, test, spec))
    collapse, diag = collapse_row(model, guide, test, spec, metrics, device)
    row.update(collapse)
    figures = [plot_learning_curve(run_dir, title=f"{name}: learning curve")]
    if diag is not None:
        figures.append(plot_collapse(run_dir, diag, title=f"{name}: posterior collapse "
                                     f"({diag.num_points} test points)"))
    if spec.plot is not None:
        figures += list(spec.plot(model, guide, datasets, spec.options(**options),
                                  run_dir) or [])
    row["figures"] = [str(Path(f).relative_to(out)) for f in figures]
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row
