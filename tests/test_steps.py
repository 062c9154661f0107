"""StepGroup/StepNormal: one batched log-density for per-step Normals, exact per site."""

import pyro.distributions as dist
import torch

from pyro_seqlatent.guides.steps import StepGroup, StepNormal


def _params(T=5, B=3, Z=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(B, T, Z, generator=g, requires_grad=True)
    scale = (torch.rand(B, T, Z, generator=g) + 0.5).requires_grad_()
    z = [torch.randn(B, Z, generator=g) for _ in range(T)]
    return loc, scale, z


def _reference(loc, scale, z):
    return torch.stack([dist.Normal(loc[:, t], scale[:, t]).to_event(1).log_prob(z[t])
                        for t in range(len(z))], -1)


def test_batched_group_equals_per_step_log_prob_and_gradients():
    loc, scale, z = _params()
    group = StepGroup(loc, scale, values=z)
    members = [group.member(loc[:, t], scale[:, t], index=t) for t in range(len(z))]
    got = torch.stack([m.log_prob(z[t]) for t, m in enumerate(members)], -1)
    want = _reference(loc, scale, z)
    assert torch.allclose(got, want)
    g1 = torch.autograd.grad(got.sum(), (loc, scale))
    g2 = torch.autograd.grad(want.sum(), (loc, scale))
    assert all(torch.allclose(a, b) for a, b in zip(g1, g2))


def test_appended_members_with_values_set_later():
    loc, scale, z = _params()
    group = StepGroup()
    members = [group.member(loc[:, t], scale[:, t]) for t in range(len(z))]
    group.set_values(z)
    got = torch.stack([m.log_prob(z[t]) for t, m in enumerate(members)], -1)
    assert torch.allclose(got, _reference(loc, scale, z))
    assert group._log_prob is not None  # the batched path was taken


def test_other_values_shapes_and_wrappers_fall_back_to_the_exact_density():
    loc, scale, z = _params()
    group = StepGroup(loc, scale, values=z)
    m = group.member(loc[:, 1], scale[:, 1], index=1)
    other = z[1].clone()  # equal numbers, another tensor: computed directly
    assert torch.allclose(m.log_prob(other), _reference(loc, scale, z)[:, 1])
    assert torch.allclose(m.log_prob(z[2]),
                          dist.Normal(loc[:, 1], scale[:, 1]).to_event(1).log_prob(z[2]))
    wide = m.expand((4, 3))  # another batch shape leaves the group
    assert isinstance(wide, StepNormal) and wide._group is None
    assert wide.log_prob(z[1]).shape == (4, 3)
    same = m.expand((3,))
    assert same is m
    masked = same.mask(torch.tensor([True, False, True]))
    lp = masked.log_prob(z[1])
    assert lp[1] == 0 and torch.allclose(lp[[0, 2]], _reference(loc, scale, z)[[0, 2], 1])
    # a group without values, or with the wrong number of them, never guesses
    lonely = StepGroup()
    a = lonely.member(loc[:, 0], scale[:, 0])
    assert torch.allclose(a.log_prob(z[0]), _reference(loc, scale, z)[:, 0])
    lonely.set_values(z)  # 5 values, 1 member
    assert torch.allclose(a.log_prob(z[0]), _reference(loc, scale, z)[:, 0])
    sample = a.rsample((2,))
    assert sample.shape == (2, 3, 2)
