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


_UNRANKED = ("zero gradient", "non-finite")


def _ratio(summary: dict, ref_summary: dict | None, flagged: bool) -> float | None:
    if ref_summary is None or flagged or not ref_summary["mean_variance"] > 0 \
            or not math.isfinite(ref_summary["mean_variance"]):
        return None
    return summary["mean_variance"] / ref_summary["mean_variance"]


def _stats_row(name: str, st: GradientStats, group: str, summary: dict, ref) -> str:
    flag = st.groups[group].flag
    ref_summary = (ref.groups[group].summary()
                   if ref is not None and group in ref.groups
                   and ref.groups[group].flag not in _UNRANKED else None)
    ratio = _ratio(summary, ref_summary, flag in _UNRANKED)
    if flag in _UNRANKED:
        snrs = ["—", "—", "—"]
    elif flag == "exact":
        snrs = ["∞ (exact)"] * 3
    else:
        snrs = [_fmt(summary[k]) for k in ("median_snr", "mean_snr", "norm_snr")]
    ratio_text = "0 (exact)" if flag == "exact" and ratio == 0 else _fmt(ratio)
    note = f"**{flag}**" if flag in _UNRANKED else (flag or "")
    if st.extra.get("biased"):
        note = ", ".join(x for x in (note, "biased") if x)
    return (f"| {name} | {group} | {summary['size']} | {_fmt(summary['mean_variance'])} | "
            f"{ratio_text} | {' | '.join(snrs)} | {_fmt(1e3 * st.seconds_per_draw)} | {note} |")


def stats_table(stats: dict[str, GradientStats], reference: str | None = "reparam") -> str:
    """Estimator × parameter group → mean variance, its ratio to ``reference``'s, SNRs, and a
    flag: a group whose gradient is identically zero or not finite is marked **zero gradient** /
    **non-finite** and gets no ratio or SNR (it is never ranked); a zero-variance, non-zero
    gradient (``enum``) is marked *exact*."""
    if reference not in stats:
        reference = None
    lines = ["| estimator | group | params | mean variance | variance / " + (reference or "—")
             + " | median SNR | mean SNR | ‖E g‖/√tr Var | ms per draw | flag |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    ref = stats.get(reference) if reference else None
    for name, st in stats.items():
        for group, summary in st.summary().items():
            lines.append(_stats_row(name, st, group, summary, ref))
    return "\n".join(lines)


def bias_table(stats: dict[str, GradientStats], reference: str = "enum") -> str | None:
    """Every estimator of the ELBO against ``reference`` (exact enumeration at the discrete
    sites): ``‖E g − E g_ref‖ / ‖E g_ref‖`` and the largest ``|E g_i − E g_ref,i|`` in combined
    standard errors per group; ``None`` without the reference. An unbiased estimator stays
    within a few standard errors; the Concrete relaxation does not."""
    ref = stats.get(reference)
    if ref is None:
        return None
    lines = ["| estimator | group | ‖E g − E g_enum‖ / ‖E g_enum‖ | max \\|Δ\\| / s.e. | note |",
             "|---|---|---:|---:|---|"]
    for name, st in stats.items():
        if name == reference or st.extra.get("bound", "elbo") != "elbo":
            continue
        for group, g in st.groups.items():
            r = ref.groups.get(group)
            if r is None:
                continue
            delta = (g.mean - r.mean).double()
            rel = float(delta.norm() / r.mean.double().norm()) if r.mean.norm() > 0 else None
            se = (g.sem.double() ** 2 + r.sem.double() ** 2).sqrt().clamp_min(1e-12)
            worst = float((delta.abs() / se).max())
            lines.append(f"| {name} | {group} | {_fmt(rel)} | {_fmt(worst)} | "
                         f"{'biased' if st.extra.get('biased') else ''} |")
    return "\n".join(lines)


def skipped_table(skipped: dict[str, str]) -> str:
    lines = ["| estimator | why it was not run |", "|---|---|"]
    lines += [f"| {name} | {reason.replace('|', chr(92) + '|')} |"
              for name, reason in skipped.items()]
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


def _bar_values(stats: dict[str, GradientStats], group: str, key: str
                ) -> tuple[list[float], list[str]]:
    """Bar heights (NaN: no bar) and the label drawn instead for a flagged or empty value."""
    values, labels = [], []
    for name in stats:
        g = stats[name].groups.get(group)
        value = g.summary()[key] if g is not None else math.nan
        flag = g.flag if g is not None else "—"
        label = ""
        if flag in _UNRANKED or g is None:
            label, value = flag, math.nan
        elif not (math.isfinite(value) and value > 0):
            label = "∞ (exact)" if flag == "exact" and key != "mean_variance" else (
                "0 (exact)" if value == 0 else "n/a")
            value = math.nan
        values.append(value)
        labels.append(label)
    return values, labels


def _log_bars(ax, names: list[str], values: list[float], labels: list[str], color: str,
              title: str, biased: list[bool] | None = None) -> None:
    """Log-scale bars whose limits come from the finite positive values only; a flagged value
    gets no bar and a label at the bottom instead (so 0 and inf never stretch the axis); a
    biased estimator's bar is hatched."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    lo, hi = (min(finite) / 5, max(finite) * 5) if finite else (0.1, 10.0)
    bars = ax.bar(names, [v if math.isfinite(v) else 0.0 for v in values], color=color)
    for bar, is_biased in zip(bars, biased or []):
        if is_biased:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    for i, label in enumerate(labels):
        if label:
            ax.text(i, lo * 1.3, label, rotation=90, ha="center", va="bottom", fontsize=7,
                    color="black", bbox={"facecolor": "#ffe9a8", "edgecolor": "none", "pad": 1})
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=60, labelsize=8)


def plot_stats(stats: dict[str, GradientStats], path: Path) -> Path:
    """Mean variance and median SNR per estimator and group on log axes; flagged values
    (zero gradient, non-finite, exact) are labelled, not drawn; biased estimators (e.g.
    ``concrete``) are hatched and named so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for st in stats.values() for g in st.groups})
    biased = [bool(st.extra.get("biased")) for st in stats.values()]
    names = [f"{n} (biased)" if b else n for n, b in zip(stats, biased)]
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.5), squeeze=False)
    for j, group in enumerate(groups):
        for row, (key, color, title) in enumerate((
                ("mean_variance", "tab:red", f"{group}: mean gradient variance"),
                ("median_snr", "tab:blue", f"{group}: median SNR |E g| / std g"))):
            values, labels = _bar_values(stats, group, key)
            _log_bars(axes[row, j], names, values, labels, color, title, biased)
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


def _notes_section(notes: dict[str, list[str]]) -> list[str]:
    lines = [f"* `{name}`: " + "; ".join(items) for name, items in notes.items() if items]
    return ["### Where an estimator is another one", "", *lines, ""] if lines else []


def write_report(out_dir, title: str, stats: dict[str, GradientStats],
                 curves: dict[str, TrainingCurve] | None = None, target: float | None = None,
                 notes: str = "", skipped: dict[str, str] | None = None,
                 site_notes: dict[str, list[str]] | None = None) -> Path:
    """Write ``estimators.md``, ``gradient_stats.json``, ``variance_snr.png`` and (with curves)
    ``elbo_curves.png`` under ``out_dir``; returns the Markdown path.

    ``skipped`` (estimator → reason it did not apply or failed) and ``site_notes`` (estimator →
    where it silently becomes another estimator) default to the ``skipped`` / ``notes``
    attributes of ``stats`` and ``curves`` (as :func:`compare_estimators` returns them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = dict(skipped if skipped is not None else {
        **getattr(curves, "skipped", {}), **getattr(stats, "skipped", {})})
    site_notes = dict(site_notes if site_notes is not None else getattr(stats, "notes", {}))
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes, ""]
    parts += ["## Gradient variance and signal-to-noise ratio at fixed parameters", ""]
    if stats:
        figure = plot_stats(stats, out / "variance_snr.png").name
        parts += [stats_table(stats), "", f"![variance and SNR]({figure})", ""]
    else:
        parts += ["No estimator applied.", ""]
    parts += _notes_section(site_notes)
    bias = bias_table(stats)
    if bias:
        parts += ["### Against exact enumeration (`enum`)", "", bias, ""]
    if skipped:
        parts += ["### Not run", "", skipped_table(skipped), ""]
    record = {"stats": {name: {"summary": st.summary(), "loss_mean": st.loss_mean,
                               "loss_std": st.loss_std, "num_draws": st.num_draws,
                               "seconds_per_draw": st.seconds_per_draw,
                               "flags": {g: v.flag for g, v in st.groups.items()}, **st.extra}
                        for name, st in stats.items()},
              "skipped": skipped, "notes": site_notes}
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
