"""Benchmark of the ELBO gradient estimators (issue 5): variance, SNR and ELBO vs wall time.

Runs ``pyro-seqlatent compare-estimators`` on the binarized-MNIST VAE, on the sigmoid belief
network (discrete latents), on the VRNN (JSB) and on the Latent ODE (a sequence model with a
continuous latent), and writes under ``benchmarks/results/estimators/``:

* ``<system>/estimators.md``: estimator × parameter group → mean variance, ratio to the
  reparameterized estimator, median/mean SNR, ms per draw; then steps and seconds to reach a
  given ELBO when training with each estimator;
* ``<system>/variance_snr.png``, ``<system>/elbo_curves.png``, ``<system>/gradient_stats.json``.

Usage (data under ``$PYRO_SEQLATENT_DATA``)::

    python benchmarks/estimators.py                 # every system (vae, sbn, vrnn, latent_ode)
    python benchmarks/estimators.py --only vae --quick

Timings are wall-clock on the machine that runs it: compare them only within one run.
The tables and figures are built from the measurements of the run itself (no run folders are
written), so rebuilding them means running it again.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from pyro_seqlatent.experiments.compare_estimators import run_comparison
from pyro_seqlatent.infer.estimators import ESTIMATORS

OUT = Path(__file__).resolve().parent / "results" / "estimators"

SYSTEMS = {
    "vae": dict(model="vae", option=["train_limit=10000", "valid_limit=1000"], batch_size=100,
                pretrain_steps=500, num_draws=100, train_steps=500, eval_every=50, lr=1e-3),
    "latent_ode": dict(model="latent_ode", option=["dataset=periodic", "n_series=300",
                                                   "latent_dim=6", "hidden_dim=20",
                                                   "ode_units=32"],
                       batch_size=30, pretrain_steps=50, num_draws=20, train_steps=50,
                       eval_every=10, lr=1e-2,
                       estimators="reparam,analytic_kl,score,stl,iwae,dreg"),
    "vrnn": dict(model="vrnn", option=["dataset=jsb", "z_dim=8", "h_dim=32", "feature_dim=32",
                                       "hidden_dim=32"],
                 batch_size=20, pretrain_steps=60, num_draws=30, train_steps=60, eval_every=20,
                 lr=3e-3, estimators="reparam,analytic_kl,score,stl,iwae,dreg"),
}
# The discrete-latent system: every estimator is tried; those that need reparameterizable
# sites (and enum, 2^200 configurations) are listed as not run, with the reason.
SYSTEMS["sbn"] = dict(model="sbn", option=["train_limit=10000", "valid_limit=1000"],
                      batch_size=50, pretrain_steps=500, num_draws=100, train_steps=500,
                      eval_every=50, lr=1e-3)
QUICK = dict(pretrain_steps=100, num_draws=30, train_steps=100, eval_every=25)


def _args(settings: dict, out: Path, device: str, estimators: str | None) -> argparse.Namespace:
    settings = dict(settings)
    chosen = estimators or settings.pop("estimators", ",".join(ESTIMATORS))
    settings.pop("estimators", None)
    return argparse.Namespace(
        pair=None, estimators=chosen, num_particles=5, run_dir=None, target_elbo=None,
        out=str(out), data_root=None, device=device, seed=0, **settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SYSTEMS), action="append")
    parser.add_argument("--quick", action="store_true", help="fewer steps and draws")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--estimators", default=None,
                        help="comma-separated subset (default: all; the Latent ODE, whose "
                        "ODE solves are slow on CPU, skips the baseline estimators)")
    args = parser.parse_args(argv)
    status = 0
    for name in args.only or sorted(SYSTEMS):
        settings = {**SYSTEMS[name], **(QUICK if args.quick else {})}
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            path = run_comparison(_args(settings, OUT / name, args.device, args.estimators))
            print(path.read_text())
        except Exception:  # report and go on with the next system
            traceback.print_exc()
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
