"""``train`` takes plain model and guide functions, as ``pyro.infer.SVI`` does: parameters
through ``pyro.param`` / ``pyro.module``, trained, checkpointed and resumed as param-store
entries."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.utils.data import TensorDataset

from pyro_seqlatent.infer import train

ENCODER = nn.Linear(1, 2)


def model(x):
    noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, noise), obs=x)


def guide(x):
    net = pyro.module("encoder", ENCODER)
    loc, log_scale = net(x.unsqueeze(-1)).unbind(-1)
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(loc, log_scale.exp()))


def data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, generator=g)
    return z + 0.5 * torch.randn(64, generator=g)


def fresh():
    pyro.clear_param_store()
    torch.manual_seed(1)
    ENCODER.reset_parameters()


def test_plain_functions_train_like_svi():
    """The same steps as ``SVI`` with Adam (run first: a second SVI run of the same module in
    one process does not reproduce the first one, Pyro's own state)."""
    x = data()
    fresh()
    pyro.set_rng_seed(3)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(x) / len(x) for _ in range(30)]
    theirs = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    fresh()
    result = train(model, guide, TensorDataset(x), num_steps=30, batch_size=64, lr=0.02,
                   shuffle=False, seed=3, progress=False)
    ours = dict(pyro.get_param_store().named_parameters())
    assert set(ours) == set(theirs) == {"noise", "encoder$$$weight", "encoder$$$bias"}
    assert [r["loss"] for r in result.history] == pytest.approx(losses, rel=1e-5)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name


def test_plain_functions_resume_exactly(tmp_path):
    x = TensorDataset(data())
    kw = dict(batch_size=16, lr=0.02, seed=2, checkpoint_every=3, progress=False)
    fresh()
    full = train(model, guide, x, num_steps=10, run_dir=tmp_path / "full", **kw)

    def stop(record, *_):
        if record["step"] == 7:
            raise KeyboardInterrupt

    fresh()
    with pytest.raises(KeyboardInterrupt):
        train(model, guide, x, num_steps=10, run_dir=tmp_path / "cut", callbacks=[stop], **kw)
    fresh()  # a new process: the parameters come back from the checkpoint (step 6)
    resumed = train(model, guide, x, num_steps=10, run_dir=tmp_path / "cut", resume=True, **kw)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_a_model_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="model must be a Pyro model"):
        train("model", guide, TensorDataset(data()), num_steps=1, progress=False)
