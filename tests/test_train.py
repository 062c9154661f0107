"""The training core: convergence to the exact posterior, exact resume, NaN guard, clipping,
KL annealing, early stopping, every ELBO family."""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pyro_seqlatent.infer import ScaleLatents, TrainingDiverged, load_run, train
from pyro_seqlatent.infer.checkpoint import load_checkpoint, set_rng_state
from pyro_seqlatent.infer.train import TrainConfig
from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal


def conjugate_data(n=400, noise=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    return z + noise * torch.randn(n, generator=g)


class TensorData(torch.utils.data.Dataset):
    """Dataset whose items collate to a plain tensor batch (model(batch))."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.mark.parametrize(
    "elbo, extra",
    [
        ("Trace_ELBO", {}),
        ("TraceMeanField_ELBO", {}),
        ("TraceGraph_ELBO", {}),  # no differentiable_loss: loss_and_grads path
        ("RenyiELBO", {"alpha": 0.0, "num_particles": 2}),  # IWAE bound, loss_and_grads
    ],
)
def test_converges_to_analytic_posterior(elbo, extra):
    model = NormalNormal(noise=0.5)
    guide = AffineNormalGuide()
    x = conjugate_data()
    result = train(model, guide, TensorData(x), elbo=elbo, elbo_kwargs=extra, num_steps=600,
                   batch_size=100, lr=0.06, lr_schedule="cosine", progress=False)
    assert result.step == 600 and result.stopped == "completed"
    a_true = 1.0 / 1.25
    s_true = (0.25 / 1.25) ** 0.5
    assert abs(guide.a.item() - a_true) < 0.05
    assert abs(guide.b.item()) < 0.05
    assert abs(guide.log_scale.exp().item() - s_true) < 0.05
    # the loss reported is per data point and approaches -E log p(x)
    exact = -model.exact_log_marginal(x).mean().item()
    late = sum(r["loss"] for r in result.history[-100:]) / 100
    assert abs(late - exact) < 0.1


def _run(tmp_path, name, num_steps, interrupt_at=None, resume=False, **extra):
    pyro.clear_param_store()
    model = NormalNormal(noise=0.5, learn_noise=True)
    guide = AffineNormalGuide()
    x = conjugate_data(n=50)

    def stop(record, model, guide):
        if interrupt_at is not None and record["step"] == interrupt_at:
            raise KeyboardInterrupt

    kwargs = dict(
        num_steps=num_steps, batch_size=8, lr=0.05, seed=7, checkpoint_every=5,
        valid_every=4, kl_anneal_steps=10, kl_anneal_start=0.1, clip_norm=5.0,
        lr_schedule="cosine", progress=False, **extra,
    )
    return train(model, guide, TensorData(x), valid_data=TensorData(x[:20]),
                 run_dir=tmp_path / name, resume=resume, callbacks=[stop], **kwargs), guide


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.8}])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, extra):
    full, full_guide = _run(tmp_path, "full", 23, **extra)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", 23, interrupt_at=13, **extra)  # last checkpoint: step 10
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]["step"] == 10
    resumed, resumed_guide = _run(tmp_path, "cut", 23, resume=True, **extra)
    losses_full = [r["loss"] for r in full.history]
    losses_resumed = [r["loss"] for r in resumed.history]
    assert len(losses_full) == len(losses_resumed) == 23
    assert losses_full == losses_resumed  # bit-for-bit
    assert [r.get("valid_loss") for r in full.history] == [
        r.get("valid_loss") for r in resumed.history
    ]
    for p, q in zip(full_guide.parameters(), resumed_guide.parameters()):
        assert torch.equal(p, q)
    rows = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 24))


class ExplodingModel(NormalNormal):
    """From its 8th call on, its log-density is NaN (through a factor, or through a NaN
    distribution parameter that Pyro's validation reports)."""

    def __init__(self, via):
        super().__init__(learn_noise=True)
        self.calls = 0
        self.via = via

    def forward(self, x):
        self.calls += 1
        bad = self.calls >= 8
        noise = self.noise * float("nan") if bad and self.via == "parameter" else self.noise
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, noise), obs=x)
            if bad and self.via == "factor":
                pyro.factor("boom", torch.full_like(x, float("nan")))


@pytest.mark.parametrize("via, what", [("factor", "the loss"),
                                       ("parameter", "a distribution parameter")])
def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path, via, what):
    model, guide = ExplodingModel(via), AffineNormalGuide()
    x = conjugate_data(n=64)
    # the first model call is the trainer's parameter probe; step k is call k + 1
    with pytest.raises(TrainingDiverged, match=rf"step 7: {what} .*step 5\)") as info, \
            pyro.validation_enabled(via == "parameter"):
        train(model, guide, TensorData(x), num_steps=20, batch_size=16, checkpoint_every=5,
              run_dir=tmp_path, progress=False)
    assert info.value.step == 7 and info.value.checkpoint_step == 5
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["state"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["guide"].values())
    run = load_run(tmp_path, which="last", model=NormalNormal(learn_noise=True),
                   guide=AffineNormalGuide())
    assert torch.equal(run.guide.a.detach(), ckpt["guide"]["a"])


def test_nan_gradient_is_caught_before_the_step(tmp_path):
    model, guide = NormalNormal(), AffineNormalGuide()
    x = conjugate_data(n=64)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    guide.b.register_hook(poison)
    with pytest.raises(TrainingDiverged, match="step 3: the gradient norm"):
        train(model, guide, TensorData(x), num_steps=10, batch_size=16, progress=False)
    assert torch.isfinite(guide.b).all()  # the poisoned step was never applied


def test_gradient_clipping_happens_before_the_step():
    x = conjugate_data(n=32) + 30.0  # far from the prior: a huge gradient
    for clip, bound in ((0.1, 0.1 + 1e-6), (None, None)):
        guide = AffineNormalGuide()
        before = torch.cat([p.detach().clone().reshape(-1) for p in guide.parameters()])
        train(NormalNormal(), guide, TensorData(x), num_steps=1, batch_size=32,
              optimizer="sgd", lr=1.0, clip_norm=clip, progress=False)
        after = torch.cat([p.detach().reshape(-1) for p in guide.parameters()])
        moved = (after - before).norm().item()
        if bound is not None:
            assert moved <= bound
        else:
            assert moved > 10.0


def test_kl_annealing_scales_only_latent_terms():
    model, guide = NormalNormal(), AffineNormalGuide(a=0.2, b=0.1)
    x = conjugate_data(n=10)
    elbo = pyro.infer.Trace_ELBO()

    def loss(beta):
        pyro.set_rng_seed(3)
        return elbo.differentiable_loss(ScaleLatents(beta)(model), ScaleLatents(beta)(guide), x)

    l0, lh, l1 = loss(0.0), loss(0.5), loss(1.0)
    assert torch.allclose(lh, 0.5 * (l0 + l1), atol=1e-5)
    pyro.set_rng_seed(3)
    z = dist.Normal(guide.a * x + guide.b, guide.log_scale.exp()).sample()
    expected_l0 = -dist.Normal(z, model.noise).log_prob(x).sum()
    assert torch.allclose(l0, expected_l0, atol=1e-5)


def test_early_stopping_and_best_checkpoint(tmp_path):
    x = conjugate_data(n=40)
    result = train(NormalNormal(), AffineNormalGuide(), TensorData(x), valid_data=TensorData(x),
                   num_steps=200, batch_size=10, lr=1e-12, valid_every=2,
                   early_stopping_patience=3, run_dir=tmp_path, progress=False)
    assert result.stopped == "early_stopping"
    assert result.step == 8  # best at step 2, then three validations without improvement
    assert (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "best.pt")["state"]["step"] == 2


def test_the_last_step_is_validated_and_can_be_the_best_checkpoint(tmp_path):
    x = conjugate_data(n=40)
    result = train(NormalNormal(), AffineNormalGuide(), TensorData(x), valid_data=TensorData(x),
                   num_steps=23, batch_size=10, lr=0.01, valid_every=10, run_dir=tmp_path,
                   progress=False)
    validated = [r["step"] for r in result.history if "valid_loss" in r]
    assert validated == [10, 20, 23]
    # still learning at a useful rate: the last state is the best one, and it is kept
    assert load_checkpoint(tmp_path / "best.pt")["state"]["step"] == 23


def test_tuple_and_dict_batches_and_bad_options():
    x = conjugate_data(n=20)

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = NormalNormal()

        def forward(self, x, weight=None):
            return self.inner(x)

    class DictGuide(AffineNormalGuide):
        def forward(self, x, weight=None):
            return super().forward(x)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {"x": x[i], "weight": torch.tensor(1.0)}

    result = train(DictModel(), DictGuide(), Dicts(), num_steps=3, batch_size=5, progress=False)
    assert len(result.history) == 3
    result = train(NormalNormal(), AffineNormalGuide(), TensorDataset(x), num_steps=2,
                   batch_size=5, progress=False)
    assert len(result.history) == 2
    with pytest.raises(TypeError, match="unknown option"):
        train(NormalNormal(), AffineNormalGuide(), TensorDataset(x), num_steps=1, learning=1)
    with pytest.raises(ValueError, match="num_steps or num_epochs"):
        train(NormalNormal(), AffineNormalGuide(), TensorDataset(x))
    # plain functions are models too (tests/test_train_functions.py); other objects are not
    with pytest.raises(TypeError, match="model must be a Pyro model"):
        train(object(), AffineNormalGuide(), TensorDataset(x), num_steps=1)


@pytest.mark.filterwarnings("ignore")
def test_jit_elbo_trains_module_parameters_and_refuses_annealing():
    x = conjugate_data(n=64)
    guide = AffineNormalGuide()
    train(NormalNormal(), guide, TensorData(x), elbo="JitTrace_ELBO", num_steps=60,
          batch_size=64, lr=0.05, progress=False)
    assert guide.a.item() > 0.4  # moved from 0 towards the exact 0.8: gradients reached it
    assert not [k for k in pyro.get_param_store().keys() if k.startswith("_seqlatent")]
    with pytest.raises(ValueError, match="kl_anneal_steps"):
        train(NormalNormal(), AffineNormalGuide(), TensorData(x), elbo="JitTrace_ELBO",
              num_steps=2, kl_anneal_steps=5, progress=False)


def test_inf_parameters_after_a_step_are_never_checkpointed(tmp_path):
    x = conjugate_data(n=16)
    with pytest.raises(TrainingDiverged, match="step 1: a parameter after the optimizer step"):
        train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=3, batch_size=16,
              optimizer="sgd", lr=1e38, checkpoint_every=1, run_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_kl_annealing_inside_train_scales_the_first_step():
    x = conjugate_data(n=16)
    model, guide = NormalNormal(), AffineNormalGuide(a=0.3)
    result = train(model, guide, TensorData(x), num_steps=1, batch_size=16, shuffle=False,
                   kl_anneal_steps=4, kl_anneal_start=0.2, lr=1e-12, seed=5, progress=False)
    beta = 0.2 + 0.8 * 1 / 4
    assert result.history[0]["kl_scale"] == pytest.approx(beta)
    pyro.set_rng_seed(5)
    expected = pyro.infer.Trace_ELBO().differentiable_loss(
        ScaleLatents(beta)(NormalNormal()), ScaleLatents(beta)(AffineNormalGuide(a=0.3)), x)
    assert result.history[0]["loss"] == pytest.approx(expected.item() / 16, rel=1e-5)


@pytest.mark.parametrize("kw, expected", [
    (dict(kl_anneal_end=0.25), [0.25, 0.25, 0.25]),  # constant weight: a beta-VAE objective
    (dict(kl_anneal_steps=2, kl_anneal_start=0.0, kl_anneal_end=0.5), [0.25, 0.5, 0.5]),
    (dict(kl_anneal_steps=2, kl_anneal_start=0.1), [0.55, 1.0, 1.0]),  # default end: the ELBO
])
def test_kl_anneal_end_is_the_weight_the_schedule_reaches_and_keeps(kw, expected):
    x = conjugate_data(n=16)
    model, guide = NormalNormal(), AffineNormalGuide(a=0.3)
    result = train(model, guide, TensorData(x), num_steps=3, batch_size=16, shuffle=False,
                   lr=1e-12, seed=5, progress=False, **kw)
    assert [r["kl_scale"] for r in result.history] == pytest.approx(expected)
    pyro.set_rng_seed(5)
    beta = expected[0]
    first = pyro.infer.Trace_ELBO().differentiable_loss(
        ScaleLatents(beta)(NormalNormal()), ScaleLatents(beta)(AffineNormalGuide(a=0.3)), x)
    assert result.history[0]["loss"] == pytest.approx(first.item() / 16, rel=1e-5)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "a"])
def test_a_negative_or_non_finite_kl_weight_is_refused(bad):
    for name in ("kl_anneal_start", "kl_anneal_end"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(num_steps=1, **{name: bad}).validate()


def test_kl_weights_above_one_and_a_falling_schedule_are_allowed():
    TrainConfig(num_steps=1, kl_anneal_start=2.0, kl_anneal_end=4.0).validate()
    x = conjugate_data(n=16)
    result = train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=3,
                   batch_size=16, lr=1e-12, progress=False, kl_anneal_steps=2,
                   kl_anneal_start=3.0, kl_anneal_end=1.0)
    assert [r["kl_scale"] for r in result.history] == pytest.approx([2.0, 1.0, 1.0])


def test_resuming_a_run_saved_before_a_setting_existed_compares_it_with_its_default(tmp_path):
    """A checkpoint without ``kl_anneal_end`` was trained at the default weight 1: resuming it
    with another weight must be refused, not silently change the objective mid-run."""
    x = conjugate_data(n=16)
    kw = dict(batch_size=8, lr=1e-3, progress=False, run_dir=tmp_path, checkpoint_every=1)
    train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=2, **kw)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["schedule"]["kl_anneal_end"]  # as written before the setting existed
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"kl_anneal_end: 1.0 -> 0.5"):
        train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=4, resume=True,
              kl_anneal_end=0.5, **kw)
    resumed = train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=4,
                    resume=True, **kw)
    assert resumed.step == 4


def test_stale_files_early_stop_persistence_and_nan_validation(tmp_path):
    x = conjugate_data(n=40)
    kw = dict(num_steps=200, batch_size=10, lr=1e-12, valid_every=2, early_stopping_patience=3,
              run_dir=tmp_path, progress=False)
    first = train(NormalNormal(), AffineNormalGuide(), TensorData(x), valid_data=TensorData(x),
                  **kw)
    assert first.stopped == "early_stopping" and first.step == 8
    again = train(NormalNormal(), AffineNormalGuide(), TensorData(x), valid_data=TensorData(x),
                  resume=True, **kw)
    assert again.stopped == "early_stopping" and again.step == 8  # stays stopped
    # a fresh run into the same folder does not inherit the old best.pt
    train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=3, batch_size=10,
          run_dir=tmp_path, progress=False)
    assert not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["step"] == 3
    bad = x.clone()
    bad[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="validation loss"), \
            pyro.validation_enabled(False):
        train(NormalNormal(), AffineNormalGuide(), TensorData(x), valid_data=TensorData(bad),
              num_steps=4, batch_size=10, valid_every=2, progress=False)
    with pytest.raises(ValueError, match="valid_data"):
        train(NormalNormal(), AffineNormalGuide(), TensorData(x), num_steps=2, valid_every=1)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("elbo", ["RenyiELBO", "JitTrace_ELBO"])
def test_param_site_elbos_with_networks_shared_by_model_and_guide(elbo):
    """A VRNN's model and guide share networks; registering them must not break."""
    model = NormalNormal()
    guide = AffineNormalGuide()
    model.shared = guide  # the guide's parameters are also the model's
    x = conjugate_data(n=32)
    result = train(model, guide, TensorData(x), elbo=elbo, num_steps=40, batch_size=32,
                   lr=0.05, progress=False)
    assert result.step == 40 and guide.a.item() > 0.3
    assert not [k for k in pyro.get_param_store().keys() if k.startswith("_seqlatent")]


class ParamGuide(nn.Module):
    """A guide written with pyro.param, as many users write them."""

    def forward(self, x):
        a = pyro.param("a", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(a * x, scale))


def test_pyro_param_guides_train_checkpoint_and_ignore_stale_store_entries(tmp_path):
    x = conjugate_data(n=64)
    pyro.param("left_over_from_another_model", torch.randn(3))  # must not be trained/saved
    train(NormalNormal(), ParamGuide(), TensorData(x), num_steps=300, batch_size=64, lr=0.05,
          run_dir=tmp_path, progress=False)
    assert abs(pyro.param("a").item() - 0.8) < 0.1
    assert pyro.param("scale").item() == pytest.approx((0.25 / 1.25) ** 0.5, abs=0.1)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["param_store"]
    assert set(saved) == {"a", "scale"}  # not the left-over entry
    # resuming in a clean process (empty store) restores them and continues
    pyro.clear_param_store()
    result = train(NormalNormal(), ParamGuide(), TensorData(x), num_steps=310, batch_size=64,
                   lr=0.05, run_dir=tmp_path, resume=True, progress=False)
    assert result.step == 310 and abs(pyro.param("a").item() - 0.8) < 0.1


def test_time_budget_in_wall_or_process_seconds(monkeypatch):
    import itertools
    import time

    x = TensorDataset(conjugate_data(n=20))
    ticks = itertools.count()  # a fake CPU clock: every reading is one second later
    monkeypatch.setattr(time, "process_time", lambda: float(next(ticks)))
    result = train(NormalNormal(), AffineNormalGuide(), x, num_steps=1000, batch_size=5,
                   max_time_s=10.0, time_budget="process", progress=False)
    assert result.stopped == "time_budget"
    assert 1 <= result.step < 12
    assert result.budget_time_s >= 10.0 > result.wall_time_s  # the fake clock ran ahead
    # the wall-clock budget ignores the process clock: 1000 s is never reached in 30 steps
    result = train(NormalNormal(), AffineNormalGuide(), x, num_steps=30, batch_size=5,
                   max_time_s=1000.0, progress=False)
    assert result.stopped == "completed" and result.step == 30
    with pytest.raises(ValueError, match="time_budget"):
        train(NormalNormal(), AffineNormalGuide(), x, num_steps=1, time_budget="cpu")


def test_resume_refuses_a_budget_measured_on_another_clock(tmp_path):
    x = TensorDataset(conjugate_data(n=20))
    train(NormalNormal(), AffineNormalGuide(), x, num_steps=3, batch_size=5, run_dir=tmp_path,
          checkpoint_every=3, time_budget="process", progress=False)
    with pytest.raises(ValueError, match="time_budget='process'"):
        train(NormalNormal(), AffineNormalGuide(), x, num_steps=6, batch_size=5,
              run_dir=tmp_path, resume=True, progress=False)
    result = train(NormalNormal(), AffineNormalGuide(), x, num_steps=6, batch_size=5,
                   run_dir=tmp_path, resume=True, time_budget="process", progress=False)
    assert result.step == 6 and result.wall_time_s > 0


def test_pyro_validation_switch_covers_steps_and_validation(monkeypatch):
    seen = []
    import importlib

    train_module = importlib.import_module("pyro_seqlatent.infer.train")

    real = train_module.mean_loss

    def spy(*args, **kwargs):
        seen.append(("valid", pyro.infer.util.is_validation_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(importlib.import_module("pyro_seqlatent.infer.validation"), "mean_loss",
                        spy)
    x = TensorDataset(conjugate_data(n=20))
    def step_callback(record, model, guide):
        seen.append(("step", pyro.infer.util.is_validation_enabled()))

    for flag in (False, True):
        seen.clear()
        train(NormalNormal(), AffineNormalGuide(), x, valid_data=x, num_steps=2, batch_size=5,
              valid_every=1, pyro_validation=flag, progress=False, callbacks=[step_callback])
        assert {kind for kind, _ in seen} == {"step", "valid"}, seen
        assert all(v is flag for _, v in seen), seen


def test_step_decay_with_a_floor_and_adamax_as_the_latent_ode_reference():
    """lr_k = lr · max(decay^k, lr_min_factor) (the reference's per-step ×0.999 down to lr/10),
    with Adamax; the recorded lr of step k is the one the step used."""
    x = conjugate_data(n=8)
    result = train(NormalNormal(), AffineNormalGuide(a=0.3), TensorData(x), num_steps=6,
                   batch_size=8, optimizer="adamax", lr=0.1, lr_schedule="step", lr_step_size=1,
                   lr_decay=0.5, lr_min_factor=0.1, progress=False)
    lrs = [r["lr"] for r in result.history]
    assert lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125, 0.01, 0.01])
    with pytest.raises(ValueError, match="elbo='Trace_ELBOO'"):  # before any data is touched
        TrainConfig(num_steps=1, elbo="Trace_ELBOO").validate()
    with pytest.raises(ValueError, match="kl_anneal_steps"):
        TrainConfig(num_steps=1, elbo="JitTrace_ELBO", kl_anneal_steps=5).validate()
    with pytest.raises(ValueError, match="kl_anneal_end=0.5"):  # would also score validation
        TrainConfig(num_steps=1, elbo="JitTrace_ELBO", kl_anneal_end=0.5).validate()
    with pytest.raises(ValueError, match="lr_min_factor"):
        train(NormalNormal(), AffineNormalGuide(a=0.3), TensorData(x), num_steps=1,
              lr_min_factor=2.0, progress=False)


class DropoutNormal(NormalNormal):
    """NormalNormal whose observation mean goes through dropout: z in eval mode, z or 0 (×2)
    in train mode, so a loss tells which mode the model ran in."""

    def __init__(self):
        super().__init__(noise=0.5)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Dropout(0.5)  # a submodule the user put in eval mode on purpose
        self.frozen.eval()

    def forward(self, x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), self.prior_scale))
            pyro.sample("x", dist.Normal(self.drop(z), self.noise), obs=x)
        return z


def test_validation_and_evaluation_run_in_eval_mode_and_restore_modes():
    """The validation loss is the eval-mode (dropout-free) loss, which is the plain
    NormalNormal's at the (barely moved) guide; steps run in train mode; every submodule gets
    its own mode back (the frozen one stays in eval mode)."""
    from pyro_seqlatent.infer import eval_mode, mean_loss

    model, guide = DropoutNormal(), AffineNormalGuide(a=0.5, log_scale=-1.0)
    x = conjugate_data(n=40)
    seen = []
    result = train(model, guide, TensorData(x), valid_data=TensorData(x), num_steps=1,
                   batch_size=40, lr=1e-9, valid_every=1, progress=False,
                   callbacks=[lambda record, m, g: seen.append(m.drop.training)])
    assert seen == [True] and model.drop.training and not model.frozen.training
    loader = torch.utils.data.DataLoader(TensorData(x), batch_size=40)
    plain = mean_loss(NormalNormal(noise=0.5), guide, loader, pyro.infer.Trace_ELBO())
    assert result.history[-1]["valid_loss"] == pytest.approx(plain, rel=1e-6)
    with eval_mode(model, guide, print):  # non-modules are ignored
        assert not model.training and not model.drop.training
    assert model.training and model.drop.training and not model.frozen.training


def test_a_jit_elbo_with_dropout_and_validation_data_is_refused():
    """The compiled trace would keep train-mode dropout in validation: a clear error instead."""
    x = conjugate_data(n=40)
    with pytest.raises(ValueError, match="Dropout at drop.*Trace_ELBO"):
        train(DropoutNormal(), AffineNormalGuide(), TensorData(x), valid_data=TensorData(x),
              elbo="JitTrace_ELBO", num_steps=1, batch_size=40, progress=False)
    # without validation data nothing is scored in eval mode: allowed
    train(DropoutNormal(), AffineNormalGuide(), TensorData(x), elbo="JitTrace_ELBO",
          num_steps=1, batch_size=40, progress=False)


def test_resume_respects_a_spent_budget_and_refuses_other_settings(tmp_path):
    """A budget-stopped run resumed with the same budget takes no step; a larger budget goes
    on; another batch size (which would misplace the run in its epoch) is refused."""
    x = conjugate_data(n=40)

    def run(max_time_s, **extra):
        pyro.clear_param_store()
        kwargs = dict(num_steps=10**6, batch_size=8, lr=0.05, progress=False,
                      max_time_s=max_time_s, time_budget="process", checkpoint_every=5)
        kwargs.update(extra)
        return train(NormalNormal(noise=0.5), AffineNormalGuide(), TensorData(x),
                     run_dir=tmp_path, resume=True, **kwargs)

    first = run(0.05)
    assert first.stopped == "time_budget" and first.step > 0
    again = run(0.05)
    assert again.step == first.step and again.stopped == "time_budget"
    longer = run(0.15)
    assert longer.step > first.step
    assert "resume_changes" not in load_checkpoint(tmp_path / "checkpoint.pt")["state"]
    with pytest.raises(ValueError, match=r"batch_size: 8 -> 4"):
        run(0.3, batch_size=4)


def test_a_diverged_run_resumes_from_its_last_good_checkpoint_with_a_lower_lr_and_clipping(
        tmp_path):
    """The recovery TrainingDiverged advises: resume from the checkpoint with another lr and
    clip_norm. The restored schedule is rescaled to the new base rate (lr_t = lr_new * f(t)),
    the restored optimizer state does not override it, and with SGD the first resumed update
    is exactly -lr_t * clip(grad), checked against a hand-made step from the checkpoint."""
    x = conjugate_data(n=64)
    schedule = dict(optimizer="sgd", lr_schedule="step", lr_decay=0.5, lr_step_size=4,
                    batch_size=16, checkpoint_every=5, progress=False, shuffle=False)
    model, guide = ExplodingModel("factor"), AffineNormalGuide()
    with pytest.raises(TrainingDiverged, match=r"step 7: .*lower learning rate"):
        train(model, guide, TensorData(x), num_steps=12, lr=0.05, run_dir=tmp_path, **schedule)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["state"]["step"] == 5

    # the first resumed step by hand: the checkpoint's parameters, the same batch (the data
    # are not shuffled, batch 6 of 4 per epoch is items 16..31) and noise, one clipped SGD step
    lr_new, clip = 0.01, 0.5
    hand_model, hand_guide = NormalNormal(learn_noise=True), AffineNormalGuide()
    hand_model.load_state_dict(ckpt["model"])
    hand_guide.load_state_dict(ckpt["guide"])
    set_rng_state(ckpt["rng"])
    loss = pyro.infer.Trace_ELBO().differentiable_loss(hand_model, hand_guide, x[16:32])
    params = [*hand_model.parameters(), *hand_guide.parameters()]  # clipping sees them all
    grads = torch.autograd.grad(loss, params)
    scale = min(1.0, clip / float(torch.linalg.vector_norm(torch.stack(grads))))
    assert scale < 1.0  # the clip is active
    expected = [p.detach() - lr_new * 0.5 * scale * g for p, g in zip(params, grads)]  # f(5)

    model = NormalNormal(learn_noise=True)  # a healthy model takes over from the checkpoint
    model.load_state_dict(ckpt["model"])
    guide = AffineNormalGuide()
    result = train(model, guide, TensorData(x), num_steps=6, lr=lr_new, clip_norm=clip,
                   run_dir=tmp_path, resume=True, **schedule)
    assert result.step == 6
    for got, want in zip([*model.parameters(), *guide.parameters()], expected, strict=True):
        assert torch.allclose(got.detach(), want, atol=1e-6), (got, want)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["lr"] for r in rows] == pytest.approx(
        [0.05] * 4 + [0.025] + [lr_new * 0.5])  # steps 1-5 as trained, step 6 rescaled
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["state"]["resume_changes"] == [
        {"step": 5, "setting": "lr", "from": 0.05, "to": lr_new},
        {"step": 5, "setting": "clip_norm", "from": None, "to": clip}]
    longer = train(model, guide, TensorData(x), num_steps=9, lr=lr_new, clip_norm=clip,
                   run_dir=tmp_path, resume=True, **schedule)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert longer.step == 9 and [r["lr"] for r in rows[6:]] == pytest.approx(
        [lr_new * 0.5, lr_new * 0.5, lr_new * 0.25])  # f(6), f(7), f(8)
    # resumed again with the same settings: nothing new is recorded
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["resume_changes"] == saved[
        "state"]["resume_changes"]


def test_parameter_average_against_a_hand_computed_one(tmp_path):
    """The modules handed back, the validation loss and the best checkpoint all hold the
    average d_t = min(d, (1 + t) / (10 + t)) of the parameter trajectory, recorded step by step."""
    from pyro_seqlatent.infer.elbos import make_elbo
    from pyro_seqlatent.infer.train import mean_loss

    decay = 0.9
    x = conjugate_data(n=40)
    raw = []

    def record(rec, model, guide):  # callbacks see the optimizer's own parameters
        raw.append({k: v.detach().clone() for k, v in guide.state_dict().items()})

    pyro.clear_param_store()
    model, guide = NormalNormal(noise=0.5), AffineNormalGuide()
    init = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    result = train(model, guide, TensorData(x), valid_data=TensorData(x[:20]), num_steps=30,
                   batch_size=10, lr=0.05, valid_every=30, ema_decay=decay, run_dir=tmp_path,
                   callbacks=[record], progress=False, seed=3)
    expected = dict(init)
    for t, values in enumerate(raw, start=1):
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: d * expected[k] + (1 - d) * values[k] for k in values}
    for k, v in guide.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        assert not torch.allclose(v, raw[-1][k], atol=1e-4), k  # it is not the last iterate
    best = load_checkpoint(tmp_path / "best.pt")
    for k, v in best["guide"].items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    # the validation loss was computed at the averaged weights (same common random numbers)
    valid = mean_loss(model, guide, torch.utils.data.DataLoader(TensorData(x[:20]), batch_size=10),
                      make_elbo("Trace_ELBO"), torch.device("cpu"), None, seed=3)
    assert valid == pytest.approx(result.history[-1]["valid_loss"], rel=1e-6)
    # load_run / restore_modules give the average from the periodic checkpoint too, unless asked
    # for the optimizer's own iterate
    from pyro_seqlatent.infer.train import restore_modules

    other = AffineNormalGuide()
    restore_modules(tmp_path / "checkpoint.pt", NormalNormal(noise=0.5), other)
    for k, v in other.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    restore_modules(tmp_path / "checkpoint.pt", NormalNormal(noise=0.5), other, averaged=False)
    for k, v in other.state_dict().items():
        assert torch.equal(v, raw[-1][k]), k
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ema_decay"):
            train(model, guide, TensorData(x), num_steps=1, ema_decay=bad, progress=False)


def test_the_average_does_not_change_the_optimizers_trajectory():
    x = conjugate_data(n=40)
    losses = []
    for decay in (0.0, 0.9):
        pyro.clear_param_store()
        result = train(NormalNormal(noise=0.5, learn_noise=True), AffineNormalGuide(),
                       TensorData(x), valid_data=TensorData(x[:20]), num_steps=20, batch_size=10,
                       lr=0.05, valid_every=3, ema_decay=decay, progress=False, seed=2)
        losses.append([r["loss"] for r in result.history])
    assert losses[0] == losses[1]
