r"""The training loop's own cost: a step inside ``pyro_seqlatent.infer.train`` against the bare
SVI step and a plain-PyTorch twin with the same networks and the same single-sample ELBO.

Every figure is the median and min–max over paired rounds (each round runs every variant once,
back to back, the order reversed every other round; ratios are taken within a round; see
``benchmarks/_twins.py``), on ``--threads`` threads (default 1). Pyro's distribution
validation is off in every variant (``--validate`` turns it on in all); the models check
their own inputs either way.

(a), (b) **VAE** on binarized-MNIST shapes: 784 → 400 → 40 (mean-field) → 400 → 784,
Bernoulli decoder, batch 100, Adam (lr 1e-3). Data: statically binarized MNIST's 50,000
training images when ``PYRO_SEQLATENT_DATA`` holds them, else 50,000 synthetic binary images
(pixels on with probability 0.13, MNIST's mean); the JSON says which.

* ``plain``: the twin, ``zero_grad → loss → backward → Adam step`` with its batches taken by
  ``index_select`` from a fresh permutation each epoch (the reference of every ratio);
* ``train`` / ``train_jit``: ``train(model, guide, data, batch_size=100, lr=1e-3,
  clip_norm=100, elbo=Trace_ELBO | JitTrace_ELBO)``; the time per step is measured between the
  callbacks of step ``warmup`` and of the last step, so setup (the first trace, the JIT
  compilation) is left out and everything the loop does per step is in;
* ``svi`` / ``svi_jit``: ``elbo.differentiable_loss(model, guide, x)`` + ``backward`` + Adam, on
  the twin's batches (``Trace_ELBO`` / ``JitTrace_ELBO``, the latter with ``pyro.module``).

(c) **VRNN** (:mod:`pyro_seqlatent.models.vrnn`) at JSB's shapes: T = 100, B = 64, h = 64
(features and MLP layers too), z = 16, x = 88, GRU, Bernoulli emissions, full masks, on 512
synthetic sequences of sparse binary frames (10 % on). ``plain`` is the twin of
``_twins.plain_vrnn_loss`` (only the recurrence in the time loop; φ_x, log q, the prior and
the decoder batched outside it); ``train`` is ``train(..., batch_size=64, clip_norm=10,
elbo=DeviceTrace_ELBO)`` (the VRNN's registered ELBO); ``svi`` the bare step with that ELBO.

Before timing, each twin is checked against Pyro's estimator: the same value for the same noise,
and the same mean over independent seeds.

    python benchmarks/overhead.py                   # ~1-2 minutes on a busy 2-core machine
    PYRO_SEQLATENT_DATA=../shared/data python benchmarks/overhead.py \
        --out benchmarks/results/overhead           # the committed table (real MNIST)
    python benchmarks/overhead.py --profile 200    # cProfile of 200 VAE steps inside train
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads; --threads sets it too
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _twins  # noqa: E402  (benchmarks/_twins.py: this script's folder is on sys.path)
import pyro  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from pyro_seqlatent.infer import train  # noqa: E402
from pyro_seqlatent.infer.elbos import make_elbo  # noqa: E402
from pyro_seqlatent.models.vae import VAE, VAEGuide  # noqa: E402

VAE_BATCH, VRNN_BATCH, VRNN_SEQUENCES = 100, 64, 512


def vae_data(seed: int = 0):
    """``(dataset, images, source)``: binarized MNIST's training split if the data root has it,
    else synthetic binary images of the same shape."""
    try:
        from pyro_seqlatent.data.mnist import BinarizedMNIST

        data = BinarizedMNIST("train")
        return data, data.images, "binarized MNIST, train split (50,000 images)"
    except (FileNotFoundError, OSError, ValueError, ImportError):
        gen = torch.Generator().manual_seed(seed)
        images = (torch.rand(50_000, 784, generator=gen) < 0.13).float()
        return TensorDataset(images), images, "synthetic: 50,000 x 784 pixels, on w.p. 0.13"


def train_step_seconds(model, guide, data, *, steps: int, warmup: int, seed: int,
                       **settings) -> tuple[float, float]:
    """``(wall, cpu)`` seconds per step of ``train``, between the callbacks of step ``warmup``
    and of the last step (setup left out, every per-step cost of the loop in)."""
    stamps: list[tuple[float, float]] = []

    def stamp(record, model, guide):
        stamps.append((time.perf_counter(), time.process_time()))

    train(model, guide, data, num_steps=warmup + steps, progress=False, log_every=1, seed=seed,
          callbacks=[stamp], **settings)
    (w0, c0), (w1, c1) = stamps[warmup - 1], stamps[-1]
    return (w1 - w0) / steps, (c1 - c0) / steps


def registered(module, name: str):
    """``module`` called with its parameters registered in Pyro's param store (a JIT ELBO
    takes them from there)."""
    def fn(*args, **kwargs):
        pyro.module(name, module)
        return module(*args, **kwargs)
    return fn


def vae_section(args) -> dict:
    dataset, images, source = vae_data()
    torch.manual_seed(0)
    model, guide = VAE(784, 40, (400,)), VAEGuide(784, 40, (400,))
    twin_model, twin_guide = copy.deepcopy(model), copy.deepcopy(guide)
    twin_params = [*twin_model.parameters(), *twin_guide.parameters()]
    params = [*model.parameters(), *guide.parameters()]
    batches = _twins.TensorBatches(images, VAE_BATCH, seed=0)
    x0 = batches.next()
    trace_elbo = make_elbo("Trace_ELBO")
    check = _twins.agreement(lambda: _twins.plain_vae_loss(model, guide, x0),
                             lambda: trace_elbo.differentiable_loss(model, guide, x0),
                             num_seeds=args.agreement_seeds)
    jit_elbo = make_elbo("JitTrace_ELBO")
    model_fn, guide_fn = registered(model, "overhead_vae_model"), registered(guide,
                                                                           "overhead_vae_guide")
    for _ in range(3):  # compiled, and optimized by TorchScript's profiling runs, here
        jit_elbo.differentiable_loss(model_fn, guide_fn, x0).backward()
    rounds = iter(range(10**9))
    common = {"steps": args.vae_steps, "warmup": args.warmup}
    settings = {"batch_size": VAE_BATCH, "lr": 1e-3, "clip_norm": 100.0}

    variants = {
        "plain": lambda: _twins.timed_steps(
            lambda: _twins.plain_vae_loss(twin_model, twin_guide, batches.next()), twin_params,
            args.vae_steps, args.warmup),
        "train": lambda: train_step_seconds(model, guide, dataset, seed=next(rounds),
                                            elbo="Trace_ELBO", **common, **settings),
        "svi": lambda: _twins.timed_steps(
            lambda: trace_elbo.differentiable_loss(model, guide, batches.next()), params,
            args.vae_steps, args.warmup),
        "train_jit": lambda: train_step_seconds(model, guide, dataset, seed=next(rounds),
                                                elbo="JitTrace_ELBO", **common, **settings),
        "svi_jit": lambda: _twins.timed_steps(
            lambda: jit_elbo.differentiable_loss(model_fn, guide_fn, batches.next()), params,
            args.vae_steps, args.warmup),
    }
    out = _twins.paired_rounds(variants, args.rounds, reference="plain")
    return {"data": source, "batch_size": VAE_BATCH, "steps_per_round": args.vae_steps,
            "warmup_steps": args.warmup, "agreement": check, **out}


def vrnn_section(args) -> dict:
    model, guide, x0, mask0 = _twins.make_vrnn_problem(100, VRNN_BATCH, 64, 16, 88)
    gen = torch.Generator().manual_seed(1)
    xs = (torch.rand(VRNN_SEQUENCES, 100, 88, generator=gen) < 0.1).float()
    masks = torch.ones(VRNN_SEQUENCES, 100, dtype=torch.bool)
    dataset = TensorDataset(xs, masks)
    twin_model, twin_guide = copy.deepcopy(model), copy.deepcopy(guide)
    twin_params = list({id(p): p for m in (twin_model, twin_guide)
                        for p in m.parameters()}.values())
    params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
    batches = _twins.TensorBatches((xs, masks), VRNN_BATCH, seed=0)
    elbo = make_elbo("DeviceTrace_ELBO")
    check = _twins.agreement(lambda: _twins.plain_vrnn_loss(model, guide, x0, mask0),
                             lambda: elbo.differentiable_loss(model, guide, x0, mask0),
                             num_seeds=args.agreement_seeds)
    rounds = iter(range(10**9))
    variants = {
        "plain": lambda: _twins.timed_steps(
            lambda: _twins.plain_vrnn_loss(twin_model, twin_guide, *batches.next()),
            twin_params, args.vrnn_steps, args.warmup),
        "train": lambda: train_step_seconds(
            model, guide, dataset, steps=args.vrnn_steps, warmup=args.warmup,
            seed=next(rounds), batch_size=VRNN_BATCH, lr=1e-3, clip_norm=10.0,
            elbo="DeviceTrace_ELBO"),
        "svi": lambda: _twins.timed_steps(
            lambda: elbo.differentiable_loss(model, guide, *batches.next()), params,
            args.vrnn_steps, args.warmup),
    }
    out = _twins.paired_rounds(variants, args.rounds, reference="plain")
    return {"data": f"synthetic: {VRNN_SEQUENCES} sequences, T=100, x=88, 10% on, full masks",
            "shape": {"T": 100, "B": VRNN_BATCH, "h": 64, "z": 16, "x": 88, "rnn": "gru"},
            "elbo": "DeviceTrace_ELBO", "steps_per_round": args.vrnn_steps,
            "warmup_steps": args.warmup, "agreement": check, **out}


LABELS = {
    "vae": {"train": "inside `train`, `Trace_ELBO`",
            "svi": "bare SVI step, `Trace_ELBO`",
            "train_jit": "inside `train`, `JitTrace_ELBO`",
            "svi_jit": "bare SVI step, `JitTrace_ELBO`"},
    "vrnn": {"train": "inside `train`, `DeviceTrace_ELBO`",
             "svi": "bare SVI step, `DeviceTrace_ELBO`"},
}
TARGETS = {("vae", "train"): 1.15, ("vrnn", "train"): 1.15}


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# The training loop's overhead (`benchmarks/overhead.py`)",
        "",
        f"Command: `{result['command']}`  ",
        f"torch {result['torch']}, Pyro {result['pyro']}, {cfg['threads']} thread(s), "
        f"{cfg['rounds']} paired rounds (order reversed every other round), Pyro validation "
        f"{'on' if cfg['validate'] else 'off'}; {result['machine']}; code "
        f"{result['code']}.",
        "",
        "Each figure: median (min–max) over the rounds; a ratio is a step's time over the "
        "plain-PyTorch twin's in the same round (same networks, same single-sample ELBO, "
        "Adam). Wall time is what a run takes; the process's CPU time is what it costs, and "
        "moves less when other jobs share the cores.",
    ]
    for key, title in (("vae", "VAE, 784-400-40 mean-field, batch 100"),
                       ("vrnn", "VRNN, T=100, B=64, h=64, z=16, x=88, GRU")):
        sec = result.get(key)
        if sec is None:
            continue
        wall, cpu = sec["wall"], sec["cpu"]
        lines += ["", f"## {title}", "",
                  f"Data: {sec['data']}; {sec['steps_per_round']} timed steps per variant and "
                  f"round after {sec['warmup_steps']} untimed.", "",
                  "| variant | wall ms / step | wall ratio to plain | CPU ms / step "
                  "| CPU ratio to plain | target |", "|---|---|---|---|---|---|",
                  f"| plain PyTorch twin | {_twins.ms_text(wall['ms_per_step']['plain'])} | 1 "
                  f"| {_twins.ms_text(cpu['ms_per_step']['plain'])} | 1 | |"]
        for name, label in LABELS[key].items():
            target = TARGETS.get((key, name))
            lines.append(f"| {label} | {_twins.ms_text(wall['ms_per_step'][name])} | "
                         f"{_twins.ratio_text(wall['ratio'][name])} | "
                         f"{_twins.ms_text(cpu['ms_per_step'][name])} | "
                         f"{_twins.ratio_text(cpu['ratio'][name])} | "
                         f"{f'<= {target:.2f}x' if target else ''} |")
        a = sec["agreement"]
        lines += ["", f"Twin check: largest relative difference for the same noise "
                      f"{a['max_rel_diff_same_noise']:.1e}; mean difference over "
                      f"{a['num_seeds']} seeds {a['mean_diff']:.3g} ± {a['mean_diff_se']:.3g} "
                      "(s.e.)."]
    return "\n".join(lines) + "\n"


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout measured (``unknown`` outside one)."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def profile(steps: int) -> None:
    """cProfile of ``steps`` VAE steps inside ``train`` (the 40 largest own times)."""
    import cProfile
    import pstats

    dataset, _, source = vae_data()
    model, guide = VAE(784, 40, (400,)), VAEGuide(784, 40, (400,))
    prof = cProfile.Profile()
    prof.enable()
    train(model, guide, dataset, num_steps=steps, batch_size=VAE_BATCH, lr=1e-3,
          clip_norm=100.0, progress=False)
    prof.disable()
    print(f"# {steps} VAE steps inside train on {source}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds (default 7)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead"),
                        help="folder for results.json and results.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=40, help="timed VAE steps per round")
    parser.add_argument("--vrnn-steps", type=int, default=5, help="timed VRNN steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    parser.add_argument("--agreement-seeds", type=int, default=20)
    parser.add_argument("--only", choices=("vae", "vrnn"), default=None)
    parser.add_argument("--validate", action="store_true", help="Pyro validation on")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="print a cProfile of STEPS VAE steps inside train, then stop")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1 or args.vae_steps < 1 or args.vrnn_steps < 1:
        parser.error("--rounds, --warmup, --vae-steps and --vrnn-steps must be >= 1")
    _twins.fix_threads(args.threads)
    pyro.enable_validation(args.validate)
    if args.profile:
        profile(args.profile)
        return {}
    t0 = time.perf_counter()
    result = {
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__, "pyro": pyro.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "code": code_version(),
    }
    if args.only in (None, "vae"):
        result["vae"] = vae_section(args)
    if args.only in (None, "vrnn"):
        result["vrnn"] = vrnn_section(args)
    result["seconds"] = time.perf_counter() - t0
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
