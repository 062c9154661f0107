"""Latent ODE / ODE-RNN / RNN-Δt benchmark: test MSE per cell, time per step and NFE, learning
curves and figures, plus the union-grid vs time-rescaled solve comparison.

Each cell trains one registered system for ``--minutes`` of CPU time of its process (the
trainer's ``max_time_s`` with ``time_budget="process"``: run cells side by side, one per core,
with ``OMP_NUM_THREADS=1``, and neither shortens the other's budget), validates every
``--valid-every`` steps, and scores its best-validation checkpoint: the masked test MSE of the
posterior-predictive mean (Latent ODE, 8 samples of z0) or of the one-step predictions
(baselines), on the entries the task scores. Every
cell also gets three baseline rows without parameters or training, each variable of each series
on its own from that series' observed entries on its own times
(``pyro_seqlatent.models.forecast_metrics``): ``persistence`` (each scored point predicted by the
last value of its feature observed strictly before it, or the first observed value before any),
``locf`` (last value carried forward: the last value observed at or before it) and
``linear_interp`` (linear interpolation between the observed times, held constant before the
first and after the last observation, so equal to ``locf`` in extrapolation).
``--baselines-only`` scores just those rows of the given cells and merges them into ``--out``'s
table, keeping the trained rows (the baselines need the data only):

    python benchmarks/latent_ode.py --baselines-only --cells periodic:interp:0.5 \
        periodic:extrap:0.5 --batch-size 20 --out benchmarks/results/latent_ode/periodic

``--protocol reference`` (hopper and PhysioNet cells) builds the data as the reference
implementation does (``pyro_seqlatent.data.hopper``, ``pyro_seqlatent.data.physionet``) and
scores as it does (``pyro_seqlatent.models.forecast_metrics``): the MSE of a record is the
mean over all variables of each variable's MSE over its scored times, 0 for a variable with
none (``lib/likelihood_eval.py`` ``compute_masked_likelihood``), averaged over records;
ODE-RNN / RNN-Δt predict the first time point of a sequence by its observed value, or 0 where
it is unobserved (the
reference's ``utils.shift_outputs`` with ``first_point = observed_data[:, 0]``), and the Latent
ODE's MSE is the mean of the MSEs of 3 z0 samples (``VAE_Baseline.get_mse`` under
``compute_loss_all_batches(..., n_traj_samples=3)``). Only those rows are set beside the
paper's anchors.

    python benchmarks/latent_ode.py --minutes 2 \\
        --cells periodic:interp:0.5 periodic:extrap physionet:interp \\
        --models latent_ode ode_rnn rnn_dt --out benchmarks/results/latent_ode
    python benchmarks/latent_ode.py --minutes 2 --cells hopper:interp:0.1 \\
        --models latent_ode ode_rnn --protocol reference --out benchmarks/results/latent_ode/hopper

``--jobs N`` trains the command's (cell, model) pairs in N single-threaded subprocesses at
once (logs under ``--out``/logs), e.g. the anchor-comparable hopper table on two cores:

    python benchmarks/latent_ode.py --minutes 20 --jobs 2 --protocol reference \\
        --cells hopper:interp:0.1 hopper:interp:0.5 hopper:extrap:0.1 hopper:extrap:0.5 \\
        --models latent_ode ode_rnn rnn_dt --out benchmarks/results/latent_ode/hopper

``--options '<json>' --tag NAME`` (model settings) and ``--train-options '<json>' --tag NAME``
(TrainConfig fields) train variants of the models (e.g. the reference's hopper
widths ``'{"latent_dim": 15, "hidden_dim": 30, "ode_units": 300, "ode_layers": 4}'``) as rows
``<model> [NAME]`` with their own run folders (``...@NAME``), beside the default rows and the
same anchors.

Every row writes a checkpoint at each validation; a row cut short (a killed process, the end of
a session) goes on with the same command plus ``--resume`` (``--minutes`` stays the total
budget), and ends as the uninterrupted row would.

Rows of earlier commands with the same ``--out`` are kept (a re-run cell replaces its row; rows
are keyed by dataset, task, fraction, model and protocol; rows written before the protocol
field existed count as ``ours``). Rows are merged under a file lock when a cell finishes, so
several commands may write into one ``--out`` at once.
Writes ``results.json``, ``results.md``, per-cell run folders with ``metrics.jsonl``,
``learning_curve.png``, figures and the scored row (``row.json``).

Only the tables are kept in git; run folders stay on the disk that trained them
(benchmarks/README.md). ``--from-runs [RUN_DIR ...]`` rebuilds the table from run folders
without training: it merges each folder's ``row.json`` into ``--out``'s ``results.json`` and
rewrites ``results.md`` (no folder named: every run folder under ``--out``), e.g.

    python benchmarks/latent_ode.py --from-runs --out benchmarks/results/latent_ode/hopper
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
import torch

from pyro_seqlatent.data.irregular import (
    apply_task,
    padded_collate,
    union_grid_collate,
)
from pyro_seqlatent.data.periodic import make_periodic
from pyro_seqlatent.experiments.report import plot_collapse, plot_learning_curve
from pyro_seqlatent.experiments.systems import train_system
from pyro_seqlatent.infer.checkpoint import load_checkpoint
from pyro_seqlatent.infer.run import load_run
from pyro_seqlatent.infer.train import (
    BEST,
    CHECKPOINT,
    TrainingDiverged,
    TrainResult,
    restore_modules,
)
from pyro_seqlatent.models.forecast_metrics import (
    BASELINES,
    baseline_mse,
    predictive_mse,
    reference_test_mse,
)
from pyro_seqlatent.models.latent_ode import (
    DATA_DEFAULTS,
    LatentODEModel,
    nfe_metrics,
    reset_nfe,
    system_datasets,
)
from pyro_seqlatent.registry import get_model

PROTOCOLS = ("ours", "reference")
REFERENCE_DATASETS = ("hopper", "physionet")  # those with a protocol="reference"
# squared errors in the reference's (x - min) / max units over ours, (x - min) / (max - min):
# mean over the 14 hopper features of ((max - min) / max)^2, /tmp/hopper_protocol.md item 1
HOPPER_UNIT_FACTOR = 4.1
FIXED_TRAIN_SETTINGS = {"num_steps", "num_epochs", "max_time_s", "time_budget", "valid_every",
                        "checkpoint_every", "progress",
                        "batch_size"}  # set by the benchmark's own flags
MODELS = ("latent_ode", "latent_ode_poisson", "ode_rnn", "rnn_dt", *BASELINES)

ANCHORS = {  # paper values (MSE) = the reference implementation's protocol; see FIELD-NOTES
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


def row_protocol(row: dict) -> str:
    """A row's protocol; rows written before the field existed are ``"ours"``."""
    return row.get("protocol", "ours")


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


def speed_comparison(cell: dict, args, models=("rnn_dt", "ode_rnn", "latent_ode"),
                     repeats: int = 10, warmup: int = 2) -> dict:
    """CPU seconds (``time.process_time``, one thread: robust to other load on the machine) and
    NFE of one training step (loss + backward) of each model on the same batch of ``cell``,
    models interleaved round-robin, median over ``repeats``; freshly initialised networks (NFE
    grows during training). Ratios: ODE-RNN / RNN-Δt (the paper: ODE-RNN ≈ 1.6× a GRU) and
    Latent ODE / ODE-RNN (the paper: ≈ 2×)."""
    options = cell_options(cell, args)
    datasets = system_datasets({**DATA_DEFAULTS, **{k: v for k, v in options.items()
                                                    if k in DATA_DEFAULTS}})
    train = datasets["train"]
    batch = union_grid_collate([train[i] for i in range(min(args.batch_size, len(train)))])
    systems = {}
    for name in models:
        spec = get_model(name)
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        systems[name] = spec.build(spec.options(**{k: v for k, v in options.items()
                                                   if k in spec.defaults}))
    elbo = pyro.infer.Trace_ELBO()
    seconds = {name: [] for name in models}
    nfe = {}
    for rep in range(warmup + repeats):
        for name, (model, guide) in systems.items():
            reset_nfe(model, guide)
            t0 = time.process_time()
            elbo.differentiable_loss(model, guide, **batch).backward()
            elapsed = time.process_time() - t0
            model.zero_grad(set_to_none=True)
            guide.zero_grad(set_to_none=True)
            if rep >= warmup:
                seconds[name].append(elapsed)
            nfe[name] = nfe_metrics(model, guide)
    median = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    return {"cell": cell, "protocol": options["protocol"], "batch": list(batch["values"].shape),
            "threads": torch.get_num_threads(), "step_cpu_s": median, "nfe": nfe,
            "ode_rnn_over_rnn_dt": median["ode_rnn"] / median["rnn_dt"],
            "latent_ode_over_ode_rnn": median["latent_ode"] / median["ode_rnn"]}


def speed_markdown(results: list[dict]) -> str:
    lines = ["# Step cost: RNN-Δt vs ODE-RNN vs Latent ODE", "",
             "CPU seconds of one training step (loss + backward, one thread, median of 10, "
             "models interleaved) on the same batch; freshly initialised networks. Paper: "
             "ODE-RNN ≈ 1.6× a GRU, Latent ODE ≈ 2× ODE-RNN.", "",
             "| data | batch (B, N, D) | RNN-Δt s | ODE-RNN s | Latent ODE s | ODE-RNN ÷ RNN-Δt "
             "| Latent ODE ÷ ODE-RNN | NFE ODE-RNN fwd/bwd | NFE Latent ODE gen / enc fwd |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, m, n = r["cell"], r["step_cpu_s"], r["nfe"]
        ode = n.get("ode_rnn", {})
        lat = n.get("latent_ode", {})
        lines.append(
            f"| {c['dataset']} {c['task']} {c['fraction']} ({r['protocol']}) | {r['batch']} | "
            f"{m['rnn_dt']:.3f} | {m['ode_rnn']:.3f} | {m['latent_ode']:.3f} | "
            f"{r['ode_rnn_over_rnn_dt']:.2f}× | {r['latent_ode_over_ode_rnn']:.2f}× | "
            f"{ode.get('gen_nfe_forward', '–')}/{ode.get('gen_nfe_backward', '–')} | "
            f"{lat.get('gen_nfe_forward', '–')} / {lat.get('enc_nfe_forward', '–')} |")
    return "\n".join(lines) + "\n"


def cell_protocol(cell: dict, args) -> str:
    """``--protocol`` for hopper and PhysioNet cells; the toy data has only ours."""
    return args.protocol if cell["dataset"] in REFERENCE_DATASETS else "ours"


def cell_options(cell: dict, args) -> dict:
    return {"dataset": cell["dataset"], "task": cell["task"], "fraction": cell["fraction"],
            "n_series": args.n_series, "recipe": args.recipe,
            "quantization": args.quantization, "n_records": args.n_records,
            "protocol": cell_protocol(cell, args),
            **({"extrap_train": "all"} if prefix_trained(cell, args) else {})}


def spec_for(name: str):
    """The registered system a benchmark model name trains (``latent_ode_poisson`` is the
    ``latent_ode`` system with ``poisson=True``)."""
    return get_model("latent_ode" if name == "latent_ode_poisson" else name)


def model_overrides(args) -> dict:
    """The ``--options`` JSON: model settings (widths, solver, guide) for the trained rows."""
    return json.loads(getattr(args, "options", "{}") or "{}")


def _same_kind(default, value) -> bool:
    """Whether ``value`` (from JSON) has the type of the option's ``default``."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return default is None or isinstance(value, type(default))


def check_model_overrides(parser, args, cells: list[dict]) -> None:
    """Reject, before any data loads, an ``--options`` that is not a JSON object of model
    settings every trained model of the command accepts and can be built with (data settings
    come from the cell and the other flags; the Poisson factor from ``--models
    latent_ode_poisson``, so that the row gets its label and anchor), or a bad ``--tag``."""
    overrides = _results.json_object(parser, "--options", args.options,
                                     "'{\"latent_dim\": 15, \"ode_units\": 300}'")
    _results.check_tag(parser, args.tag)
    data_keys = sorted(set(overrides) & set(DATA_DEFAULTS))
    if data_keys:
        parser.error(f"--options {data_keys}: data settings come from --cells and the other "
                     "flags, not --options")
    if "poisson" in overrides:
        parser.error("--options ['poisson']: use --models latent_ode_poisson (or latent_ode), "
                     "which labels the row and picks its anchor")
    trained = [spec_for(name) for name in args.models if name in MODELS and name not in BASELINES]
    training = _results.train_options(parser, args.train_options, FIXED_TRAIN_SETTINGS,
                                      "the budget, validation and batch size come from "
                                      "--minutes/--valid-every/--batch-size",
                                      defaults=tuple(spec.train_defaults for spec in trained))
    if "early_stopping_patience" in training and not args.valid_every:
        parser.error("--train-options early_stopping_patience needs validation: --valid-every N")
    for flag, value in (("--options", overrides), ("--train-options", training)):
        if value and not args.tag:
            parser.error(f"{flag} changes the row: give the rows a --tag NAME, so that they "
                         "stand beside the default rows instead of replacing them")
    if (overrides or training) and args.speed:
        parser.error("--speed measures the default models: drop --options / --train-options")
    for name in args.models:
        if name in BASELINES:
            continue
        spec = spec_for(name)
        bad = sorted(set(overrides) - set(spec.defaults))
        if bad:
            parser.error(f"--options {bad}: model {name!r} has no such option(s); its "
                         f"options: {sorted(set(spec.defaults) - set(DATA_DEFAULTS))}")
        wrong = {k: v for k, v in overrides.items() if not _same_kind(spec.defaults[k], v)}
        if wrong:
            parser.error(f"--options {wrong}: give each the type of its default "
                         f"{ {k: spec.defaults[k] for k in wrong} }")
        if overrides and cells:  # builds the networks only (no data): a bad value fails here
            options = {k: v for k, v in cell_options(cells[0], args).items()
                       if k in spec.defaults}
            try:
                spec.build(spec.options(**options, **overrides,
                                        **({"poisson": True} if name == "latent_ode_poisson"
                                           else {})))
            except (ValueError, TypeError, KeyError) as e:
                parser.error(f"--options {overrides}: model {name!r} cannot be built ({e})")


def prefix_trained(cell: dict, args) -> bool:
    """Whether the cell's models train on the observed prefix too (``--extrap-train all``)."""
    return cell["task"] == "extrap" and getattr(args, "extrap_train", "future") == "all"


def cell_command(cell: dict, name: str, args) -> str:
    trained = name not in BASELINES
    minutes = f" --minutes {args.minutes}" if trained else ""
    if trained and args.valid_every != 200:
        minutes += f" --valid-every {args.valid_every}"
    which = f"--models {name}" if trained else "--baselines-only"
    return (f"OMP_NUM_THREADS=1 python benchmarks/latent_ode.py{minutes} --cells "
            f"{cell['dataset']}:{cell['task']}:{cell['fraction']} {which} "
            f"--n-series {args.n_series} --recipe {args.recipe} --quantization "
            f"{args.quantization} --n-records {args.n_records} "
            f"--batch-size {args.batch_size} --protocol {cell_protocol(cell, args)}"
            + (" --extrap-train all"
               if prefix_trained(cell, args) and trained else "")
            + (f" --options {shlex.quote(args.options)}"
               if trained and model_overrides(args) else "")
            + (f" --train-options {shlex.quote(args.train_options)}"
               if trained and json.loads(args.train_options) else "")
            + (f" --tag {shlex.quote(args.tag)}" if trained and args.tag else ""))


def anchor_for(cell: dict, label: str, protocol: str):
    """The paper's value, where it is comparable: hopper anchors only for protocol
    ``"reference"`` (ours is in other units, see :func:`markdown`)."""
    if cell["dataset"] in REFERENCE_DATASETS and protocol != "reference":
        return None
    return ANCHORS.get((cell["dataset"], cell["task"], label), {}).get(cell["fraction"])


def run_dir_for(out_dir: Path, cell: dict, label: str, protocol: str, tag: str = "") -> Path:
    """A row's run folder; a ``--tag`` comes last after ``@``, which no model label holds, so a
    variant never shares a folder with a default row."""
    suffix = ("" if protocol == "ours" else f"-{protocol}") + (f"@{tag}" if tag else "")
    return out_dir / f"{cell['dataset']}-{cell['task']}-{cell['fraction']}-{label}{suffix}"


def diverged_run(run_dir: Path):
    """``(result, model, guide, datasets)`` of a run stopped by :class:`TrainingDiverged`, from
    its folder: the model and guide at the best checkpoint, the learning curve up to the last
    logged step, the times of the last good checkpoint."""
    run = load_run(run_dir, which="best")
    history = run.metrics
    state = load_checkpoint(run_dir / CHECKPOINT)["state"]
    result = TrainResult(history=history, step=history[-1]["step"],
                         final_loss=history[-1]["loss"], best_valid=state["best_valid"],
                         stopped="diverged", run_dir=run_dir,
                         wall_time_s=state.get("wall_elapsed", float("nan")),
                         budget_time_s=history[-1]["time_s"])
    return result, run.model, run.guide, run.datasets()


def run_cell(name, cell, args, out_dir: Path) -> tuple[dict, dict]:
    """Train and score one model on one cell: ``(row, datasets)``."""
    spec = spec_for(name)
    protocol = cell_protocol(cell, args)
    options = cell_options(cell, args)
    label = name
    if name == "latent_ode_poisson":
        label = "latent_ode+poisson"
        options.update(poisson=True)
    base_label = label
    if prefix_trained(cell, args):  # a row of its own beside the future-trained one
        label += " (prefix too)"
    options = {k: v for k, v in options.items() if k in spec.defaults}
    options.update(model_overrides(args))
    run_dir = run_dir_for(out_dir, cell, base_label + ("-prefix" if label != base_label else ""),
                          protocol, args.tag)
    if args.tag:  # a variant row beside the default one (same anchor)
        label += f" [{args.tag}]"
    settings = dict(spec.train_defaults, **json.loads(args.train_options),
                    num_steps=10**6, max_time_s=60 * args.minutes,
                    time_budget="process", batch_size=args.batch_size, progress=False,
                    valid_every=args.valid_every or None,
                    checkpoint_every=args.valid_every or None)  # a cut row can --resume
    diverged = None
    try:
        result, model, guide, datasets = train_system(spec.name, options, run_dir,
                                                      resume=args.resume, **settings)
    except TrainingDiverged as err:
        if not (args.valid_every and (run_dir / BEST).exists()):
            raise
        # nothing is lost: the row is scored at its best checkpoint and says where it stopped
        print(f"[latent_ode bench] {err}; scoring the best checkpoint", file=sys.stderr)
        result, model, guide, datasets = diverged_run(run_dir)
        diverged = err.step
    scored, scored_step = "last", result.step
    if args.valid_every and (run_dir / BEST).exists():  # the final step is validated too
        scored_step = restore_modules(run_dir / BEST, model, guide)["state"]["step"]
        scored = f"best valid (step {scored_step})"
    if diverged is not None:
        scored += f"; diverged at step {diverged}"
    scored += _results.describe_changes(_results.resume_changes(run_dir), scored_step)
    epochs = result.history[-1]["epoch"] if result.history else float("nan")
    if protocol == "reference":
        scores = reference_test_mse(model, guide, datasets["test"])
    else:
        scores = {"test_mse": predictive_mse(model, guide, datasets["test"])}
    row = {
        "model": label, **cell, "protocol": protocol, "options": options,
        "steps": result.step, "epochs": epochs, "train_s": result.wall_time_s,
        "train_cpu_s": result.budget_time_s, "time_budget": "process",
        "threads": torch.get_num_threads(), "valid_every": args.valid_every,
        "scored": scored, "scored_step": scored_step, "best_valid": result.best_valid,
        "s_per_epoch": result.budget_time_s / epochs if epochs else None,
        **scores,
        **step_cost(model, guide, datasets["train"], args.batch_size),
        "command": cell_command(cell, name, args),
        "anchor_mse": anchor_for(cell, base_label, protocol),  # same test metric
    }
    where = " ".join(str(v) for v in cell.values())  # e.g. "hopper extrap 0.2"
    figures = [plot_learning_curve(run_dir, title=f"{label}: {where} ({protocol})")]
    collapse = plot_collapse(run_dir)  # with --train-options '{"collapse_every": 1}'
    figures += [collapse] if collapse is not None else []
    if spec.plot is not None:
        figures += list(spec.plot(model, guide, datasets, spec.options(**options), run_dir))
    row["figures"] = [str(f) for f in figures]
    # kept beside the run, so a row survives an unreadable results.json
    (run_dir / "row.json").write_text(json.dumps(row, indent=2, default=str))
    return row, datasets


def rescore(run_dirs: list[str], which: str = "best") -> list[dict]:
    """Score trained rows again from their run folders' checkpoints: the test MSE of the row's
    protocol and, under ``reference``, the pooled MSE beside it. The z0 samples are drawn anew
    (seed 0), so a Latent ODE's figure can differ from its row's in the third digit."""
    out = []
    for path in run_dirs:
        run = load_run(path, which=which)
        protocol = run.options.get("protocol", "ours")
        pyro.set_rng_seed(0)
        test = run.datasets()["test"]
        scores = (reference_test_mse(run.model, run.guide, test) if protocol == "reference"
                  else {"test_mse": predictive_mse(run.model, run.guide, test)})
        step = load_checkpoint(run.checkpoint)["state"]["step"]
        out.append({"run": str(path), "checkpoint": which, "step": step,
                    "protocol": protocol, **scores})
    return out


def rows_from_runs(run_dirs: list[Path]) -> tuple[list[dict], list[Path]]:
    """The rows saved beside trained runs (each run folder's ``row.json``, written when its row
    was scored) and the folders that have none (trained before rows were saved there)."""
    rows, missing = [], []
    for run_dir in run_dirs:
        path = Path(run_dir) / "row.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
        else:
            missing.append(Path(run_dir))
    return rows, missing


def baseline_row(cell: dict, args, kind: str = "persistence",
                 datasets: dict | None = None) -> dict:
    """The row of the parameter-free baseline ``kind`` (:data:`BASELINES`) of a cell (no
    training; ``datasets`` reused when given)."""
    protocol = cell_protocol(cell, args)
    options = {k: v for k, v in cell_options(cell, args).items() if k in DATA_DEFAULTS}
    if datasets is None:
        datasets = system_datasets({**DATA_DEFAULTS, **options})
    t0 = time.perf_counter()
    scores = baseline_mse(datasets["test"], protocol, kind)
    return {"model": kind, **cell, "protocol": protocol, "options": options,
            "steps": 0, "epochs": None, "train_s": 0.0, "s_per_epoch": None, **scores,
            "step_s": None, "score_s": time.perf_counter() - t0,
            "command": cell_command(cell, kind, args), "anchor_mse": None,
            "figures": []}


def persistence_row(cell: dict, args, datasets: dict | None = None) -> dict:
    """The ``persistence`` row of a cell (no training; ``datasets`` reused when given)."""
    return baseline_row(cell, args, "persistence", datasets)


def baseline_rows(cell: dict, args, datasets: dict | None = None) -> list[dict]:
    """The baseline rows of a cell (:data:`BASELINES`: persistence, LOCF, linear
    interpolation), the data loaded once (or ``datasets``)."""
    if datasets is None:
        options = {k: v for k, v in cell_options(cell, args).items() if k in DATA_DEFAULTS}
        datasets = system_datasets({**DATA_DEFAULTS, **options})
    return [baseline_row(cell, args, kind, datasets) for kind in BASELINES]


def baseline_rows_printed(cell: dict, args, datasets: dict | None = None) -> list[dict]:
    rows = baseline_rows(cell, args, datasets)
    for row in rows:
        print(f"[latent_ode bench] {cell} {row['model']} ({row['protocol']}): test MSE "
              f"{row['test_mse']:.4g}", flush=True)
    return rows


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
    return (row["dataset"], row["task"], float(row["fraction"]), row["model"],
            row_protocol(row))


def load_previous(path: Path) -> tuple[list, dict | None]:
    """Rows and solve benchmark of an earlier run into the same ``--out`` (so that cells run
    by separate commands end up in one table); empty when there is none."""
    if not path.exists():
        return [], None
    saved = json.loads(path.read_text())
    return list(saved.get("rows", [])), saved.get("solve")


def merge_row(rows: list, new: dict) -> list:
    """``rows`` with ``new`` replacing the row of the same dataset/task/fraction/model/protocol."""
    return [r for r in rows if row_key(r) != row_key(new)] + [new]


def shown_anchor(row: dict):
    """The anchor printed for a row: hopper anchors only beside protocol ``reference`` rows
    (older rows stored one for every hopper row)."""
    if row["dataset"] in REFERENCE_DATASETS and row_protocol(row) != "reference":
        return None
    return row.get("anchor_mse")


def _num(value, fmt: str) -> str:
    return "–" if value is None or value != value else format(value, fmt)


def markdown(rows, solve) -> str:
    lines = ["# Latent ODE benchmark", "",
             "Test MSE on the scored entries (interp: all points; extrap: the points after the "
             "observed prefix). Baselines without training, each variable of each series from "
             "its own observed entries and times: `persistence`: each scored point predicted "
             "by the last value of its feature observed strictly before it (the first observed "
             "value before any); `locf`: the last value observed at or before it (last value "
             "carried forward); `linear_interp`: linear interpolation between the observed "
             "times, constant outside them (equal to `locf` in extrapolation). `anchor` = "
             "the paper's value where it reports one and the row's "
             "protocol is comparable (notes below). Short CPU budgets: the gap to the anchors "
             "is the budget, see the learning curves.", "",
             "| dataset | task | observed | protocol | model | test MSE | anchor | gap (÷ anchor) "
             "| steps | epochs | train CPU min | scored | s/epoch | s/step | gen NFE fwd/bwd "
             "| enc NFE fwd/bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=row_key)
    for r in rows:
        anchor = shown_anchor(r)
        gap = None if anchor is None else r["test_mse"] / anchor
        gen = f"{r.get('gen_nfe_forward', '–')}/{r.get('gen_nfe_backward', '–')}"
        enc = f"{r.get('enc_nfe_forward', '–')}/{r.get('enc_nfe_backward', '–')}"
        observed = f"{r['fraction']}" + ("†" if r["task"] == "extrap" and "protocol" not in r
                                         else "")
        lines.append(
            f"| {r['dataset']} | {r['task']} | {observed} | {row_protocol(r)} | {r['model']} | "
            f"{r['test_mse']:.4g} | {_num(anchor, '.4g')} | "
            f"{'–' if gap is None else f'{gap:.2f}×'} | {r['steps']} | "
            f"{_num(r['epochs'], '.2f')} | "
            f"{_num(None if r.get('train_cpu_s') is None else r['train_cpu_s'] / 60, '.1f')} | "
            f"{r.get('scored', 'last') if r['steps'] else '–'} | {_num(r['s_per_epoch'], '.1f')} | "
            f"{_num(r.get('step_s'), '.2f')} | {gen} | {enc} |")
    notes = []
    if any(r["task"] == "extrap" and "protocol" not in r for r in rows):
        notes.append("† Run before extrapolation honoured `fraction`: the whole observed prefix "
                     "was seen; the label is the fraction it ignored. Re-run the cell for a "
                     "row that observes that fraction of the prefix.")
    if any(r["dataset"] == "hopper" and row_protocol(r) == "ours" for r in rows):
        notes.append(
            "Hopper rows under protocol `ours` have no anchor: the paper's numbers come from "
            "the reference implementation's protocol, in other units. It normalises by "
            "(x − min) / max instead of (x − min) / (max − min), which makes squared errors "
            f"≈{HOPPER_UNIT_FACTOR}× ours on this data (the mean over the 14 features of "
            "((max − min) / max)²); its ODE-RNN anchors also score an unobserved first time "
            "point against 0, and it uses 100-frame windows and the last 20 % as test set. "
            "`--protocol reference` rows are comparable (docs/latent_ode.md § Protocols).")
    ref = [r for r in rows if row_protocol(r) == "reference"]
    if ref:
        notes.append(
            "Protocol `reference` rows are scored as the reference: ODE-RNN / RNN-Δt predict "
            "each sequence's first time point by its observed value, 0 where unobserved; the "
            "Latent ODE's MSE is the mean of the MSEs of 3 z0 samples; the baselines as "
            "defined above. Where the first point is scored (interp), for comparison:")
        for r in ref:
            for key, what in (("test_mse_without_first_point_rule", "without the first-point "
                               "rule"), ("test_mse_with_first_point_rule", "with the ODE-RNN "
                                         "first-point rule")):
                if r.get(key) is not None and abs(r[key] - r["test_mse"]) > 1e-12:
                    notes.append(f"  - {r['dataset']} {r['task']} {r['fraction']} {r['model']} "
                                 f"{what}: {r[key]:.4g}")
    if any(r["dataset"] == "physionet" and row_protocol(r) == "ours" for r in rows):
        notes.append("PhysioNet rows under protocol `ours` have no anchor: the reference scores "
                     "41 variables (the descriptors too), normalises by (x − min) / max over all "
                     "records and averages each record's per-variable MSEs over all 41 slots, "
                     "0 for a variable the record never observed (docs/latent_ode.md § "
                     "Protocols); `--protocol reference` rows are comparable.")
    if any(r["steps"] and r.get("train_cpu_s") is None for r in rows):
        notes.append("Rows without a train CPU figure were trained on a wall-clock budget "
                     "(their command's `--minutes` then meant wall minutes) and scored at "
                     "their last step; s/epoch is wall time for them, CPU time for the others.")
    if any(r.get("scored_step") is not None for r in rows):
        notes.append("`scored`: the state whose test MSE is reported: the lowest validation "
                     "loss (negative ELBO, or the baselines' training loss) among validations "
                     "every `--valid-every` steps and at the last step.")
    if notes:
        lines += ["", "Notes:", ""] + [n if n.startswith("  ") else f"- {n}" for n in notes]
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


def run_in_processes(cells: list[dict], argv: list[str], args) -> None:
    """Train every (cell, model) pair of this command in a subprocess of its own (this script
    with that one cell and model, ``OMP_NUM_THREADS=1``), ``--jobs`` at a time; each merges its
    row into ``--out`` under the lock. A failed pair is reported and the others go on."""
    import subprocess

    strip = {"--cells", "--models", "--jobs"}
    base, skip = [], False
    for token in argv:  # the command's other options, passed through
        if token.startswith("--"):
            skip = token.split("=")[0] in strip
            if token in ("--no-persistence", "--no-solve-bench"):
                continue
        if not skip:
            base.append(token)
    tasks = [(f"{c['dataset']}:{c['task']}:{c['fraction']}", name)
             for c in cells for name in args.models if name not in BASELINES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running, failed = [], []
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while tasks or running:
        while tasks and len(running) < args.jobs:
            cell, name = tasks.pop(0)
            variant = "-prefix" if args.extrap_train == "all" and ":extrap" in cell else ""
            variant += f"@{args.tag}" if args.tag else ""
            log = open(logs / f"{cell.replace(':', '-')}-{name}{variant}.log", "w")
            cmd = [sys.executable, __file__, *base, "--cells", cell, "--models", name,
                   "--no-persistence", "--no-solve-bench"]
            print(f"[latent_ode bench] start {cell} {name} (log: {log.name})", flush=True)
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT),
                            cell, name, log))
        time.sleep(2.0)
        for item in list(running):
            proc, cell, name, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"[latent_ode bench] done {cell} {name}: exit {proc.returncode}",
                      flush=True)
                if proc.returncode:
                    failed.append((cell, name, log.name))
    for cell, name, log in failed:
        print(f"[latent_ode bench] FAILED {cell} {name}: see {log}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per cell")
    p.add_argument("--cells", nargs="+", default=["periodic:interp:0.5", "periodic:extrap"])
    p.add_argument("--models", nargs="*", default=["latent_ode", "ode_rnn", "rnn_dt"],
                   help="latent_ode, latent_ode_poisson, ode_rnn, rnn_dt; the baseline rows "
                        "(persistence, locf, linear_interp) are added to every cell "
                        "(--baselines-only: only those rows)")
    p.add_argument("--n-series", type=int, default=1000)
    p.add_argument("--recipe", default="code", choices=["paper", "code"])
    p.add_argument("--quantization", type=float, default=0.1)
    p.add_argument("--n-records", type=int, default=0, help="PhysioNet subset (0 = all 8000)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--valid-every", type=int, default=200,
                   help="validate every N steps and score the best-validation checkpoint "
                        "(0: no validation, score the last state)")
    p.add_argument("--protocol", default="ours", choices=PROTOCOLS,
                   help="hopper cells: our protocol or the reference implementation's "
                        "(normalisation, windows, split, scoring; see the module docstring)")
    p.add_argument("--extrap-train", default="future", choices=("future", "all"),
                   help="extrapolation cells: train on the points after the split (as the "
                        "reference) or on the observed prefix too (rows labelled 'prefix "
                        "too'); the test score is the future either way")
    p.add_argument("--options", default="{}",
                   help="JSON model settings for the trained rows, e.g. the reference's hopper "
                        "widths '{\"latent_dim\": 15, \"hidden_dim\": 30, \"ode_units\": 300, "
                        "\"ode_layers\": 4}' (needs --tag)")
    p.add_argument("--train-options", default="{}",
                   help="JSON training settings (TrainConfig fields) for the trained rows, e.g. "
                        "the reference's Adamax with lr ×0.999 per step down to lr/10: "
                        "'{\"optimizer\": \"adamax\", \"lr_schedule\": \"step\", "
                        "\"lr_step_size\": 1, \"lr_decay\": 0.999, \"lr_min_factor\": 0.1}' "
                        "(needs --tag)")
    p.add_argument("--tag", default="",
                   help="keep the rows as variants '<model> [TAG]' (own run folders, same "
                        "anchor) beside the default rows")
    p.add_argument("--resume", action="store_true",
                   help="continue each row from its run folder's last checkpoint (written at "
                        "every validation; only at the end with --valid-every 0) instead of "
                        "starting over; --minutes is the total budget of all sessions, the "
                        "settings must be the row's own, and the row equals an uninterrupted one")
    p.add_argument("--jobs", type=int, default=1,
                   help="train the (cell, model) pairs in this many single-threaded processes "
                        "at once (one per core; budgets are CPU seconds of each process)")
    p.add_argument("--speed", action="store_true",
                   help="only measure the step cost of RNN-Δt, ODE-RNN and Latent ODE on each "
                        "cell (speed.json / speed.md under --out)")
    p.add_argument("--no-persistence", "--no-baselines", action="store_true",
                   help="skip the baseline rows (persistence, locf, linear_interp) of each cell")
    p.add_argument("--baselines-only", action="store_true",
                   help="train nothing: score the baseline rows of --cells (persistence, locf, "
                        "linear_interp; they need the data only) and merge them into --out's "
                        "results.json / results.md, keeping the trained rows")
    p.add_argument("--no-solve-bench", action="store_true")
    p.add_argument("--out", default="benchmarks/results/latent_ode")
    p.add_argument("--rescore", nargs="+", metavar="RUN_DIR",
                   help="train nothing: score these run folders' best checkpoints again and "
                        "print their test MSE (and, under the reference protocol, the MSE "
                        "pooled over observations, the ELBO's weighting) as JSON lines")
    p.add_argument("--from-runs", nargs="*", metavar="RUN_DIR",
                   help="train nothing: merge the rows saved in these run folders (their "
                        "row.json; none named: every run folder under --out) into --out's "
                        "results.json and rewrite results.md; rows of results.json that no "
                        "folder replaces (baseline rows, runs not on this disk) are kept")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.rescore:
        for row in rescore(args.rescore):
            print(json.dumps(row), flush=True)
        return
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"--models {unknown}: use any of {list(MODELS)}")
    cells = [parse_cell(text) for text in args.cells]
    check_model_overrides(p, args, cells)
    if args.protocol != "ours" and any(c["dataset"] not in REFERENCE_DATASETS for c in cells):
        p.error(f"--protocol {args.protocol} is defined for hopper and physionet cells only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"

    def save(new_rows=(), new_solve=None):
        """Merge under the lock: re-read what other commands wrote, replace our rows."""
        with _results.locked(path):
            rows, solve = load_previous(path)
            for row in new_rows:
                rows = merge_row(rows, row)
            solve = new_solve or solve
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"rows": rows, "solve": solve}, indent=2, default=str))
            tmp.replace(path)
            (out / "results.md").write_text(markdown(rows, solve))
        return rows, solve

    if args.from_runs is not None:  # the table rebuilt from run folders on disk, no training
        named = [Path(d) for d in args.from_runs]
        runs = named or sorted(d for d in out.iterdir()
                               if (d / "row.json").is_file() or (d / "train_config.json").is_file())
        new, missing = rows_from_runs(runs)
        if named and missing:
            p.error(f"--from-runs: no row.json in {[str(d) for d in missing]} (a run folder "
                    "written before rows were saved beside it: its row is only in results.json)")
        if not new:
            p.error(f"--from-runs: no run folder with a row.json under {out}")
        for d in missing:
            print(f"[latent_ode bench] {d} has no row.json: its row stays as results.json has "
                  "it", file=sys.stderr)
        rows, solve = save(new)
        print(markdown(rows, solve))
        return

    if args.baselines_only:  # no training, no solve benchmark: the baselines of each cell
        for cell in cells:
            rows, solve = save(baseline_rows_printed(cell, args))
        print(markdown(rows, solve))
        return
    if args.speed:
        new = [speed_comparison(cell, args) for cell in cells]
        path = out / "speed.json"
        with _results.locked(path):  # rows of other cells (other commands) are kept

            def key(r):
                return json.dumps([r["cell"], r["protocol"]], sort_keys=True)

            old = json.loads(path.read_text()) if path.exists() else []
            results = [r for r in old if key(r) not in {key(n) for n in new}] + new
            path.write_text(json.dumps(results, indent=2, default=str))
        (out / "speed.md").write_text(speed_markdown(results))
        print(speed_markdown(results))
        return
    if args.jobs > 1:  # every (cell, model) in its own single-threaded process
        run_in_processes(cells, argv if argv is not None else sys.argv[1:], args)
        if not args.no_persistence:
            for cell in cells:
                save(baseline_rows(cell, args))
        rows, solve = save(new_solve=None if args.no_solve_bench else union_vs_rescaled())
        print(markdown(rows, solve))
        return
    for cell in cells:
        datasets = None
        for name in args.models:
            if name in BASELINES:  # their rows are added below
                continue
            print(f"[latent_ode bench] {cell} {name} ({cell_protocol(cell, args)})", flush=True)
            row, datasets = run_cell(name, cell, args, out)
            print(f"[latent_ode bench] {cell} {row['model']} ({row['protocol']}): test MSE "
                  f"{row['test_mse']:.4g} after {row['steps']} steps", flush=True)
            save([row])
        if not args.no_persistence:
            save(baseline_rows_printed(cell, args, datasets))
    rows, solve = save(new_solve=None if args.no_solve_bench else union_vs_rescaled())
    print(markdown(rows, solve))


if __name__ == "__main__":
    main()
