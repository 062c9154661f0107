"""Your own data, one family at a time (docs/own-data.md): each part writes a small file with
numpy, trains on it from Python and through the command line, and scores the test split.

    python examples/own_data.py                   # the figures of docs/own-data.md (~2 CPU-min)
    python examples/own_data.py --quick           # the test's run (a few steps each)

* vectors / images: 8x8 binary "bars" images (uint8, with labels) -> the ``vae`` system;
* regular sequences: noisy 2-D oscillations of different lengths (``seq_0, seq_1, ...``) ->
  ``vrnn`` from Python, ``rnn`` on the command line;
* irregular series: a damped pendulum seen at its own random times, 20 % of the entries
  missing (NaN) -> a Latent ODE from Python, ``latent_ode`` on the command line.

No file is needed from the data folder; everything is written under ``--out`` (default: a
temporary folder).
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyro

from pyro_seqlatent.cli import main as cli
from pyro_seqlatent.data.user_files import load_user_data, task_datasets
from pyro_seqlatent.experiments.systems import evaluate_run, train_system
from pyro_seqlatent.infer import evaluate, train
from pyro_seqlatent.models.latent_ode import LatentODEGuide, LatentODEModel
from pyro_seqlatent.models.vae import VAE, VAEGuide


def bars(n, rng):
    """(n, 8, 8) uint8 images of random horizontal (label 0) or vertical (1) bars."""
    labels = rng.integers(0, 2, n)
    lines = rng.random((n, 8)) < 0.3
    images = np.where(labels[:, None, None] == 0, lines[:, :, None], lines[:, None, :])
    images = np.broadcast_to(images, (n, 8, 8)) ^ (rng.random((n, 8, 8)) < 0.02)
    return images.astype(np.uint8), labels


def bars_log_px(images):
    """Exact log p(x) of :func:`bars` images under their generator, by enumerating its 2 x 2^8
    clean images (orientation, lines) and the independent 2 % pixel flips: the best a model
    can score."""
    lines = (np.arange(256)[:, None] >> np.arange(8)) & 1  # every set of lines
    clean = np.concatenate([np.broadcast_to(lines[:, :, None], (256, 8, 8)),
                            np.broadcast_to(lines[:, None, :], (256, 8, 8))]).reshape(512, 64)
    log_prior = np.log(0.5) + (lines * np.log(0.3) + (1 - lines) * np.log(0.7)).sum(1)
    log_prior = np.concatenate([log_prior, log_prior])
    flips = (images.reshape(len(images), 1, 64) != clean[None]).sum(-1)
    log_joint = log_prior + flips * np.log(0.02) + (64 - flips) * np.log(0.98)
    top = log_joint.max(1, keepdims=True)
    return (top[:, 0] + np.log(np.exp(log_joint - top).sum(1)))


def oscillations(n, rng):
    """n sequences (T_i, 2), T_i in 10..30: (cos, sin) of a random frequency plus noise."""
    out = []
    for _ in range(n):
        t = np.arange(int(rng.integers(10, 31)))
        w, phase = rng.uniform(0.2, 0.6), rng.uniform(0, 2 * np.pi)
        clean = np.stack([np.cos(w * t + phase), np.sin(w * t + phase)], -1)
        out.append(clean + 0.1 * rng.normal(size=clean.shape))
    return out


def pendulum(n, rng, points=30, missing=0.2):
    """times (n, points): each series its own sorted draw of ``points`` of the instants 0, 0.05,
    ..., 5 (time stamps rounded to 0.05: the batches' union grids stay small); values
    (n, points, 2): angle and angular velocity of damped pendulums, NaN at a random 20 % of
    the entries."""
    grid = np.linspace(0, 5, 101)
    times = np.sort(np.stack([rng.choice(grid, points, replace=False) for _ in range(n)]), 1)
    amp, decay, freq = rng.uniform(0.5, 1.5, (3, n, 1)) * [[[1.0]], [[0.3]], [[2.0]]]
    envelope = amp * np.exp(-decay * times)
    angle = envelope * np.cos(freq * times)
    velocity = -envelope * (decay * np.cos(freq * times) + freq * np.sin(freq * times))
    values = np.stack([angle, 0.3 * velocity], -1)
    values[rng.random(values.shape) < missing] = np.nan
    values[:, 0] = np.nan_to_num(values[:, 0])  # every series starts observed
    return times, values


def run_cli(argv):
    """Run ``pyro-seqlatent ARGV`` in this process (the same as typing it in a shell)."""
    print("$ pyro-seqlatent " + " ".join(argv))
    if cli(argv) != 0:
        raise SystemExit(f"pyro-seqlatent {' '.join(argv)} failed")


def vectors_part(out, quick, rng):
    images, labels = bars(200 if quick else 2000, rng)
    np.savez(out / "bars.npz", x=images, y=labels)  # (N, 8, 8) uint8 in {0, 1}, labels
    # Python, from arrays: flattened to (N, 64) floats; the labels are dropped (labels=False)
    data = load_user_data({"x": images, "y": labels}, "vectors", binary=True)
    model = VAE(data.dim, latent_dim=8, hidden_dims=(128,))
    guide = VAEGuide(data.dim, 8, (128,), model=model)
    train(model, guide, data.splits["train"], num_steps=10 if quick else 1500, batch_size=50,
          lr=3e-3, progress=False)
    scores = evaluate(model, guide, data.splits["test"], num_samples=10 if quick else 200)
    test = data.splits["test"].x.numpy().reshape(-1, 8, 8)
    exact = float(bars_log_px(test).mean())
    print(f"vectors, Python: test log p(x) {scores['log_marginal']:.2f} nats per image "
          f"(ELBO {scores['elbo']:.2f}) on {len(test)} images; the generator's own: "
          f"{exact:.2f}")
    # the command line: the same file, the registered vae system
    run = out / "runs" / "vae"
    run_cli(["train", "vae", "--data", str(out / "bars.npz"), "--latent-dim", "8",
             "--hidden-dims", "128", "--num-steps", "10" if quick else "1500", "--batch-size",
             "50", "--lr", "3e-3", "--valid-every", "500", "--run-dir", str(run)])
    run_cli(["evaluate", str(run), "--num-samples", "10" if quick else "200"])
    cli_scores = json.loads(next(run.glob("eval_test_K*.json")).read_text())
    return {"vae_python_log_px": scores["log_marginal"], "bars_exact_log_px": exact,
            "vae_cli_log_px": cli_scores["log_marginal"]}


def sequences_part(out, quick, rng):
    seqs = oscillations(60 if quick else 400, rng)
    np.savez(out / "waves.npz", **{f"seq_{i}": s for i, s in enumerate(seqs)})
    small = {"h_dim": 16, "feature_dim": 16, "hidden_dim": 16}
    # Python: the registered system on the file (splits 80/10/10, seed 0)
    result, *_ = train_system("vrnn", {"data": str(out / "waves.npz"), "z_dim": 2, **small},
                              out / "runs" / "vrnn", num_steps=10 if quick else 600,
                              batch_size=20, lr=3e-3, valid_every=200, progress=False)
    scores = evaluate_run(out / "runs" / "vrnn", num_samples=5 if quick else 50)
    steps = load_user_data(out / "waves.npz", "sequences").splits["test"].num_steps()
    print(f"sequences, Python (vrnn): test log p(x) {scores['log_marginal']:.2f} nats per "
          f"sequence, {scores['log_marginal'] * scores['num_points'] / steps:.3f} per step")
    run = out / "runs" / "rnn"
    run_cli(["train", "rnn", "--data", str(out / "waves.npz"), "--h-dim", "16",
             "--feature-dim", "16", "--hidden-dim", "16", "--num-steps",
             "10" if quick else "600", "--batch-size", "20", "--lr", "3e-3", "--run-dir",
             str(run)])
    run_cli(["evaluate", str(run), "--num-samples", "1"])
    rnn = json.loads((run / "eval_test_K1.json").read_text())
    print(f"sequences, command line (rnn): {rnn['log_marginal']:.2f} nats per sequence")
    return {"vrnn_log_px": scores["log_marginal"], "rnn_log_px": rnn["log_marginal"],
            "vrnn_steps": result.step}


def irregular_part(out, quick, rng):
    times, values = pendulum(60 if quick else 300, rng)
    np.savez(out / "pendulum.npz", times=times, values=values)  # NaN: missing
    data = load_user_data(out / "pendulum.npz", "irregular")
    tasks = task_datasets(data.splits, "interp", fraction=0.5)  # observe half, score all
    model = LatentODEModel(data.dim, 4, (32,), obs_std=0.05, method="rk4")
    guide = LatentODEGuide(data.dim, 4, 16, (32,))
    train(model, guide, tasks["train"], collate_fn=data.collate_fn, lr=3e-3, batch_size=20,
          num_steps=5 if quick else 300, progress=False)
    scores = evaluate(model, guide, tasks["test"], collate_fn=data.collate_fn,
                      num_samples=5 if quick else 50)
    print(f"irregular, Python: test log p(x) {scores['log_marginal']:.1f} nats per series")
    run = out / "runs" / "latent_ode"
    run_cli(["train", "latent_ode", "--data", str(out / "pendulum.npz"), "--task", "interp",
             "--latent-dim", "4", "--hidden-dim", "16", "--ode-units", "32", "--ode-layers",
             "1", "--obs-std", "0.05", "--method", "rk4", "--num-steps",
             "5" if quick else "300", "--batch-size", "20", "--lr", "3e-3", "--valid-every",
             "100", "--run-dir", str(run)])
    run_cli(["evaluate", str(run), "--num-samples", "5" if quick else "50"])
    cli_scores = json.loads(next(run.glob("eval_test_K*.json")).read_text())
    return {"latent_ode_python_log_px": scores["log_marginal"],
            "latent_ode_cli_log_px": cli_scores["log_marginal"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each (the test's run)")
    parser.add_argument("--out", default=None, help="folder for the files and runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="own_data_"))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    pyro.set_rng_seed(args.seed)
    results = {}
    for part in (vectors_part, sequences_part, irregular_part):
        results.update(part(out, args.quick, rng))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
