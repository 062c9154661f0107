"""Estimators on the binarized-MNIST VAE at a fixed checkpoint, and the CLI end to end."""

from __future__ import annotations

import sys
import textwrap

import torch

from conftest import require_data
from pyro_seqlatent.infer import train
from pyro_seqlatent.infer.estimators import gradient_stats, make_estimator
from pyro_seqlatent.models.vae import VAE, VAEGuide


def test_reparam_variance_is_10x_below_score_function_for_the_encoder(capsys):
    require_data("binarized_mnist/binarized_mnist_train.mat")
    from pyro_seqlatent.data.mnist import BinarizedMNIST

    data = BinarizedMNIST("train", limit=1100)
    model, guide = VAE(784, 10, (100,)), VAEGuide(784, 10, (100,))
    train(model, guide, torch.utils.data.Subset(data, range(1000)), num_steps=60,
          batch_size=50, lr=3e-3, progress=False)
    batch = torch.stack([data[i] for i in range(1000, 1100)])
    reparam = gradient_stats(model, guide, batch, make_estimator("reparam"), 40, seed=0)
    score = gradient_stats(model, guide, batch, make_estimator("score"), 40, seed=0)
    ratio = float(score.groups["guide"].var.mean() / reparam.groups["guide"].var.mean())
    with capsys.disabled():
        print(f"\n[estimators] MNIST VAE encoder variance ratio score/reparam = {ratio:.3g}")
    assert ratio >= 10.0
    # the decoder's gradient does not depend on how the guide site is scored
    model_ratio = score.groups["model"].var.mean() / reparam.groups["model"].var.mean()
    assert 0.5 < float(model_ratio) < 2.0


def test_compare_estimators_cli_on_a_user_pair(tmp_path, monkeypatch):
    """``--pair module:function`` on a user's own model, gradient stats and run mode."""
    (tmp_path / "my_pair.py").write_text(textwrap.dedent("""
        import torch
        from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal

        def make(n="64"):
            x = torch.randn(int(n)) * 1.2
            return NormalNormal(learn_noise=True), AffineNormalGuide(), x
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    from pyro_seqlatent.cli import main

    out = tmp_path / "report"
    code = main(["compare-estimators", "--pair", "my_pair:make", "--option", "n=64",
                 "--estimators", "reparam,score,stl,dreg", "--num-draws", "20",
                 "--batch-size", "32", "--pretrain-steps", "0", "--train-steps", "20",
                 "--eval-every", "10", "--lr", "0.05", "--out", str(out)])
    assert code == 0
    text = (out / "estimators.md").read_text()
    for name in ("reparam", "score", "stl", "dreg"):
        assert f"| {name} | guide |" in text
    assert (out / "variance_snr.png").stat().st_size > 0
    assert (out / "elbo_curves.png").stat().st_size > 0
