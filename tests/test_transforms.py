"""Flows checked against independent computations: autograd Jacobians, finite differences,
numerical quadrature, scipy, round trips that bypass the cache."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch.autograd.functional import jacobian

from pyro_seqlatent import transforms as T

# name -> (build(D) -> (module, make_transform)) ; make_transform() gives a fresh transform
CONTEXT_DIM = 3


def _randomize(module, scale=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _plain(ctor):
    def build(D, scale=0.4):
        module = _randomize(ctor(D).double(), scale)
        return module, lambda: module
    return build


def _conditional(ctor):
    def build(D, scale=0.4):
        module = _randomize(ctor(D, CONTEXT_DIM).double(), scale)
        g = torch.Generator().manual_seed(3)
        ctx = torch.randn(CONTEXT_DIM, dtype=torch.float64, generator=g)
        return module, lambda: module.condition(ctx)
    return build


FLOWS = {
    "planar": _plain(T.planar),
    "radial": _plain(T.radial),
    "iaf": _plain(lambda D: T.iaf(D, hidden_dims=(16,))),
    "iaf_gated": _plain(lambda D: T.iaf(D, hidden_dims=(16,), gated=True)),
    "nice": _plain(lambda D: T.nice(D, hidden_dims=(16,))),
    "nice_half": _plain(lambda D: T.nice(D, hidden_dims=(16,), mask="half")),
    "real_nvp": _plain(lambda D: T.real_nvp(D, num_couplings=3, hidden_dims=(16,))),
    "real_nvp_half": _plain(lambda D: T.real_nvp(D, num_couplings=2, hidden_dims=(16,),
                                                 mask="half")),
    "cond_planar": _conditional(lambda D, C: T.conditional_planar(D, C, (16,))),
    "cond_radial": _conditional(lambda D, C: T.conditional_radial(D, C, (16,))),
    "cond_iaf": _conditional(lambda D, C: T.conditional_iaf(D, C, (16,))),
    "cond_iaf_gated": _conditional(lambda D, C: T.conditional_iaf(D, C, (16,), gated=True)),
    "cond_nice": _conditional(lambda D, C: T.conditional_nice(D, C, 3, (16,))),
    "cond_real_nvp": _conditional(lambda D, C: T.conditional_real_nvp(D, C, 3, (16,))),
}
DIMS = (2, 3, 5)


def _base(D):
    return dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("name", sorted(FLOWS))
def test_log_det_matches_autograd_jacobian(name, D):
    _, make = FLOWS[name](D)
    t = make()
    x = torch.randn(4, D, dtype=torch.float64)
    y = t(x)
    ldj = t.log_abs_det_jacobian(x, y)  # cached path
    ldj_fresh = t.log_abs_det_jacobian(x.clone(), y.clone())  # recomputed path
    assert ldj.shape == (4,)
    for i in range(4):
        J = jacobian(lambda v: t(v), x[i].clone())
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign != 0
        torch.testing.assert_close(ldj[i], logabsdet, atol=1e-6, rtol=0)
        torch.testing.assert_close(ldj_fresh[i], logabsdet, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_iaf_jacobian_is_triangular_under_its_permutation(gated):
    D = 5
    perm = torch.tensor([3, 0, 4, 1, 2])
    t = _randomize(T.iaf(D, hidden_dims=(12, 12), gated=gated, permutation=perm).double())
    x = torch.randn(D, dtype=torch.float64)
    J = jacobian(lambda v: t(v), x)[perm][:, perm]  # rows/cols in the MADE ordering
    assert torch.count_nonzero(torch.triu(J, diagonal=1)) == 0
    assert torch.count_nonzero(torch.tril(J, diagonal=-1)) > 0  # really autoregressive
    torch.testing.assert_close(torch.diagonal(J).abs().log().sum(),
                               t.log_abs_det_jacobian(x, t(x)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("name", sorted(FLOWS))
def test_round_trips_bypassing_the_cache(name, D):
    _, make = FLOWS[name](D)
    t = make()
    x = torch.randn(2, 3, D, dtype=torch.float64)
    y = t(x)
    assert y.shape == x.shape
    torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-6, rtol=0)
    y2 = 2.0 * torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(t(t.inv(y2).clone()), y2, atol=1e-6, rtol=0)
    assert t.log_abs_det_jacobian(x.clone(), y.clone()).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_every_parameter_gets_a_gradient(name):
    D = 3
    module, make = FLOWS[name](D)
    d = dist.TransformedDistribution(_base(D), [make()])
    d.rsample((8,)).pow(2).sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"rsample: no gradient for {pname}"
    module.zero_grad(set_to_none=True)
    d = dist.TransformedDistribution(_base(D), [make()])
    d.log_prob(torch.randn(8, D, dtype=torch.float64)).sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"log_prob: no gradient for {pname}"


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_log_prob_gradient_matches_finite_differences(name):
    D = 3
    module, make = FLOWS[name](D)
    x = 1.5 * torch.randn(6, D, dtype=torch.float64)
    params = list(module.parameters())
    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def value():
        return dist.TransformedDistribution(_base(D), [make()]).log_prob(x.clone()).sum()

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    analytic = sum((gr * v).sum() for gr, v in zip(grads, direction) if gr is not None)
    eps = 1e-6
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(eps * v)
        up = value()
        for p, v in zip(params, direction):
            p.sub_(2 * eps * v)
        down = value()
        for p, v in zip(params, direction):
            p.add_(eps * v)
    numeric = (up - down) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_density_integrates_to_one_on_a_grid(name):
    _, make = FLOWS[name](2, scale=0.2)  # moderate parameters: the mass stays on the grid
    d = dist.TransformedDistribution(_base(2), [make()])
    n, half = 561, 16.0
    grid = torch.linspace(-half, half, n, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = d.log_prob(xy).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) < 2e-3


def test_planar_stays_invertible_for_adversarial_parameters():
    D = 3
    t = T.planar(D).double()
    with torch.no_grad():
        t.w.copy_(torch.tensor([2.0, 0.0, 0.0]))
        t.u.copy_(torch.tensor([-6.0, 1.0, 0.0]))  # w.u = -12 << -1
        t.b.zero_()
    s = torch.linspace(-4, 4, 401, dtype=torch.float64)
    line = s[:, None] * t.w.detach() / t.w.detach().norm()
    proj = (t(line) * t.w.detach()).sum(-1)
    assert bool((proj[1:] > proj[:-1]).all()), "planar map is not monotone along w"
    x = torch.randn(50, D, dtype=torch.float64)
    y = t(x)
    ldj = t.log_abs_det_jacobian(x, y)
    assert torch.isfinite(ldj).all()
    torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-6, rtol=0)
    J = jacobian(lambda v: t(v), x[0])
    torch.testing.assert_close(ldj[0], torch.linalg.slogdet(J)[1], atol=1e-6, rtol=0)


def test_cache_is_safe_across_optimizer_steps():
    D = 3
    for t in (T.iaf(D, hidden_dims=(8,)), T.planar(D), T.nice(D, hidden_dims=(8,))):
        _randomize(t)
        x = torch.randn(4, D)
        y_old = t(x)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.1)
        y_new = t(x)  # same x object: must not return the stale cached value
        assert not torch.allclose(y_new, y_old)
        torch.testing.assert_close(y_new, t(x.clone()))
        torch.testing.assert_close(t.log_abs_det_jacobian(x, y_new),
                                   t.log_abs_det_jacobian(x.clone(), y_new.clone()))


def test_conditional_flows_broadcast_context_and_input_batches():
    D, C = 3, CONTEXT_DIM
    for cond in (T.conditional_planar(D, C), T.conditional_radial(D, C),
                 T.conditional_iaf(D, C), T.conditional_nice(D, C), T.conditional_real_nvp(D, C)):
        ctx = torch.randn(2, 1, C)
        x = torch.randn(5, D)
        t = cond.condition(ctx)
        y = t(x)
        assert y.shape == (2, 5, D)
        assert t.log_abs_det_jacobian(x, y).shape == (2, 5)
        d = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [t])
        assert d.log_prob(torch.randn(5, D)).shape == (2, 5)


def test_float32_works():
    for t in (T.planar(4), T.radial(4), T.iaf(4), T.nice(4), T.real_nvp(4)):
        _randomize(t, 0.05)
        x = torch.randn(7, 4)
        y = t(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_image_coupling_jacobian_and_inverse(mask):
    shape = (2, 3, 4)
    t = _randomize(T.ImageAffineCoupling(shape, mask=mask, hidden_channels=8).double(), 0.3)
    x = torch.randn(2, *shape, dtype=torch.float64)
    y = t(x)
    ldj = t.log_abs_det_jacobian(x, y)
    assert ldj.shape == (2,)
    for i in range(2):
        J = jacobian(lambda v: t(v.reshape(shape)).reshape(-1), x[i].reshape(-1).clone())
        torch.testing.assert_close(ldj[i], torch.linalg.slogdet(J)[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(t.inv(y.clone()), x, atol=1e-6, rtol=0)
    b = t.mask
    torch.testing.assert_close(y * b, x * b)  # the identity part really is untouched
    stack = T.real_nvp(shape, num_couplings=2, hidden_channels=8)
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(3)
    flow = dist.TransformedDistribution(base, [stack])
    assert flow.log_prob(torch.randn(5, *shape)).shape == (5,)


def test_masks():
    torch.testing.assert_close(T.vector_mask(5, "half"), torch.tensor([1, 1, 0, 0, 0]).bool())
    torch.testing.assert_close(T.vector_mask(5, "alternating", flip=True),
                               torch.tensor([0, 1, 0, 1, 0]).bool())
    cb = T.image_mask((1, 2, 2), "checkerboard")
    torch.testing.assert_close(cb, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    ch = T.image_mask((4, 1, 1), "channel")
    torch.testing.assert_close(ch.flatten(), torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="split"):
        T.AffineCoupling(4, mask="half", split=4)
    with pytest.raises(ValueError, match="split"):
        T.AdditiveCoupling(4, mask="half", split=0)
    with pytest.raises(ValueError, match="mask has shape"):
        T.AffineCoupling(4, mask=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="mask has shape"):
        T.ImageAffineCoupling((1, 2, 2), mask=torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="channel"):
        T.ImageAffineCoupling((1, 4, 4), mask="channel")
    with pytest.raises(ValueError, match="mask must be one of"):
        T.nice(4, mask="diagonal")
    with pytest.raises(ValueError, match="input_dim"):
        T.planar(1)
    with pytest.raises(TypeError, match="input_dim"):
        T.radial(2.5)
    with pytest.raises(ValueError, match="num_couplings"):
        T.real_nvp(4, num_couplings=0)
    for cond in (T.conditional_planar(3, 2), T.conditional_radial(3, 2),
                 T.conditional_iaf(3, 2), T.conditional_nice(3, 2),
                 T.conditional_real_nvp(3, 2)):
        parts = getattr(cond, "transforms", [cond])
        with pytest.raises(ValueError, match="context_dim=2"):
            parts[0].condition(torch.randn(4, 5))
    with pytest.raises(ValueError, match="hidden"):
        T.iaf(10, hidden_dims=(4,))


def test_constructor_defaults_give_working_flows():
    for D in (2, 7):
        flows = [T.nice(D), T.real_nvp(D), T.planar(D), T.radial(D), T.iaf(D),
                 T.iaf(D, gated=True)]
        for t in flows:
            d = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [t])
            z = d.rsample((3,))
            assert torch.isfinite(d.log_prob(z)).all()
            assert torch.isfinite(d.log_prob(torch.randn(3, D))).all()
    assert len(T.nice(6)) == 5  # four couplings, as in the paper, and the scaling layer


def test_logistic_prior_matches_scipy_and_samples():
    loc, scale = torch.tensor([0.0, 1.5]), torch.tensor([1.0, 0.5])
    d = T.Logistic(loc, scale)
    v = torch.linspace(-4, 4, 9)[:, None].expand(9, 2)
    expected = stats.logistic.logpdf(v.numpy(), loc=loc.numpy(), scale=scale.numpy())
    torch.testing.assert_close(d.log_prob(v), torch.as_tensor(expected, dtype=torch.float32))
    s = d.sample((200_000,))
    torch.testing.assert_close(s.mean(0), loc, atol=0.02, rtol=0)
    torch.testing.assert_close(s.var(0), scale**2 * math.pi**2 / 3, rtol=0.03, atol=0)
    prior = T.standard_logistic(2, dtype=torch.float64)
    flow = dist.TransformedDistribution(prior, [_randomize(T.nice(2, hidden_dims=(8,)).double())])
    grid = torch.linspace(-25, 25, 801, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(xy).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) < 2e-3


def test_made_is_autoregressive_with_context():
    from pyro_seqlatent.nn import MADE

    perm = torch.tensor([2, 0, 1, 3])
    made = _randomize(MADE(4, (8, 8), num_params=2, context_dim=2, permutation=perm).double())
    x = torch.randn(4, dtype=torch.float64)
    ctx = torch.randn(2, dtype=torch.float64)
    for out in range(2):
        J = jacobian(lambda v, k=out: made(v, ctx)[k], x)[perm][:, perm]
        assert torch.count_nonzero(torch.triu(J)) == 0
    Jc = jacobian(lambda c: made(x, c)[0], ctx)
    assert torch.count_nonzero(Jc) > 0
