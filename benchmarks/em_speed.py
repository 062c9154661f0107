"""Time per GMM EM iteration: pyro_seqlatent.em.GaussianMixture against scikit-learn.

One EM iteration = E-step over all rows + closed-form M-step, timed over ``--iters`` iterations
at tol = 0 with the initialisation excluded (both start from the same parameters). scikit-learn
is timed through its own ``_e_step`` / ``_m_step`` pair, exactly what its ``fit`` loop runs.
Both use the same threads (set OMP_NUM_THREADS for a fair single-thread comparison).

    python benchmarks/em_speed.py                 # the CPU cases
    python benchmarks/em_speed.py --gpu           # also 1e6 x 64, K = 64 diag on CUDA
    python benchmarks/em_speed.py --json out.json # machine-readable results
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from pyro_seqlatent.em import GaussianMixture

CPU_CASES = [
    dict(n=100_000, d=32, k=16, cov="full"),
    dict(n=100_000, d=64, k=64, cov="diag"),
]
GPU_CASE = dict(n=1_000_000, d=64, k=64, cov="diag")


def make_data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(k, d))
    return centers[rng.integers(k, size=n)] + rng.normal(size=(n, d))


def sklearn_step(X: np.ndarray, k: int, cov: str, means0):
    sk = SkGaussianMixture(k, covariance_type=cov, max_iter=1, tol=0, means_init=means0,
                           init_params="random_from_data", random_state=0)
    sk._initialize_parameters(X, np.random.RandomState(0))  # init excluded from the timing
    sk._m_step(X, sk._e_step(X)[1])

    def step():
        _, log_resp = sk._e_step(X)
        sk._m_step(X, log_resp)

    return step


def ours_step(X: torch.Tensor, k: int, cov: str, means0):
    g = GaussianMixture(k, covariance_type=cov, max_iter=1, tol=0, means_init=means0)
    g.fit(X)  # initialisation + one iteration, excluded
    source = g._source(X)
    source.chunk_size = g._chunk_rows(source)
    sync = torch.cuda.synchronize if X.is_cuda else (lambda: None)

    def step():
        g.m_step(g.accumulate_statistics(source))
        sync()

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run_case(case: dict, iters: int, device: str) -> dict:
    """Alternate one scikit-learn and one pyro_seqlatent iteration (the host is shared, so
    interleaving keeps both under the same load) and report the medians."""
    X = make_data(case["n"], case["d"], case["k"])
    means0 = X[np.random.default_rng(1).choice(len(X), case["k"], replace=False)]
    Xt = torch.as_tensor(X, device=device)
    sk, ours = sklearn_step(X, case["k"], case["cov"], means0), ours_step(
        Xt, case["k"], case["cov"], means0)
    sk_t, ours_t = [], []
    for _ in range(iters):
        sk_t.append(timed(sk))
        ours_t.append(timed(ours))
    sk_s, ours_s = float(np.median(sk_t)), float(np.median(ours_t))
    return {**case, "device": device, "sklearn_s_per_iter": sk_s, "ours_s_per_iter": ours_s,
            "time_ratio_ours_over_sklearn": ours_s / sk_s, "speedup": sk_s / ours_s}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA case")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"host: {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, float64, median of {args.iters} interleaved iterations")
    results = [run_case(c, args.iters, "cpu") for c in CPU_CASES]
    if args.gpu:
        if torch.cuda.is_available():
            results.append(run_case(GPU_CASE, args.iters, "cuda"))
        else:
            print("no CUDA device: GPU case skipped")
    print(f"{'case':<26}{'device':>7}{'sklearn s/it':>14}{'ours s/it':>12}{'ours/sklearn':>14}")
    for r in results:
        name = f"{r['n']:.0e} x {r['d']}, K={r['k']} {r['cov']}"
        print(f"{name:<26}{r['device']:>7}{r['sklearn_s_per_iter']:>14.4f}"
              f"{r['ours_s_per_iter']:>12.4f}{r['time_ratio_ours_over_sklearn']:>14.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
