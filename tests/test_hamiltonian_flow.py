"""The Hamiltonian (HVAE) and annealed Langevin flows and the guides that run them on a model's
log joint (pyro_seqlatent.transforms.hamiltonian, pyro_seqlatent.guides.hamiltonian)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_seqlatent.guides import HamiltonianGuide, LangevinGuide, MeanFieldGuide, model_log_joint
from pyro_seqlatent.infer import log_marginal, train
from pyro_seqlatent.infer.estimators import make_estimator
from pyro_seqlatent.infer.posterior_check import energy_distance
from pyro_seqlatent.models.conjugate import LinearGaussian, LinearGaussianGuide
from pyro_seqlatent.models.vae import VAE, VAEGuide
from pyro_seqlatent.transforms.hamiltonian import HamiltonianFlow, LangevinFlow, leapfrog

D = 3
PRECISION = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)


def quartic_grad(z):
    """∇ log π for log π(z) = -½ zᵀPz - ¼ Σ z⁴ (not Gaussian: a varying Hessian)."""
    return -(z @ PRECISION) - z ** 3


def gaussian_grad(z):
    return -(z @ PRECISION)


def gaussian_energy(z, rho):
    return 0.5 * (z @ PRECISION * z).sum(-1) + 0.5 * (rho ** 2).sum(-1)


def _flow(tempering=True, steps=3, dtype=torch.float64):
    torch.manual_seed(0)
    flow = HamiltonianFlow(D, steps=steps, step_size=0.3, tempering=tempering, init_beta0=0.4)
    with torch.no_grad():  # unequal step sizes per step and coordinate
        flow.log_step_size.add_(0.3 * torch.randn_like(flow.log_step_size))
    return flow.to(dtype)


def test_leapfrog_map_log_det_matches_an_autograd_jacobian():
    flow = _flow()
    z0, rho0 = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def pair_map(v):
        z, rho, _ = flow.transform(v[:D], v[D:], quartic_grad)
        return torch.cat([z, rho])

    jac = torch.autograd.functional.jacobian(pair_map, torch.cat([z0, rho0]))
    _, _, log_det = flow.transform(z0, rho0, quartic_grad)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign > 0
    assert torch.allclose(log_det, logabs, atol=1e-10)
    betas = flow.betas()
    assert float(log_det) == pytest.approx(0.5 * D * math.log(float(betas[0].detach())),
                                           abs=1e-10)
    # without tempering the leapfrog alone is volume preserving
    plain = _flow(tempering=False)
    jac = torch.autograd.functional.jacobian(
        lambda v: torch.cat(plain.transform(v[:D], v[D:], quartic_grad)[:2]),
        torch.cat([z0, rho0]))
    assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(0.0, abs=1e-10)


def test_flow_correction_is_the_change_of_variables_density():
    """δ = log N(ρ0; 0, β0⁻¹ I) − log|det J| − log N(ρK; 0, I), with J from autograd."""
    flow = _flow()
    z0, gamma = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    z, delta = flow(z0, quartic_grad, gamma=gamma)
    beta0 = flow.betas()[0]
    rho0 = gamma / beta0.sqrt()
    jac = torch.autograd.functional.jacobian(
        lambda v: torch.cat(flow.transform(v[:D], v[D:], quartic_grad)[:2]),
        torch.cat([z0, rho0]))
    _, rho_k, _ = flow.transform(z0, rho0, quartic_grad)
    expected = (dist.Normal(0.0, beta0.rsqrt()).log_prob(rho0).sum()
                - torch.linalg.slogdet(jac)[1]
                - dist.Normal(0.0, 1.0).log_prob(rho_k).sum())
    assert torch.allclose(delta, expected.to(delta), atol=1e-10)


def test_leapfrog_is_reversible_under_a_momentum_flip():
    eps = torch.tensor([0.2, 0.35, 0.1], dtype=torch.float64)
    z, rho = torch.randn(5, D, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)
    z1, rho1, _ = leapfrog(z, rho, quartic_grad, eps)
    z2, rho2, _ = leapfrog(z1, -rho1, quartic_grad, eps)
    assert not torch.allclose(z1, z)
    assert torch.allclose(z2, z, atol=1e-12) and torch.allclose(-rho2, rho, atol=1e-12)


def test_energy_error_is_second_order_in_the_step_size():
    """On a Gaussian, the energy error after a fixed time T shrinks ~4x when ε halves."""
    z, rho = torch.randn(50, D, dtype=torch.float64), torch.randn(50, D, dtype=torch.float64)
    errors = []
    for n in (20, 40, 80):
        eps = torch.tensor(2.0 / n, dtype=torch.float64)
        zk, rk, g = z, rho, None
        for _ in range(n):
            zk, rk, g = leapfrog(zk, rk, gaussian_grad, eps, g)
        errors.append(float((gaussian_energy(zk, rk) - gaussian_energy(z, rho)).abs().max()))
    assert errors[0] > 1e-3
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0


def test_langevin_correction_matches_its_gaussian_kernels():
    """δ = Σ log F_k(z_k | z_{k-1}) − log B_k(z_{k-1} | z_k), the kernels written out."""
    torch.manual_seed(0)
    flow = LangevinFlow(D, steps=3, step_size=0.1).double()
    with torch.no_grad():
        flow.schedule_logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
    z0 = torch.randn(4, D, dtype=torch.float64)
    noise = torch.randn(3, 4, D, dtype=torch.float64)

    def base_grad(z):
        return -z / 4.0  # ∇ log N(0, 4 I)

    z, delta = flow(z0, quartic_grad, base_grad, noise=noise)
    eps, b = flow.step_sizes(), flow.schedule()
    expected, zk = 0.0, z0
    for k in range(3):
        def drift(v, k=k):
            return b[k] * quartic_grad(v) + (1 - b[k]) * base_grad(v)
        z_new = zk + eps[k] * drift(zk) + (2 * eps[k]).sqrt() * noise[k]
        fwd = dist.Normal(zk + eps[k] * drift(zk), (2 * eps[k]).sqrt()).log_prob(z_new).sum(-1)
        bwd = dist.Normal(z_new + eps[k] * drift(z_new), (2 * eps[k]).sqrt()).log_prob(zk).sum(-1)
        expected = expected + fwd - bwd
        zk = z_new
    assert torch.allclose(z, zk) and torch.allclose(delta, expected, atol=1e-10)
    assert float(flow.schedule()[-1]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- guides


class MeanField(nn.Module):
    """A mean-field guide for LinearGaussian: the context is x itself."""

    def __init__(self, data_dim, latent_dim):
        super().__init__()
        self.site = MeanFieldGuide(data_dim, latent_dim)

    def forward(self, x):
        with pyro.plate("data", x.shape[-2]):
            return self.site.sample("z", x)


def _linear_gaussian():
    weight = torch.tensor([[1.0, 0.9], [0.9, 1.0], [0.5, 0.6]])
    model = LinearGaussian(weight, torch.zeros(3), noise_var=0.3)
    torch.manual_seed(1)
    z = torch.randn(16, 2)
    return model, z @ weight.T + 0.3 ** 0.5 * torch.randn(16, 3)


def _fit(model, guide, x, steps=250, lr=0.03):
    pyro.clear_param_store()
    torch.manual_seed(0)
    opt = torch.optim.Adam(guide.parameters(), lr=lr)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    for _ in range(steps):
        opt.zero_grad()
        elbo.differentiable_loss(model, guide, x).backward()
        opt.step()
    torch.manual_seed(1)
    est = log_marginal(model, guide, x, num_samples=2000)
    gap = float((model.exact_log_marginal(x) - est.elbo).mean())
    with pyro.plate("draws", 1000, dim=-2):
        draws = pyro.poutine.trace(guide).get_trace(x[:1]).nodes["z"]["value"]
    return gap, draws.reshape(-1, 2).detach()


def test_more_leapfrog_steps_move_the_guide_toward_the_exact_posterior():
    """On a linear-Gaussian model with a correlated posterior: the mean-field guide's gap
    log p(x) − ELBO is at least the optimal mean-field KL; HVAE steps lower the gap and the
    energy distance to exact posterior draws, more with more steps (measured: gaps 0.77, 0.62,
    0.19 nats for K = 0, 2, 8 against a best mean-field KL of 0.71; energy distances 0.23,
    0.04, 0.05)."""
    model, x = _linear_gaussian()
    mean, cov = model.exact_posterior(x[:1])
    exact = dist.MultivariateNormal(mean[0], cov).sample((1000,))
    prec = torch.linalg.inv(cov)
    best_mean_field_kl = 0.5 * float(prec.diagonal().log().sum() - torch.logdet(prec))
    results = {}
    for steps in (0, 2, 8):
        base = MeanField(3, 2)
        guide = base if steps == 0 else HamiltonianGuide(model, base, 2, steps=steps,
                                                         step_size=0.2)
        gap, draws = _fit(model, guide, x, steps=150, lr=0.05)
        results[steps] = (gap, energy_distance(draws, exact))
    assert results[0][0] > 0.9 * best_mean_field_kl > 0.1
    assert results[8][0] < results[2][0] < results[0][0]
    assert results[8][0] < 0.5 * best_mean_field_kl
    assert results[8][1] < 0.6 * results[0][1]


def test_score_function_estimators_are_refused_by_name_and_iwae_works():
    model, x = _linear_gaussian()
    guide = HamiltonianGuide(model, MeanField(3, 2), 2, steps=2)
    for name in ("score", "score_avg_baseline", "stl", "dreg"):
        with pytest.raises(ValueError, match="known only for the draw just made"):
            make_estimator(name).loss_and_grads(model, guide, x)
    loss = make_estimator("iwae").loss(model, guide, x)
    assert math.isfinite(loss)


def test_log_marginal_through_the_flow_is_the_exact_evidence_within_noise():
    """Importance weights p(x, z_K) N(ρ_K) / q̄ are unbiased for p(x) on the extended space."""
    model, x = _linear_gaussian()
    pyro.set_rng_seed(0)
    exact = model.exact_log_marginal(x)
    for wrapper in (HamiltonianGuide, LangevinGuide):
        base = LinearGaussianGuide(3, 2).set_exact(model)  # a good proposal: small IS noise
        est = log_marginal(model, wrapper(model, base, 2, steps=3), x, num_samples=2000)
        assert float(est.elbo.mean()) < float(exact.mean())
        assert (est.elbo > exact - 0.5).all()
        assert float((est.log_marginal - exact).abs().max()) < 0.05


def _binary_batch(n=40, dim=20):
    torch.manual_seed(0)
    return (torch.rand(n, dim) < 0.3).float()


@pytest.mark.parametrize("wrapper,base", [(HamiltonianGuide, "meanfield"),
                                          (LangevinGuide, "meanfield"),
                                          (HamiltonianGuide, "iaf")])  # IAF, then leapfrog
def test_both_flows_train_inside_a_vae_guide_with_train(wrapper, base, tmp_path):
    data = _binary_batch()
    model = VAE(data_dim=20, latent_dim=2, hidden_dims=(16,))
    site_guide = VAEGuide(data_dim=20, latent_dim=2, hidden_dims=(16,), guide=base, num_flows=2)
    guide = wrapper(model, site_guide, 2, steps=2)
    before = guide.flow.log_step_size.detach().clone()
    result = train(model, guide, data, num_steps=20, batch_size=20, lr=0.01, progress=False,
                   run_dir=str(tmp_path / "run"), seed=0)
    assert math.isfinite(result.final_loss)
    assert not torch.equal(before, guide.flow.log_step_size.detach())


class Hierarchical(nn.Module):
    """A user model: a global log-scale (MAP) and a local latent per point."""

    def forward(self, x):
        log_s = pyro.sample("log_s", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, log_s.exp().unsqueeze(-1)).to_event(1), obs=x)


class HierarchicalGuide(nn.Module):
    def __init__(self, global_first=True):
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor(0.5))
        self.site = MeanFieldGuide(2, 2)
        self.global_first = global_first

    def forward(self, x):
        if self.global_first:
            pyro.sample("log_s", dist.Delta(self.log_s))
        with pyro.plate("data", x.shape[-2]):
            z = self.site.sample("z", x)
        if not self.global_first:
            pyro.sample("log_s", dist.Delta(self.log_s))
        return z


def test_model_log_joint_conditions_on_the_guides_other_sites():
    """The target is the model's own log p(x, z, w) at the guide's w, with no scale."""
    torch.manual_seed(0)
    x, z = torch.randn(5, 2), torch.randn(7, 5, 2)  # an extra left dim: particles
    log_s = torch.tensor(-0.7)
    log_joint = model_log_joint(Hierarchical(), (x,), {}, {"log_s": log_s}, "z")
    with pyro.plate("data", 1000, subsample_size=5):  # an outer plate of the same name
        value = log_joint(z)
    expected = (dist.Normal(0.0, 1.0).log_prob(log_s) + dist.Normal(0.0, 1.0).log_prob(z).sum()
                + dist.Normal(z, log_s.exp()).log_prob(x).sum())
    assert torch.allclose(value, expected)


@pytest.mark.parametrize("wrapper", [HamiltonianGuide, LangevinGuide])
def test_both_flows_train_on_a_user_model_with_a_global_site(wrapper):
    torch.manual_seed(0)
    x = torch.randn(30, 2) * 1.5
    model = Hierarchical()
    guide = wrapper(model, HierarchicalGuide(), 2, steps=2)
    before = guide.flow.log_step_size.detach().clone()
    result = train(model, guide, x, num_steps=30, batch_size=30, lr=0.02, progress=False, seed=0)
    assert math.isfinite(result.final_loss)
    assert not torch.equal(before, guide.flow.log_step_size.detach())
    late = wrapper(model, HierarchicalGuide(global_first=False), 2, steps=2)
    with pytest.raises(ValueError, match="'log_s' has no value"):
        late(x)


def test_bad_input_is_refused_by_name():
    model, x = _linear_gaussian()
    with pytest.raises(ValueError, match="latent_dim=3"):
        HamiltonianGuide(model, MeanField(3, 2), 3, steps=2)(x)
    with pytest.raises(ValueError, match="steps"):
        HamiltonianFlow(2, steps=0)
    with pytest.raises(ValueError, match="init_beta0"):
        HamiltonianFlow(2, init_beta0=1.5)
    with pytest.raises(ValueError, match="drew no site named 'w'"):
        HamiltonianGuide(model, MeanField(3, 2), 2, site="w")(x)
    with pytest.raises(TypeError, match="model must be"):
        LangevinGuide(None, MeanField(3, 2), 2)
