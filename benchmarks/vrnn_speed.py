r"""SVI step time of the Pyro VRNN against a plain-PyTorch VRNN of the same networks.

Both compute the same single-sample ELBO estimate

.. math:: \hat{\mathcal L} = \sum_{b,t} m_{bt}\bigl[\log p(z_t\mid h_{t-1})
          - \log q(z_t\mid\varphi^x(x_t), h_{t-1}) + \log p(x_t\mid z_t, h_{t-1})\bigr],
          \quad z_t = \mu_q + \sigma_q\,\epsilon_t,

(the Monte Carlo KL that ``Trace_ELBO`` uses) with the same modules; one step is
``zero_grad → loss → backward → Adam step``. The plain reference (``_twins.plain_vrnn_loss``,
shared with ``overhead.py``) is written as well as the Pyro one (only the recurrence in the time
loop; φ_x of all steps, log q, the prior and the decoder batched outside it), so the ratio
measures what Pyro costs, not a difference in structure. Before timing, the script checks that
both losses agree: exactly for the same noise (same RNG draws), and in mean over many seeds.

Timing: paired interleaved rounds (each round runs every variant once, the order reversed every
other round); each variant's ratio to plain is taken within a round, and the JSON gives the
median and min–max over the rounds of the ratios and of the ms per step, in wall time and in the
process's CPU time (``_twins.paired_rounds``).

    python benchmarks/vrnn_speed.py            # T=100, batch 64, h=64, z=16, x=88, GRU
    python benchmarks/vrnn_speed.py --rounds 7 --steps 6 --jit \
        --json benchmarks/results/vrnn_speed.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads; --threads sets it too

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import _twins  # noqa: E402  (benchmarks/_twins.py: this script's folder is on sys.path)
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import JitTrace_ELBO, Trace_ELBO  # noqa: E402

from pyro_seqlatent.infer import DeviceTrace_ELBO  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--h", type=int, default=64)
    parser.add_argument("--z", type=int, default=16)
    parser.add_argument("--x", type=int, default=88)
    parser.add_argument("--rnn", default="gru")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jit", action="store_true", help="also time JitTrace_ELBO")
    parser.add_argument("--validate", action=argparse.BooleanOptionalAction, default=False,
                        help="Pyro/torch distribution validation (off when training for speed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    _twins.fix_threads(args.threads)
    pyro.enable_validation(args.validate)
    model, guide, x, mask = _twins.make_vrnn_problem(args.T, args.batch, args.h, args.z, args.x,
                                                     args.rnn)
    params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
    elbo = Trace_ELBO(max_plate_nesting=1)
    agreement = _twins.agreement(lambda: _twins.plain_vrnn_loss(model, guide, x, mask),
                                 lambda: elbo.differentiable_loss(model, guide, x, mask),
                                 num_seeds=50)
    device_elbo = DeviceTrace_ELBO(max_plate_nesting=1)

    def pyro_step():
        return elbo.differentiable_loss(model, guide, x, mask)

    def device_step():  # the same estimator without Pyro's per-site .item()
        return device_elbo.differentiable_loss(model, guide, x, mask)

    def plain_step():
        return _twins.plain_vrnn_loss(model, guide, x, mask)

    def naive_step():
        model.core.reuse_guide_states = False
        try:
            return elbo.differentiable_loss(model, guide, x, mask)
        finally:
            model.core.reuse_guide_states = True

    steps = {"plain": plain_step, "pyro": pyro_step, "pyro_device_elbo": device_step,
             "pyro_naive": naive_step}
    if args.jit:
        jit = JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)

        def jit_step():  # the jit trace takes parameters from Pyro's param store
            model.register_params = guide.register_params = True
            try:
                return jit.differentiable_loss(model, guide, x, mask)
            finally:
                model.register_params = guide.register_params = False

        for _ in range(3):  # compiled, and optimized by TorchScript's profiling runs, here
            jit_step().backward()
        steps["pyro_jit"] = jit_step
    variants = {name: (lambda fn=fn: _twins.timed_steps(fn, params, args.steps, args.warmup))
                for name, fn in steps.items()}
    timing = _twins.paired_rounds(variants, args.rounds, reference="plain")
    result = {
        "command": "python benchmarks/vrnn_speed.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "torch": torch.__version__, "pyro": pyro.__version__,
        **timing,
        "agreement": agreement,
    }
    for clock in ("wall", "cpu"):
        ms, ratio = timing[clock]["ms_per_step"], timing[clock]["ratio"]
        for name in variants:
            print(f"{clock:4s} {name:17s} {_twins.ms_text(ms[name])} ms/step"
                  + (f"  {_twins.ratio_text(ratio[name])}" if name in ratio else ""))
    print("agreement:", json.dumps(agreement))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
