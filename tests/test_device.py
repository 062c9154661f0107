"""Every registered model, its guides and the EM models keep their tensors on the device of
their inputs and parameters, so that ``--device cuda`` cannot meet a tensor left on the CPU.

No GPU is needed: while model and guide run on CPU inputs, every tensor *constructor* called
without ``device=`` (``torch.zeros(n)``, ``torch.tensor(...)``, ``torch.arange``) makes a
``meta`` tensor. Such a tensor (or a buffer not registered on the module) then meets a CPU tensor
in the first operation that raises, exactly where a CUDA run would mix devices. Conversions of
an existing tensor (``torch.as_tensor(t)``) keep its device, as they do outside the test."""

import pyro
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from pyro_seqlatent.data.irregular import apply_task, union_grid_collate
from pyro_seqlatent.data.periodic import make_periodic
from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.infer import DeviceTrace_ELBO
from pyro_seqlatent.registry import get_model


def _sequences(binary):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.rand(n, 6, generator=g) for n in (5, 3, 4)]
    return pad_collate([s.round() for s in seqs] if binary else seqs)


def _irregular():
    items = apply_task(make_periodic(3, 10, seed=0), "interp", fraction=0.5, seed=0)
    return union_grid_collate(items)


SMALL_ODE = {"latent_dim": 3, "hidden_dim": 6, "ode_units": 8, "method": "rk4"}
CASES = {
    "vae-meanfield": ("vae", {"latent_dim": 3, "hidden_dims": "8"}, lambda: (torch.zeros(4, 784),)),
    **{f"vae-{g}": ("vae", {"latent_dim": 4, "hidden_dims": "8", "guide": g, "num_flows": 2},
                    lambda: (torch.ones(4, 784),))
       for g in ("planar", "radial", "iaf", "nice", "real_nvp")},
    "flow_density": ("flow_density", {"hidden": 8, "num_couplings": 2},
                     lambda: (torch.rand(4, 64),)),
    **{f"vrnn-{e}": ("vrnn", {"x_dim": 6, "emission": e, "z_dim": 2, "h_dim": 8,
                              "feature_dim": 8, "hidden_dim": 8},
                     lambda e=e: _sequences(e == "bernoulli"))
       for e in ("bernoulli", "gaussian", "gmm")},
    "vrnn-iaf": ("vrnn", {"x_dim": 6, "guide": "iaf", "z_dim": 2, "h_dim": 8, "feature_dim": 8,
                          "hidden_dim": 8}, lambda: _sequences(True)),
    **{f"rnn-{e}": ("rnn", {"x_dim": 6, "emission": e, "h_dim": 8, "feature_dim": 8,
                            "hidden_dim": 8}, lambda e=e: _sequences(e == "bernoulli"))
       for e in ("bernoulli", "gmm")},
    "latent_ode": ("latent_ode", SMALL_ODE, _irregular),
    "latent_ode-poisson-iaf": ("latent_ode", {**SMALL_ODE, "poisson": True, "guide": "iaf"},
                               _irregular),
    "ode_rnn": ("ode_rnn", {"hidden_dim": 6, "ode_units": 8}, _irregular),
    "rnn_dt": ("rnn_dt", {"hidden_dim": 6}, _irregular),
}


class NewTensorsOnMeta(TorchFunctionMode):
    """Constructors without ``device=`` make ``meta`` tensors (``torch.device("meta")`` as a
    context would also move ``torch.as_tensor(cpu_tensor)``, which Pyro calls on our values)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _device_constructors() and kwargs.get("device") is None
                and not (args and isinstance(args[0], torch.Tensor))):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_and_guide_make_no_tensor_on_the_default_device(case):
    name, options, make_batch = CASES[case]
    if name == "vrnn":
        from pyro_seqlatent.models.vrnn import build_vrnn
        model, guide = build_vrnn(**options)
    elif name == "rnn":
        from pyro_seqlatent.models.rnn_baselines import build_rnn
        model, guide = build_rnn(**options)
    else:
        spec = get_model(name)
        model, guide = spec.build(spec.options(**options))
    batch = make_batch()
    args, kwargs = ((), batch) if isinstance(batch, dict) else (batch, {})
    # Pyro's own argument validation builds helper tensors on the default device (pyro.factor's
    # Unit distribution does): not ours to test, so it is off here
    with NewTensorsOnMeta(), pyro.validation_enabled(False):
        loss = DeviceTrace_ELBO().differentiable_loss(model, guide, *args, **kwargs)
    loss.backward()
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    grads = [p.grad for p in list(model.parameters()) + list(guide.parameters())]
    assert all(g is None or g.device.type == "cpu" for g in grads)


def test_em_models_make_no_tensor_on_the_default_device():
    from pyro_seqlatent.em import PPCA, GaussianMixture, LinearGaussianSSM

    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g) + 4])
    y = torch.randn(2, 12, 3, generator=g)
    with NewTensorsOnMeta():
        gmm = GaussianMixture(2, max_iter=5, random_state=0).fit(X)
        ppca = PPCA(2, max_iter=5, random_state=0).fit(X)
        ssm = LinearGaussianSSM(2, max_iter=3).fit(y)
    for model in (gmm, ppca, ssm):
        tensors = [v for v in vars(model).values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.device.type == "cpu" for t in tensors), type(model).__name__
    assert pyro.get_param_store().keys() == set()
