"""Markdown tables and figures of an estimator comparison (``compare-estimators``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pyro_seqlatent.infer.estimators_stats import GradientStats, TrainingCurve


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "nan" if math.isnan(value) else "inf"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def stats_table(stats: dict[str, GradientStats], reference: str | None = "reparam") -> str:
    """Estimator × parameter group → mean variance, its ratio to ``reference``'s, SNRs."""
    lines = ["| estimator | group | params | mean variance | variance / " + (reference or "—")
             + " | median SNR | mean SNR | ‖E g‖/√tr Var | ms per draw |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = stats.get(reference) if reference else None
    for name, st in stats.items():
        for group, summary in st.summary().items():
            ratio = None
            if ref is not None and group in ref.groups:
                ref_var = ref.groups[group].summary()["mean_variance"]
                ratio = summary["mean_variance"] / ref_var if ref_var > 0 else math.inf
            lines.append(
                f"| {name} | {group} | {summary['size']} | {_fmt(summary['mean_variance'])} | "
                f"{_fmt(ratio)} | {_fmt(summary['median_snr'])} | {_fmt(summary['mean_snr'])} | "
                f"{_fmt(summary['norm_snr'])} | {_fmt(1e3 * st.seconds_per_draw)} |"
            )
    return "\n".join(lines)


def default_target(curves: dict[str, TrainingCurve], fraction: float = 0.9) -> float | None:
    """``ELBO_0 + fraction · (best final ELBO − ELBO_0)``: a level most estimators reach."""
    finals = [c.elbo[-1] for c in curves.values() if c.elbo and math.isfinite(c.elbo[-1])]
    starts = [c.elbo[0] for c in curves.values() if c.elbo]
    if not finals or not starts:
        return None
    start = min(starts)
    return start + fraction * (max(finals) - start)


def curves_table(curves: dict[str, TrainingCurve], target: float | None) -> str:
    lines = [f"| estimator | final ELBO | steps to ELBO ≥ {_fmt(target, 5)} | seconds to it | "
             "training seconds | note |", "|---|---:|---:|---:|---:|---|"]
    for name, c in curves.items():
        step, sec = c.first_reaching(target) if target is not None else (None, None)
        final = c.elbo[-1] if c.elbo else None
        lines.append(f"| {name} | {_fmt(final, 5)} | {step if step is not None else '—'} | "
                     f"{_fmt(sec)} | {_fmt(c.train_seconds)} | {c.diverged or ''} |")
    return "\n".join(lines)


def plot_stats(stats: dict[str, GradientStats], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for st in stats.values() for g in st.groups})
    names = list(stats)
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.5), squeeze=False)
    for j, group in enumerate(groups):
        var = [stats[n].groups[group].summary()["mean_variance"] if group in stats[n].groups
               else math.nan for n in names]
        snr = [stats[n].groups[group].summary()["median_snr"] if group in stats[n].groups
               else math.nan for n in names]
        axes[0, j].bar(names, [max(v, 1e-300) for v in var], color="tab:red")
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(f"{group}: mean gradient variance")
        axes[1, j].bar(names, snr, color="tab:blue")
        axes[1, j].set_yscale("log")
        axes[1, j].set_title(f"{group}: median SNR |E g| / std g")
        for ax in axes[:, j]:
            ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, TrainingCurve], path: Path, target: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        axes[0].plot(c.steps, c.elbo, label=name)
        axes[1].plot(c.seconds, c.elbo, label=name)
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ELBO per data point (held-out batch)")
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1)
    finals = [v for c in curves.values() for v in c.elbo if math.isfinite(v)]
    if finals:
        lo = sorted(finals)[len(finals) // 10]
        for ax in axes:
            ax.set_ylim(bottom=lo)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir, title: str, stats: dict[str, GradientStats],
                 curves: dict[str, TrainingCurve] | None = None, target: float | None = None,
                 notes: str = "") -> Path:
    """Write ``estimators.md``, ``gradient_stats.json``, ``variance_snr.png`` and (with curves)
    ``elbo_curves.png`` under ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes, ""]
    figure = plot_stats(stats, out / "variance_snr.png").name
    parts += ["## Gradient variance and signal-to-noise ratio at fixed parameters", "",
              stats_table(stats), "", f"![variance and SNR]({figure})", ""]
    record = {"stats": {name: {"summary": st.summary(), "loss_mean": st.loss_mean,
                               "loss_std": st.loss_std, "num_draws": st.num_draws,
                               "seconds_per_draw": st.seconds_per_draw, **st.extra}
                        for name, st in stats.items()}}
    if curves:
        target = default_target(curves) if target is None else target
        figure = plot_curves(curves, out / "elbo_curves.png", target).name
        parts += ["## Training with each estimator", "", curves_table(curves, target), "",
                  f"![ELBO vs steps and time]({figure})", ""]
        record["curves"] = {name: vars(c) for name, c in curves.items()}
        record["target_elbo"] = target
    path = out / "estimators.md"
    path.write_text("\n".join(parts))
    (out / "gradient_stats.json").write_text(json.dumps(record, indent=2, default=str))
    return path
