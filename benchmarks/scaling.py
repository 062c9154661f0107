"""Data-parallel scaling: SVI steps/s and EM iterations/s with 1 and 2 (or more) processes.

Each configuration runs in fresh processes launched like ``torchrun --standalone`` (gloo on the
CPU, NCCL with ``--device cuda``), trains with the one trainer (:func:`pyro_seqlatent.infer.train`)
on synthetic data of realistic size and reports the steady-state rate (the first ``--warmup``
steps are excluded). The global batch is the same for every process count, so "steps/s" is
directly comparable and "examples/s" = steps/s x global batch. It also counts the host syncs per
SVI step in one process (``count_host_syncs``), split by kind.

    python benchmarks/scaling.py                          # CPU: 1 and 2 processes, 1 thread each
    python benchmarks/scaling.py --device cuda --nprocs 1 # one GPU
    python benchmarks/scaling.py --models gmm --nprocs 1 2 4

Results go to benchmarks/results/scaling.{json,md} (``--out``), built from the rates of the run
itself (the processes report them through a temporary folder; no run folders are kept), so
rebuilding them means running it again.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from pyro_seqlatent.testing import count_host_syncs, run_local

MODELS = ("vae", "vrnn", "gmm")


def vae_case(scale: float):
    from pyro_seqlatent.models.vae import VAE, VAEGuide

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(int(2000 * scale) + 200, 784, generator=g) < 0.2).float()
    torch.manual_seed(0)
    model, guide = VAE(784, 40, (400,)), VAEGuide(784, 40, (400,))
    return model, guide, list(x), None, 100, "784-400-40 MLP, Bernoulli, mean-field guide"


def vrnn_case(scale: float):
    from pyro_seqlatent.data.sequences import pad_collate
    from pyro_seqlatent.models.vrnn import build_vrnn

    g = torch.Generator().manual_seed(0)
    seqs = [(torch.rand(50, 88, generator=g) < 0.05).float() for _ in range(int(200 * scale) + 40)]
    torch.manual_seed(0)
    model, guide = build_vrnn(88, z_dim=32, h_dim=128, feature_dim=128, hidden_dim=128)
    return model, guide, seqs, pad_collate, 20, "JSB-sized: D=88, T=50, h=128, z=32, GRU"


def _svi_worker(rank, name, steps, warmup, device, threads, out):
    from pyro_seqlatent.infer import train

    torch.set_num_threads(threads)
    model, guide, data, collate, batch, _ = CASES[name](1.0)
    result = train(model, guide, data, collate_fn=collate, num_steps=steps, batch_size=batch,
                   lr=1e-3, device=device, progress=False, seed=0)
    times = [r["time_s"] for r in result.history]
    rate = (steps - warmup) / (times[-1] - times[warmup - 1])
    if rank == 0:
        Path(out).write_text(json.dumps({"steps_per_s": rate, "global_batch": batch}))


def _gmm_worker(rank, n, d, k, iters, device, threads, out):
    from pyro_seqlatent.em.distributed import DistributedGaussianMixture, shard_rows
    from pyro_seqlatent.parallel import init_distributed

    torch.set_num_threads(threads)
    dev = init_distributed(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x = x[shard_rows(n)].to(dev)
    gmm = DistributedGaussianMixture(k, covariance_type="diag", tol=0.0, max_iter=iters,
                                     random_state=0, dtype=torch.float32)
    gmm.fit(x)
    t = gmm.fit_times_
    rate = (len(t) - 1) / (t[-1] - t[0])  # iterations/s after the first
    if rank == 0:
        Path(out).write_text(json.dumps({"iters_per_s": rate}))


CASES = {"vae": vae_case, "vrnn": vrnn_case}


SYNC_SETTINGS = {  # label -> (elbo, pyro_validation)
    "Trace_ELBO, validation on": ("Trace_ELBO", True),
    "DeviceTrace_ELBO, validation off": ("DeviceTrace_ELBO", False),
}


def host_syncs(name: str, device: str, elbo: str = "Trace_ELBO",
               validation: bool | None = None) -> dict:
    """Host syncs per SVI step in one process (difference of a 3- and a 1-step run)."""
    from pyro_seqlatent.infer import train

    counts = []
    for steps in (1, 3):
        model, guide, data, collate, batch, _ = CASES[name](0.1)
        with count_host_syncs() as c:
            train(model, guide, data, collate_fn=collate, num_steps=steps, batch_size=batch,
                  device=device, progress=False, elbo=elbo, pyro_validation=validation)
        counts.append(dict(c))
    return {k: (counts[1][k] - counts[0][k]) / 2 for k in counts[0] if counts[1][k] - counts[0][k]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gmm-size", default="200000x16x16",
                        help="N x D x K of the GMM EM case (default: 200000x16x16)")
    parser.add_argument("--gmm-iters", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/scaling")
    args = parser.parse_args()
    n, d, k = (int(v) for v in args.gmm_size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for nproc in args.nprocs:
                out = Path(tmp) / f"{name}-{nproc}.json"
                start = time.perf_counter()
                if name == "gmm":
                    run_local(_gmm_worker, nproc, n, d, k, args.gmm_iters, args.device,
                              args.threads, str(out), timeout_s=600)
                else:
                    run_local(_svi_worker, nproc, name, args.steps, args.warmup, args.device,
                              args.threads, str(out), timeout_s=600)
                row = {"model": name, "processes": nproc, "device": args.device,
                       "threads_per_process": args.threads, **json.loads(out.read_text()),
                       "job_wall_s": round(time.perf_counter() - start, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    syncs = {name: {label: host_syncs(name, args.device, *setting)
                    for label, setting in SYNC_SETTINGS.items()}
             for name in args.models if name in CASES}
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "cases": {name: CASES[name](0.0)[5] for name in args.models if name in CASES},
            "gmm": f"N={n}, D={d}, K={k}, diag, float32", "host_syncs_per_step": syncs,
            "command": "python benchmarks/scaling.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" if not isinstance(v, list)
                else f"--{k} {' '.join(map(str, v))}" for k, v in vars(args).items())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    lines = ["| model | processes | device | steps/s (EM: iterations/s) | speed-up |",
             "|---|---|---|---|---|"]
    base = {}
    for row in rows:
        rate = row.get("steps_per_s", row.get("iters_per_s"))
        base.setdefault(row["model"], rate)
        lines.append(f"| {row['model']} | {row['processes']} | {row['device']} | {rate:.2f} | "
                     f"{rate / base[row['model']]:.2f}x |")
    lines += ["", "Host reads per SVI step (one process; on a GPU each waits for the device; "
              "Adam's `.item()` on its CPU step counters is counted but waits for nothing):", "",
              "| model | setting | reads per step | by kind |", "|---|---|---|---|"]
    lines += [f"| {name} | {label} | {sum(c.values()):g} | {json.dumps(c)} |"
              for name, by_setting in syncs.items() for label, c in by_setting.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
