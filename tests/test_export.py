"""The portable weights export is read by safetensors alone and gives back the trained
parameters (the average when the run averaged them)."""

import pyro
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from pyro_seqlatent.infer import train
from pyro_seqlatent.infer.export import export_weights, load_weights
from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal


def test_exported_weights_are_the_trained_ones_and_load_back(tmp_path):
    pyro.clear_param_store()
    model, guide = NormalNormal(learn_noise=True), AffineNormalGuide()
    data = TensorDataset(torch.randn(40))
    train(model, guide, data, num_steps=12, batch_size=8, lr=0.05, ema_decay=0.5,
          checkpoint_every=4, progress=False, run_dir=tmp_path)
    path = export_weights(tmp_path / "checkpoint.pt")
    assert path == tmp_path / "weights.safetensors"
    tensors = load_file(str(path))  # no pyro_seqlatent involved
    assert set(tensors) == {"model.log_noise", "guide.a", "guide.b", "guide.log_scale"}
    # train() handed back the averaged weights, which the export holds too
    assert torch.equal(tensors["guide.a"], guide.a.detach())
    assert torch.equal(tensors["model.log_noise"], model.log_noise.detach())
    raw = export_weights(tmp_path / "checkpoint.pt", tmp_path / "raw.safetensors",
                         averaged=False)
    assert not torch.equal(load_file(str(raw))["guide.a"], guide.a.detach())
    fresh_model, fresh_guide = NormalNormal(learn_noise=True), AffineNormalGuide()
    meta = load_weights(path, fresh_model, fresh_guide)
    assert meta["step"] == "12"
    assert torch.equal(fresh_guide.b, guide.b) and torch.equal(fresh_model.log_noise,
                                                                model.log_noise)
