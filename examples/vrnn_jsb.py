"""Train a VRNN on JSB Chorales piano rolls, report the test ELBO / NLL per step, and sample.

    PYRO_SEQLATENT_DATA=../shared/data python examples/vrnn_jsb.py --minutes 2
"""

import argparse

import pyro
import torch

from pyro_seqlatent.data.jsb import load_jsb_splits
from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.infer import evaluate, train
from pyro_seqlatent.models.vrnn import build_vrnn, forecast


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--guide", default="meanfield", choices=["meanfield", "iaf"])
    args = parser.parse_args()
    pyro.enable_validation(False)  # faster; the model checks its inputs itself
    pyro.set_rng_seed(0)
    data = load_jsb_splits()
    model, guide = build_vrnn(88, z_dim=32, h_dim=128, feature_dim=128, hidden_dim=128,
                              emission="bernoulli", guide=args.guide)
    result = train(model, guide, data["train"], valid_data=data["valid"], collate_fn=pad_collate,
                   num_steps=10**6, max_time_s=60 * args.minutes, batch_size=20, lr=1e-3,
                   clip_norm=10.0, valid_every=100)
    print(f"trained {result.step} steps in {result.wall_time_s:.0f} s")
    test = data["test"]
    est = evaluate(model, guide, test, num_samples=args.num_samples, batch_size=8,
                   collate_fn=pad_collate)
    steps = test.num_steps()
    print(f"test: -ELBO/step {-est['elbo'] * len(test) / steps:.3f}  "
          f"NLL/step (K={args.num_samples}) {-est['log_marginal'] * len(test) / steps:.3f}")
    with torch.no_grad():
        prefix = pad_collate([test[0][:16]])["x"]
        continuation = forecast(model, guide, prefix, horizon=16, num_samples=3)
        print("forecast notes per frame:", continuation.sum(-1)[:, 0].int().tolist())
        sample = model(length=32, num_sequences=1)[0]
        print("sampled chorale, notes per frame:", sample.sum(-1).int().tolist())


if __name__ == "__main__":
    main()
