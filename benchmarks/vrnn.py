r"""VRNN and RNN baselines on real sequences: JSB Chorales (per step), FSDD speech (per sequence).

Each row trains one system with :func:`pyro_seqlatent.infer.train` for ``--minutes`` of CPU
time of its process (``time_budget="process"``: run rows side by side, one per core, with
``OMP_NUM_THREADS=1``, and neither shortens the other's budget), keeps the best validation
checkpoint, then reports on the test split:

* JSB: the negative test ELBO per time step (as Pyro's DMM reports it: total negative ELBO
  over the test set / number of unpadded frames) and the importance-sampled NLL per time step,
  :math:`-\sum_n \log\hat p_K(x_n) / \sum_n T_n`, with ``--num-samples`` K, both from
  :func:`pyro_seqlatent.infer.score_sequences` (the ELBO of a sequence is the mean of its K
  log-weights; rows measured before it took one sample of Trace_ELBO, the same expectation).
* FSDD: the importance-sampled test log-likelihood per sequence (mean over test recordings,
  normalised frames) and the ELBO per sequence.

Outputs under ``--out`` (default ``benchmarks/results/vrnn``): ``results.json``, ``results.md``
(one table, the command per row), ``curve_<row>.png`` learning curves, ``fig2_kl_delta.png``
(seed 000's Figure 2) and ``fig3_samples_{jsb,fsdd}.png`` (Figure 3: generated piano rolls /
waveforms of every trained row of the table, read back from the run folders; `--figures`
redraws them alone; when some rows have no run folder, as in a fresh clone, the others go to
``fig3_samples_<dataset>.partial.png`` and the full figure is kept). Rows of earlier
invocations are kept in the table (merged by row name when a row finishes, so several
invocations may run at once). Per-sequence test log-likelihoods are kept, and a second table
compares pairs of rows on the same test sequences: the mean per-sequence difference with its
paired standard error. Every row writes a checkpoint at each validation, so a row cut short
goes on with the same command plus ``--resume`` (``--minutes`` stays the total budget).

The table is built only from ``results.json``: a row's scores, per-sequence log-likelihoods
and learning curve are stored there when it finishes, and ``results.md`` is drawn from it.
Run folders (checkpoints, ``metrics.jsonl``) stay out of git (benchmarks/README.md) and are
read back only for Figures 2 and 3.

    python benchmarks/vrnn.py --rows jsb-rnn,jsb-vrnn --minutes 3 --num-samples 500
    python benchmarks/vrnn.py --rows all --minutes 60            # the full table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import _results  # benchmarks/_results.py (this script's folder is on sys.path)
import pyro
import pyro.poutine as poutine
import torch

from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.infer import score_sequences, train
from pyro_seqlatent.infer.collapse import site_kl
from pyro_seqlatent.infer.train import BEST, restore_modules
from pyro_seqlatent.registry import get_model

ROWS = {
    "jsb-rnn": ("rnn", {"dataset": "jsb", "emission": "bernoulli"}, "RNN-Bernoulli"),
    "jsb-vrnn": ("vrnn", {"dataset": "jsb"}, "VRNN"),
    "jsb-vrnn-iaf": ("vrnn", {"dataset": "jsb", "guide": "iaf"}, "VRNN, 2 IAFs per step"),
    "fsdd-rnn-gauss": ("rnn", {"dataset": "fsdd", "emission": "gaussian"}, "RNN-Gauss"),
    "fsdd-rnn-gmm": ("rnn", {"dataset": "fsdd", "emission": "gmm"}, "RNN-GMM"),
    "fsdd-vrnn-gauss": ("vrnn", {"dataset": "fsdd", "emission": "gaussian"}, "VRNN-Gauss"),
    "fsdd-vrnn-gmm": ("vrnn", {"dataset": "fsdd", "emission": "gmm"}, "VRNN-GMM"),
}
#: each anchor in its own unit: compare JSB rows' per-step columns with the JSB anchor (nats per
#: time step) and FSDD rows' log-likelihood per sequence with the speech ordering (per sequence)
ANCHORS = {"jsb": "JSB, per time step (compare −ELBO/step and NLL/step): Pyro DMM −ELBO/step "
                  "6.87 (2 IAFs 6.80), Krishnan et al. 6.93, ~20 h GPU",
           "fsdd": "speech, per sequence (compare log-lik/sequence; VRNN paper Table 1 orders "
                   "log-likelihoods per sequence): VRNN-GMM ≥ VRNN-Gauss > RNN-GMM > "
                   "RNN-Gauss"}


#: set by the benchmark itself (budget, validation, data) or by their own flags
FIXED_TRAIN_SETTINGS = {"num_steps", "num_epochs", "max_time_s", "time_budget", "valid_every",
                        "checkpoint_every", "progress", "seed", "early_stopping_patience", "lr",
                        "batch_size"}


def check_variant_args(parser, args) -> None:
    """Reject a ``--train-options`` that is not a JSON object of :class:`TrainConfig` fields
    the benchmark leaves free, and a ``--tag`` that is not a plain name, before any data loads."""
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    _results.train_options(parser, args.train_options, FIXED_TRAIN_SETTINGS,
                           "budget, validation and seed come from --minutes/--valid-every/"
                           "--patience/--seed, lr and batch size from --lr/--batch-size",
                           defaults=tuple(get_model(ROWS[r][0]).train_defaults
                                          for r in rows if r in ROWS))
    _results.check_tag(parser, args.tag)


def table_order(r: dict) -> tuple:
    """Rows in :data:`ROWS` order, each default row before its tagged variants."""
    return list(ROWS).index(r["row"].split("+")[0]), r["row"]


def row_id(row: str, tag: str) -> str:
    """The table key of ``row`` trained with a ``--tag`` (a variant beside the default row)."""
    return f"{row}+{tag}" if tag else row


def run_row(row: str, args, data_cache: dict) -> dict:
    name, overrides, label = ROWS[row]
    if args.tag:
        label = f"{label} [{args.tag}]"
    spec = get_model(name)
    options = spec.options(**overrides, **json.loads(args.options))
    key = (options["dataset"], options.get("transpose", 0), options.get("max_sequences", 0))
    if key not in data_cache:
        data_cache[key] = spec.datasets(options, None)
    data = data_cache[key]
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    model, guide = spec.build(options)
    run_dir = args.out / row_id(row, args.tag)
    settings = {**spec.train_defaults, "lr": args.lr, "batch_size": args.batch_size,
                **json.loads(args.train_options)}
    result = train(model, guide, data["train"], valid_data=data["valid"], collate_fn=pad_collate,
                   run_dir=run_dir, num_steps=10**8, max_time_s=60.0 * args.minutes,
                   time_budget="process",
                   valid_every=args.valid_every, progress=False, seed=args.seed,
                   checkpoint_every=args.valid_every, resume=args.resume,  # a cut row resumes
                   early_stopping_patience=args.patience or None, **settings)
    if (run_dir / BEST).exists():
        restore_modules(run_dir / BEST, model, guide)
    model.eval()  # dropout off for every score and figure below
    guide.eval()
    test = data["test"]
    t0 = time.perf_counter()
    scores = score_sequences(model, guide, test, pad_collate, num_samples=args.num_samples,
                             batch_size=8, seed=args.seed, chunk_size=args.chunk_size)
    eval_s = time.perf_counter() - t0
    out = {
        "row": row_id(row, args.tag), "label": label, "system": name, "options": options,
        "train_steps": result.step, "train_cpu_s": result.budget_time_s,
        "train_options": json.loads(args.train_options),
        "stopped": result.stopped, "best_valid_per_sequence": result.best_valid,
        "test_sequences": len(test), "test_steps": int(scores.steps.sum()),
        "num_samples": args.num_samples, "elbo_estimate": "mean of K log-weights",
        "neg_elbo_per_step": scores.neg_elbo_per_step, "nll_per_step": scores.nll_per_step,
        "neg_elbo_per_sequence": scores.neg_elbo_per_sequence,
        "ll_per_sequence": -scores.nll_per_sequence,
        "ll_per_sequence_sem": scores.nll_per_sequence_sem, "eval_wall_s": eval_s,
        "ll_sequences": [float(-v) for v in scores.nll],
        # a recovered run (resumed with another lr / clip_norm) says so beside its command
        "resume_changes": _results.resume_changes(run_dir),
        "curve": [{k: r[k] for k in ("step", "time_s", "loss", "valid_loss") if k in r}
                  for r in result.history
                  if "valid_loss" in r or r["step"] % 25 == 0 or r is result.history[-1]],
        "command": f"python benchmarks/vrnn.py --rows {row} --minutes {args.minutes} "
                   f"--num-samples {args.num_samples}"
                   + (f" --lr {args.lr}" if args.lr != 1e-3 else "")
                   + (f" --batch-size {args.batch_size}" if args.batch_size != 20 else "")
                   + (f" --chunk-size {args.chunk_size}" if args.chunk_size != 100 else "")
                   + (f" --seed {args.seed}" if args.seed else "")
                   + (f" --valid-every {args.valid_every}" if args.valid_every != 100 else "")
                   + (f" --patience {args.patience}" if args.patience else "")
                   + (f" --options {shlex.quote(args.options)}" if args.options != "{}" else "")
                   + (f" --train-options {shlex.quote(args.train_options)}"
                      if args.train_options != "{}" else "")
                   + (f" --tag {args.tag}" if args.tag else ""),
    }
    plot_curve(out, args.out / f"curve_{row_id(row, args.tag)}.png")
    return out, model, guide, data


def _save(fig, path: Path) -> None:
    """Write a figure atomically (several invocations may draw the same file)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot_curve(row: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [r["step"] for r in row["curve"]]
    train = [r["loss"] for r in row["curve"]]
    ax.plot(steps, train, lw=0.6, alpha=0.35, color="C0", label="train (per sequence)")
    width = max(1, len(train) // 30)  # a running mean shows the trend through batch noise
    smooth = []
    if width > 1:
        smooth = torch.nn.functional.avg_pool1d(
            torch.tensor(train, dtype=torch.float64)[None, None], width, 1).flatten().tolist()
        lag = (width - 1) // 2  # centred on the points it averages
        ax.plot(steps[lag:lag + len(smooth)], smooth, lw=1.2, color="C0",
                label=f"train, mean of {width} points")
    valid = [(r["step"], r["valid_loss"]) for r in row["curve"] if "valid_loss" in r]
    if valid:
        ax.plot(*zip(*valid), "o-", ms=3, color="C1", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO per sequence")
    ax.set_title(row["label"] + f" ({row['options']['dataset']})")
    lows = [v for _, v in valid] + smooth[len(smooth) // 10:] or train
    if lows:  # frame validation and the smoothed trend (the first train losses are far above)
        pad = 0.15 * (max(lows) - min(lows)) + 1.0
        ax.set_ylim(min(lows) - pad, max(lows) + pad)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


@torch.no_grad()
def figure2(model, guide, data, path: Path) -> None:
    """Per-step KL(q(z_t)‖p(z_t|h_{t−1})) and δ_t = ‖μ_{z,t} − μ_{z,t−1}‖ over one waveform:
    the KL of each step from :func:`pyro_seqlatent.infer.collapse.site_kl` (closed form for the
    mean-field guide, log q − log p at the draw for the IAF guide, which has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = max(data["test"].sequences[:50], key=len)
    batch = pad_collate([seq])
    trace = poutine.trace(guide).get_trace(**batch)
    model_trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(**batch)
    T = seq.shape[0]
    kl, mu = [], []
    for t in range(T):
        g = trace.nodes[f"z_{t}"]
        kl.append(float(site_kl(g, model_trace.nodes[f"z_{t}"]).total.sum()))
        try:
            mu.append(g["fn"].mean[0])
        except NotImplementedError:  # a flow: no closed-form mean, the draw stands in
            mu.append(g["value"][0])
    delta = [0.0] + [float((mu[t] - mu[t - 1]).norm()) for t in range(1, T)]
    fig, axes = plt.subplots(3, 1, figsize=(7, 5), sharex=False)
    axes[0].plot(seq.flatten().numpy(), lw=0.5)
    axes[0].set_ylabel("waveform")
    axes[1].plot(range(T), kl, "o-", ms=2)
    axes[1].set_ylabel("KL_t")
    axes[2].plot(range(T), delta, "o-", ms=2, color="C2")
    axes[2].set_ylabel("δ_t")
    axes[2].set_xlabel("frame t (200 samples)")
    fig.suptitle("VRNN on an FSDD test recording (seed 000, Figure 2)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


@torch.no_grad()
def figure3(samples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 1, figsize=(7, 1.8 * len(samples)), squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], samples.items()):
        if x.shape[-1] == 88:
            ax.imshow(x.T.numpy(), aspect="auto", origin="lower", cmap="Greys")
            ax.set_ylabel("key")
        else:
            ax.plot(x.flatten().numpy(), lw=0.4)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def resumed_note(row: dict) -> str:
    """Beside a row's command: the settings a resume changed, which the command alone lacks."""
    changes = row.get("resume_changes")
    return f" ({_results.describe_changes(changes).removeprefix('; ')})" if changes else ""


def markdown(rows: list[dict], args) -> str:
    lines = ["| row | data | −ELBO/step | NLL/step (IS) | log-lik/sequence (IS) | "
             "train steps / CPU s | command |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['options']['dataset']} | {r['neg_elbo_per_step']:.3f} | "
            f"{r['nll_per_step']:.3f} | {r['ll_per_sequence']:.1f} ± "
            f"{r['ll_per_sequence_sem']:.1f} | {r['train_steps']} / "
            f"{r.get('train_cpu_s', r.get('train_wall_s')):.0f} s "
            f"| `{r['command']}`{resumed_note(r)} |")
    lines += ["", "−ELBO: the mean of the K log-weights of each sequence "
              "(pyro_seqlatent.infer.score_sequences); rows without "
              "`elbo_estimate` in results.json took one Trace_ELBO sample (the same expectation).",
              "K = importance samples of the row (in its command); per-step figures divide "
              "by the number of unpadded test frames; FSDD frames are normalised "
              "(global mean/std).",
              "Anchors: " + "; ".join(ANCHORS.values()),
              "Rows measured before per-sequence figures were kept show their wall time in the "
              "train column and have no paired comparison."]
    pairs = paired_differences(rows)
    if pairs:
        lines += ["", "Paired comparisons on the same test sequences (log-likelihood per "
                  "sequence, importance sampled; a difference more than ~2 standard errors from "
                  "0 is an ordering the data support):", "",
                  "| data | A | B | mean log p(A) − log p(B) | paired s.e. | sequences |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {d} | {a} | {b} | {m:+.2f} | {se:.2f} | {n} |" for d, a, b, m, se, n in pairs]
    return "\n".join(lines) + "\n"


PAIRS = [("jsb-vrnn", "jsb-rnn"), ("jsb-vrnn-iaf", "jsb-vrnn"),
         ("fsdd-vrnn-gmm", "fsdd-vrnn-gauss"), ("fsdd-vrnn-gauss", "fsdd-rnn-gmm"),
         ("fsdd-rnn-gmm", "fsdd-rnn-gauss")]


def paired_differences(rows: list[dict]) -> list[tuple]:
    """For each pair of :data:`PAIRS` (and each tagged variant with its default row) that both
    have per-sequence log-likelihoods: (dataset,
    label A, label B, mean difference, its standard error, number of sequences)."""
    by_row = {r["row"]: r for r in rows if "ll_sequences" in r}
    variants = [(r, r.split("+")[0]) for r in by_row if "+" in r]  # each variant vs its default
    out = []
    for a, b in PAIRS + variants:
        if a in by_row and b in by_row:
            d = (torch.tensor(by_row[a]["ll_sequences"], dtype=torch.float64)
                 - torch.tensor(by_row[b]["ll_sequences"], dtype=torch.float64))
            se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
            out.append((by_row[a]["options"]["dataset"], by_row[a]["label"], by_row[b]["label"],
                        float(d.mean()), se, len(d)))
    return out


def trained_rows(results: list[dict], args, dataset: str, missing: list | None = None):
    """``(row, model, guide)`` for every row of ``dataset`` in the table whose run folder under
    ``--out`` still holds a checkpoint (the best-validation one where it exists); the rows
    without one are appended to ``missing`` (run folders are not committed)."""
    from pyro_seqlatent.infer.train import CHECKPOINT

    for r in results:
        if r["options"]["dataset"] != dataset:
            continue
        run_dir = args.out / r["row"]
        ckpt = next((run_dir / f for f in (BEST, CHECKPOINT) if (run_dir / f).exists()), None)
        if ckpt is None:
            if missing is not None:
                missing.append(r)
            continue
        pyro.clear_param_store()
        spec = get_model(r["system"])  # rows stored before an option existed get its default
        model, guide = spec.build(spec.options(**r["options"]))
        restore_modules(ckpt, model, guide)
        model.eval()
        guide.eval()
        yield r, model, guide


def fig3_name(dataset: str, missing: list) -> str:
    """Figure 3's file: a figure without some of the table's rows (their run folders are gone,
    e.g. in a fresh clone) goes beside the full one instead of overwriting it."""
    name = f"fig3_samples_{dataset}.png"
    if not missing:
        return name
    partial = f"fig3_samples_{dataset}.partial.png"
    print(f"[vrnn bench] Figure 3 ({dataset}): no checkpoint for "
          f"{', '.join(r['label'] for r in missing)}; the other rows are drawn to {partial} and "
          f"{name} is left as it was")
    return partial


def fig2_name(source_row: str, missing: list) -> str:
    """Figure 2 is drawn from the FSDD VRNN-GMM row; drawn from VRNN-Gauss because that row's
    run folder is gone, it goes beside the full one instead of overwriting it."""
    if source_row != "fsdd-vrnn-gmm" and any(r["row"] == "fsdd-vrnn-gmm" for r in missing):
        print("[vrnn bench] Figure 2: no checkpoint for the FSDD VRNN-GMM row; drawn from "
              "VRNN-Gauss to fig2_kl_delta.partial.png, fig2_kl_delta.png is left as it was")
        return "fig2_kl_delta.partial.png"
    return "fig2_kl_delta.png"


def draw_figures(results: list[dict], args, datasets=("jsb", "fsdd"), cache=None) -> None:
    """Figure 3 (a generated sequence of every trained row of a dataset, read back from the run
    folders, so rows trained by separate invocations share one figure) and Figure 2 (from the
    FSDD VRNN-GMM row, else VRNN-Gauss)."""
    cache = {} if cache is None else cache
    for dataset in datasets:
        samples, fig2_source, missing = {}, None, []
        for r, model, guide in trained_rows(results, args, dataset, missing):
            pyro.set_rng_seed(args.seed)
            with torch.no_grad():
                samples[f"{r['label']} ({dataset})"] = model(
                    length=100 if dataset == "jsb" else 40, num_sequences=1)[0]
            if r["row"] in ("fsdd-vrnn-gmm", "fsdd-vrnn-gauss") and (
                    fig2_source is None or r["row"] == "fsdd-vrnn-gmm"):
                fig2_source = (r, model, guide)
        if samples:
            figure3(samples, args.out / fig3_name(dataset, missing))
        elif missing:
            print(f"[vrnn bench] Figures ({dataset}): no row of the table has a checkpoint under "
                  f"{args.out}; nothing drawn")
        if fig2_source is not None:
            r, model, guide = fig2_source
            if dataset not in cache:
                cache[dataset] = get_model(r["system"]).datasets(r["options"], None)
            figure2(model, guide, cache[dataset], args.out / fig2_name(r["row"], missing))


def main(argv=None):
    parser = argparse.ArgumentParser(description="VRNN benchmark table")
    parser.add_argument("--rows", default="jsb-rnn,jsb-vrnn",
                        help=f"comma list or 'all'; rows: {', '.join(ROWS)}")
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget per row")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--valid-every", type=int, default=100)
    parser.add_argument("--patience", type=int, default=0,
                        help="stop after this many validations without improvement (0: train "
                             "the whole budget); the best-validation checkpoint is scored anyway")
    parser.add_argument("--options", default="{}", help="JSON overrides of model options")
    parser.add_argument("--train-options", default="{}",
                        help="JSON overrides of the training settings (TrainConfig fields, e.g. "
                             '\'{"weight_decay": 0.05, "kl_anneal_steps": 1000}\')')
    parser.add_argument("--tag", default="",
                        help="keep this run as a variant row '<row>+<tag>' beside the default "
                             "row (its own run folder and table line)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each row from its run folder's last checkpoint (written "
                             "at every validation); --minutes is the total budget of all "
                             "sessions, and the row equals an uninterrupted one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vrnn"))
    parser.add_argument("--figures", action="store_true",
                        help="only redraw Figures 2 and 3 from the trained rows' run folders")
    args = parser.parse_args(argv)
    check_variant_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; known: {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    cache = {}
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    if args.figures:
        draw_figures(results, args, cache=cache)
        return results
    for row in rows:
        out, model, guide, data = run_row(row, args, cache)
        # rows measured by other invocations stay in the table (re-read under a lock: they may
        # have finished while this row trained)
        results = _results.merge_rows(results_path, [out],
                                      order=table_order)
        print(json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
        (args.out / "results.md").write_text(markdown(results, args))
    with _results.locked(results_path):  # the rows other invocations finished meanwhile too
        results = json.loads(results_path.read_text())
        draw_figures(results, args, datasets={ROWS[row][1]["dataset"] for row in rows},
                     cache=cache)
    print(markdown(results, args))
    return results


if __name__ == "__main__":
    main()
