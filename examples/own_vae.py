"""Your own VAE-shaped model (one latent per data point) with ``AutoAmortized``: the autoguide
finds the latent site inside the data plate and builds its amortized guide (here conditional
IAFs, a FlowGuide) on the context of an encoder you give; no guide written by hand.

    PYRO_SEQLATENT_DATA=../shared/data python examples/own_vae.py \\
        --out docs/figures/own_vae.png                 # binarized MNIST, ~3 min on 4 CPU threads
    python examples/own_vae.py --quick                 # the test's run (500 images, 5 steps)

Trained by ``pyro_seqlatent.infer.train``; the test ELBO and the importance-sampled log p(x)
come from ``pyro_seqlatent.infer.log_marginal`` (per image: the latents are plate-local).
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_seqlatent.data.mnist import BinarizedMNIST
from pyro_seqlatent.guides import AutoAmortized
from pyro_seqlatent.infer import log_marginal, train
from pyro_seqlatent.nn import MLP


class VAE(nn.Module):
    """p(z) = N(0, I), p(x | z) = Bernoulli(decoder(z)): the model only, no guide."""

    def __init__(self, z_dim=16, hidden=256):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = MLP(z_dim, (hidden,), 784)

    def forward(self, x):
        with pyro.plate("data", x.shape[-2], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            return pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--flow", default="iaf", help="a flow name, or 'none' (mean-field)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test's run)")
    parser.add_argument("--out", default=None, help="figure: data, reconstructions, samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    train_set = BinarizedMNIST("train", limit=500 if args.quick else None)
    # a fixed random subset: the test set comes sorted by digit (its first 1000 are zeros)
    images = BinarizedMNIST("test").images
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    test = images[picked[:64 if args.quick else 1000].sort().values]
    model = VAE()
    encoder = MLP(784, (256,), 128)  # context of every image's q(z | x)
    guide = AutoAmortized(model, encoder, flow=None if args.flow == "none" else args.flow,
                          num_flows=2, hidden_dims=(128,))
    result = train(model, guide, train_set, lr=1e-3, batch_size=100,
                   num_steps=5 if args.quick else args.steps, progress=False)
    est = log_marginal(model, guide, test, num_samples=10 if args.quick else 500,
                       chunk_size=10 if args.quick else 50)
    out = {"steps": result.step, "test_elbo": float(est.elbo.mean()),
           "test_log_px": float(est.log_marginal.mean()), "kind": est.kind}
    print(f"trained {result.step} steps; test ELBO {out['test_elbo']:.2f} nats, "
          f"log p(x) {out['test_log_px']:.2f} nats per image ({len(test)} test images)")
    if args.out:
        figure(model, guide, test[torch.linspace(0, len(test) - 1, 10).long()], args.out)
        print(f"wrote {args.out}")
    return out


@torch.no_grad()
def figure(model, guide, x, path):
    """Rows: test images, their reconstructions (decoder mean at z ~ q(z | x)), and draws of
    the decoder mean at z ~ p(z)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    z = guide(x)["z"]
    rows = [x, model.decoder(z).sigmoid(),
            model.decoder(torch.randn(len(x), model.z_dim)).sigmoid()]
    fig, axes = plt.subplots(3, len(x), figsize=(len(x) * 0.8, 2.6))
    for r, (row, title) in enumerate(zip(rows, ["data", "reconstruction", "sample"])):
        for c in range(len(x)):
            axes[r, c].imshow(row[c].reshape(28, 28), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
