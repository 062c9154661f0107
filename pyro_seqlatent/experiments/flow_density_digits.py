"""NICE and RealNVP densities on scikit-learn's 8×8 digits, trained by maximum likelihood:
``python -m pyro_seqlatent.experiments.flow_density_digits [--epochs 40]``.

The models, the dequantized data and bits/dim are those of :mod:`pyro_seqlatent.models.flow_density`
(registered as ``flow_density``); this driver trains each flow through
:func:`pyro_seqlatent.infer.train` and prints train and test bits/dim as a Markdown table
(``docs/flows.md``).
"""

from __future__ import annotations

import argparse
import sys
import time

from pyro_seqlatent.infer import train
from pyro_seqlatent.models.flow_density import (
    DIGITS_LEVELS,
    bits_per_dim,
    build,
    digits_datasets,
)


def main(argv=None) -> None:
    """Train NICE and RealNVP on 8×8 digits through :func:`pyro_seqlatent.infer.train` and
    print test bits/dim as a Markdown table."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--flows", default="nice,real_nvp")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--num-couplings", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    data = digits_datasets({"dataset": "digits"})
    rows = []
    for kind in args.flows.split(","):
        prior = "logistic" if kind == "nice" else "normal"
        model, guide = build({"flow": kind, "num_couplings": args.num_couplings,
                              "hidden": args.hidden, "prior": prior})
        t0 = time.time()
        result = train(model, guide, data["train"], num_epochs=args.epochs, batch_size=64,
                       lr=args.lr, clip_norm=100.0, progress=False, seed=0)
        bpd = {s: bits_per_dim(model, data[s], DIGITS_LEVELS) for s in ("train", "test")}
        rows.append((kind, prior, bpd["train"], bpd["test"], time.time() - t0, result.step))
    command = "python -m pyro_seqlatent.experiments.flow_density_digits " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"8x8 digits (17 levels, 1257 train / 270 test), `{command.strip()}`\n")
    print("| flow | prior | train bits/dim | test bits/dim | seconds | steps |")
    print("|---|---|---|---|---|---|")
    for kind, prior, tr, te, sec, steps in rows:
        print(f"| {kind} | {prior} | {tr:.3f} | {te:.3f} | {sec:.0f} | {steps} |")


if __name__ == "__main__":
    main()
