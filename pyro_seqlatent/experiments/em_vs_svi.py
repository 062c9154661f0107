"""EM against SVI on the same models and data: ``pyro-seqlatent em-vs-svi`` and a demo section.

For each model (GMM, PPCA, LG-SSM) and dataset (synthetic with known parameters, and real
data: FSDD speech frames for GMM/PPCA, JSB chorales for the LG-SSM) this fits the model by EM
(:mod:`pyro_seqlatent.em`) and by SVI (the Pyro twins of :mod:`pyro_seqlatent.models.em_twins`
through :func:`pyro_seqlatent.infer.train`) and records the *exact* log-likelihood (per data
point for GMM/PPCA, per sequence for the LG-SSM) against wall time. SVI's curve is evaluated
every few steps with the exact EM ``score`` of its current parameters (evaluation time is not
counted). :mod:`pyro_seqlatent.em` itself depends on torch only; this driver is where EM meets
Pyro, the trainer and the data loaders (imported when a comparison runs, so that registering the
command stays cheap).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_seqlatent.em.gmm import GaussianMixture
from pyro_seqlatent.em.lgssm import LinearGaussianSSM
from pyro_seqlatent.em.ppca import PPCA
from pyro_seqlatent.registry import CommandSpec, register_command, register_demo_section

MODELS = ("gmm", "ppca", "lgssm")
DATASETS = ("synthetic", "real")


# ---------------------------------------------------------------------------------- data
def _synthetic_gmm(n: int = 3000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 4.0, -1.0], [3.0, 3.0, 3.0]])
    labels = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), n, True, generator=gen)
    A = torch.randn(4, 3, 3, generator=gen) * 0.4 + torch.eye(3)
    return means[labels] + (torch.randn(n, 1, 3, generator=gen) @ A[labels]).squeeze(1)


def _synthetic_ppca(n: int = 3000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(12, 3, generator=gen) * torch.tensor([3.0, 2.0, 1.5])
    return (torch.randn(n, 3, generator=gen) @ W.T + 0.5 * torch.randn(n, 12, generator=gen)
            + torch.randn(12, generator=gen))


def _synthetic_lgssm(seed: int = 0, n: int = 24, T: int = 40
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    truth = LinearGaussianSSM(2).set_params(
        A=[[0.95, 0.2], [-0.2, 0.9]], Q=0.05 * np.eye(2), V0=np.eye(2), mu0=[1.0, 0.0],
        C=np.random.default_rng(seed).normal(size=(6, 2)), d=np.zeros(6), R=0.1 * np.eye(6))
    _, y = truth.sample(n, T, torch.Generator().manual_seed(seed))
    return y.float(), torch.ones(n, T, dtype=torch.bool)


def load_case(model: str, data: str, root: Any = None, small: bool = False):
    """(tensor data for EM and SVI, description). Real data needs ``$PYRO_SEQLATENT_DATA``."""
    if data == "synthetic":
        return {"gmm": lambda: (_synthetic_gmm(), "synthetic 4-component 3-D mixture"),
                "ppca": lambda: (_synthetic_ppca(), "synthetic 12-D, q = 3 PPCA"),
                "lgssm": lambda: (_synthetic_lgssm(n=12 if small else 24, T=25 if small else 40),
                                  "synthetic 2-state, 6-D LG-SSM"),
                }[model]()
    if model in ("gmm", "ppca"):
        from pyro_seqlatent.data.fsdd import load_fsdd_splits

        splits = load_fsdd_splits(root, frame_size=16, max_per_split=8 if small else 30)
        frames = torch.cat([splits["train"][i] for i in range(len(splits["train"]))])
        return frames, f"FSDD speech, {len(frames)} frames of 16 samples"
    from pyro_seqlatent.data.jsb import load_jsb
    from pyro_seqlatent.data.sequences import pad_sequences

    seqs = load_jsb("train", root, max_sequences=6 if small else 16)
    max_len = 32 if small else 64
    x, mask = pad_sequences([seqs[i][:max_len] for i in range(len(seqs))])
    keys = x[mask].mean(0) > 0.02  # keys never (or almost never) played carry no information
    return ((x[..., keys], mask),
            f"JSB chorales, {len(seqs)} piano rolls (<= {max_len} frames, {int(keys.sum())} keys)")


# ---------------------------------------------------------------------------------- fitting
SETTINGS = {  # (EM kwargs, SVI twin size, SVI train kwargs)
    "gmm": {"K": 4},
    "ppca": {"q": 3},
    "lgssm": {"K": 4},
}


def _em(model: str, data, em_iters: int, seed: int):
    if model == "gmm":
        X = data.double()
        em = GaussianMixture(SETTINGS["gmm"]["K"], covariance_type="full", tol=0.0,
                             max_iter=em_iters, random_state=seed, reg_covar=1e-6).fit(X)
        return em, em.score(X)
    if model == "ppca":
        X = data.double()
        em = PPCA(SETTINGS["ppca"]["q"], tol=0.0, max_iter=em_iters, random_state=seed).fit(X)
        return em, em.score(X)
    x, mask = data
    em = LinearGaussianSSM(SETTINGS["lgssm"]["K"], tol=0.0, max_iter=em_iters,
                           random_state=seed, reg_covar=1e-4).fit(x.double(), mask)
    return em, em.score(x.double(), mask)


def _svi(model: str, data, svi_steps: int, seed: int, eval_every: int, device: str):
    import pyro
    from torch.utils.data import TensorDataset

    from pyro_seqlatent.infer import train
    from pyro_seqlatent.models import em_twins

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    if model == "gmm":
        X = data.float()
        gen = torch.Generator().manual_seed(seed)
        init = X[torch.randperm(len(X), generator=gen)[: SETTINGS["gmm"]["K"]]]
        net, guide = em_twins.GMMTwin(init, init_scale=float(X.std())), em_twins.EmptyGuide()
        dataset, exact = TensorDataset(X), (lambda: net.to_em().score(X.double()))
        kw = dict(elbo="TraceEnum_ELBO", elbo_kwargs={"max_plate_nesting": 1}, lr=0.05,
                  batch_size=512)
    elif model == "ppca":
        X = data.float()
        q = SETTINGS["ppca"]["q"]
        net, guide = em_twins.PPCATwin(X.shape[1], q, X.mean(0)), em_twins.PPCAGuide(
            X.shape[1], q)
        dataset, exact = TensorDataset(X), (lambda: net.to_em().score(X.double()))
        kw = dict(lr=0.02, batch_size=256)
    else:
        x, mask = data
        K = SETTINGS["lgssm"]["K"]
        net = em_twins.LGSSMTwin(x.shape[-1], K, x[mask].mean(0))
        guide = em_twins.LGSSMGuide(x.shape[-1], K)
        dataset = TensorDataset(x.float(), mask)
        kw = dict(lr=0.02, batch_size=8)

        def exact():
            return net.to_em().score(x.double(), mask)
    curve, spent = [], {"eval": 0.0}
    start = time.perf_counter()

    def record(rec, *_):
        step = int(rec.get("step", len(curve)))
        if step % eval_every and step != svi_steps:
            return
        t0 = time.perf_counter()
        curve.append((t0 - start - spent["eval"], exact(), step))
        spent["eval"] += time.perf_counter() - t0

    curve.append((0.0, exact(), 0))
    spent["eval"] = time.perf_counter() - start
    train(net, guide, dataset, num_steps=svi_steps, seed=seed, device=device, progress=False,
          callbacks=[record], **kw)
    return curve


def compare(model: str, data: str, *, em_iters: int = 100, svi_steps: int = 1000,
            eval_every: int = 25, seed: int = 0, root: Any = None, device: str = "cpu",
            small: bool = False) -> dict:
    """Fit ``model`` on ``data`` by EM and by SVI; return both log-likelihood-vs-time curves."""
    if model not in MODELS or data not in DATASETS:
        raise ValueError(f"model must be one of {MODELS} and data one of {DATASETS}, "
                         f"got {model!r}, {data!r}")
    values, description = load_case(model, data, root, small)
    em, em_final = _em(model, values, em_iters, seed)
    if model == "lgssm":  # one SVI step costs 2T sample sites: fewer steps for sequences
        svi_steps, eval_every = max(1, svi_steps // 4), max(1, eval_every // 4)
    curve = _svi(model, values, svi_steps, seed, eval_every, device)
    unit = "per sequence" if model == "lgssm" else "per data point"
    return {
        "model": model, "data": data, "description": description, "unit": unit,
        "em": {"final_loglik": em_final, "iterations": em.n_iter_,
               "wall_s": em.fit_times_[-1], "curve": list(zip(em.fit_times_,
                                                              em.log_likelihood_history_))},
        "svi": {"final_loglik": curve[-1][1], "steps": curve[-1][2], "wall_s": curve[-1][0],
                "curve": [(t, ll) for t, ll, _ in curve]},
    }


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, style in (("em", "o-"), ("svi", "-")):
        t, ll = zip(*result[name]["curve"])
        t = np.maximum(np.asarray(t), 1e-3)
        ax.plot(t, ll, style, ms=2, label=name.upper())
    best = max(result["em"]["final_loglik"], result["svi"]["final_loglik"])
    lows = [ll for _, ll in result["em"]["curve"] + result["svi"]["curve"]]
    ax.set_ylim(max(min(lows), best - 10 * max(1.0, abs(best) * 0.05)), best + 0.05 * abs(best)
                + 0.1)
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(f"exact log-likelihood {result['unit']}")
    ax.set_title(f"{result['model']}: {result['description']}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(results: list[dict]) -> str:
    lines = ["| model | data | EM log-lik | EM iters | EM s | SVI log-lik | SVI steps | SVI s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        e, s = r["em"], r["svi"]
        lines.append(f"| {r['model']} | {r['description']} ({r['unit']}) | "
                     f"{e['final_loglik']:.4f} | {e['iterations']} | {e['wall_s']:.2f} | "
                     f"{s['final_loglik']:.4f} | {s['steps']} | {s['wall_s']:.2f} |")
    return "\n".join(lines)


def run_all(out: Path, *, models=MODELS, datasets=DATASETS, root: Any = None,
            device: str = "cpu", small: bool = False, **kw) -> list[dict]:
    """Run every (model, dataset) pair, write ``results.json``, figures and ``table.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        for data in datasets:
            res = compare(model, data, root=root, device=device, small=small, **kw)
            res["figure"] = plot(res, out / f"{model}_{data}.png").name
            results.append(res)
            print(f"[em-vs-svi] {model}/{data}: EM {res['em']['final_loglik']:.4f} in "
                  f"{res['em']['wall_s']:.2f}s, SVI {res['svi']['final_loglik']:.4f} in "
                  f"{res['svi']['wall_s']:.2f}s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    return results


# ---------------------------------------------------------------------------------- CLI / demo
def _add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/em_vs_svi")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--em-iters", type=int, default=100)
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="fewer real recordings/chorales")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cpu")


def _run(args) -> int:
    results = run_all(Path(args.out), models=args.models, datasets=args.datasets,
                      root=args.data_root, device=args.device, small=args.small,
                      em_iters=args.em_iters, svi_steps=args.svi_steps,
                      eval_every=args.eval_every, seed=args.seed)
    print(table(results))
    return 0


def _demo_section(out_dir: Path, data_root: Any, device: str) -> str:
    from pyro_seqlatent.data.root import DataNotFoundError

    try:
        results = run_all(out_dir, root=data_root, device=device, small=True, em_iters=40,
                          svi_steps=200, eval_every=20)
    except DataNotFoundError:
        results = run_all(out_dir, datasets=("synthetic",), device=device, em_iters=40,
                          svi_steps=200, eval_every=20)
    figures = "\n".join(f"![{r['model']} {r['data']}]({r['figure']})" for r in results)
    return ("EM vs SVI on the same models and data (exact log-likelihood; SVI with the Pyro "
            "twins, short demo settings).\n\n" + table(results) + "\n\n" + figures + "\n")


register_command(CommandSpec(name="em-vs-svi", help="EM against SVI on GMM, PPCA, LG-SSM",
                             add_arguments=_add_arguments, run=_run))
register_demo_section("em-vs-svi", _demo_section)
