r"""The log-det a flow returns from its *inverse*, which is what scores a value the flow did not
sample (a data point of a flow density, the score-function / STL / DReG guide terms).

For every flow ``f``: ``_inverse_and_ldj(y)`` returns ``x = f^{-1}(y)`` and
:math:`\log|\det \partial f/\partial x|` at that ``x``, the same number ``_forward(x)`` gives,
and equal to the log-determinant of the autograd Jacobian; a ``TransformedDistribution`` scores a
fresh value by it. ``cache_free_log_prob`` agrees with these densities for a flow used in the
inverse direction (``t.inv``) as well.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import transforms as TT

from pyro_seqlatent import transforms as T
from pyro_seqlatent.infer.estimators import cache_free_log_prob

IMAGE = (2, 3, 4)
FLOWS = {
    "planar": lambda: T.Planar(3),
    "radial": lambda: T.Radial(3),
    "iaf": lambda: T.IAF(3),
    "iaf_gated": lambda: T.IAF(3, gated=True),
    "affine_coupling": lambda: T.AffineCoupling(3),
    "additive_coupling": lambda: T.AdditiveCoupling(3),
    "diagonal_scaling": lambda: T.DiagonalScaling(3),
    "image_affine_coupling": lambda: T.ImageAffineCoupling(IMAGE, hidden_channels=8),
}


def _flow(name, seed=0):
    """The flow in float64 with every parameter random (zero-initialised last layers would make
    every log-scale 0 and hide a wrong sign)."""
    t = FLOWS[name]().double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return t


def _shape(name):
    return IMAGE if name.startswith("image") else (3,)


def _brute_log_det(t, x):
    """log|det J_f(x)| of one point from the autograd Jacobian."""
    shape = x.shape
    J = jacobian(lambda v: t._forward(v.reshape(shape))[0].reshape(-1), x.reshape(-1).clone())
    return torch.linalg.slogdet(J)[1]


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_inverse_returns_the_forward_log_det_at_its_output(name):
    t = _flow(name)
    y = 1.5 * torch.randn(4, *_shape(name), generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    x, ldj_inverse = t._inverse_and_ldj(y)
    y_again, ldj_forward = t._forward(x)
    torch.testing.assert_close(y_again, y, atol=1e-6, rtol=0)
    assert ldj_inverse.shape == (4,)
    torch.testing.assert_close(ldj_inverse, ldj_forward, atol=1e-8, rtol=1e-8)
    for i in range(2):
        torch.testing.assert_close(ldj_inverse[i], _brute_log_det(t, x[i]), atol=1e-6, rtol=0)
    if name != "additive_coupling":  # volume-preserving; the others have a non-trivial log-det
        assert ldj_forward.abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_a_fresh_value_is_scored_through_the_inverse(name):
    t = _flow(name, seed=2)
    shape = _shape(name)
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(len(shape))
    q = dist.TransformedDistribution(base, [t])
    y = torch.randn(3, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = t.inv(y.clone())
    expected = base.log_prob(x) - torch.stack([_brute_log_det(t, xi) for xi in x])
    torch.testing.assert_close(q.log_prob(y), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache_free_log_prob(q, y), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["planar", "radial", "affine_coupling", "torch_affine"])
def test_cache_free_log_prob_of_a_flow_used_backwards(name):
    """q = law of t^{-1}(x), x ~ base: log q(y) = log base(t(y)) + log|det J_t(y)|."""
    if name == "torch_affine":
        t = TT.AffineTransform(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64),
                               torch.tensor([2.0, 0.3, -1.5], dtype=torch.float64), event_dim=1)
        log_det = torch.tensor([2.0, 0.3, 1.5], dtype=torch.float64).log().sum()

        def brute(v):
            return log_det
    else:
        t = _flow(name, seed=4)

        def brute(v):
            return _brute_log_det(t, v)
    base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [t.inv])
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    forward = t._forward(y)[0] if isinstance(t, T.Flow) else t(y)
    expected = base.log_prob(forward) + torch.stack([brute(v) for v in y])
    torch.testing.assert_close(cache_free_log_prob(q, y), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.log_prob(y), expected, atol=1e-6, rtol=0)
