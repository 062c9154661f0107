"""VRNN and RNN baselines: ELBO against a hand computation, masks, KL estimators, particles,
generation, the mixture emission and input checks."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.guides import FlowGuide
from pyro_seqlatent.infer import log_marginal
from pyro_seqlatent.models.rnn_baselines import build_rnn
from pyro_seqlatent.models.vrnn import GMMEmission, build_vrnn, forecast
from pyro_seqlatent.transforms.iaf import ConditionalIAF

SMALL = dict(z_dim=3, h_dim=5, feature_dim=4, hidden_dim=8, num_components=3)


def ragged_batch(d=6, lengths=(4, 2, 3), binary=True):
    seqs = [torch.rand(n, d) for n in lengths]
    if binary:
        seqs = [s.round() for s in seqs]
    return pad_collate(seqs)


def seeded_loss(elbo, model, guide, batch, seed=3):
    pyro.set_rng_seed(seed)
    return elbo.loss(model, guide, **batch)


def _log_normal(v, loc, scale):
    return (-0.5 * ((v - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


@pytest.mark.parametrize("decoder_h", [True, False])
def test_elbo_equals_hand_computation_for_three_steps(decoder_h):
    """Trace_ELBO's single-sample loss = −Σ_t m_t[log p(x_t|z_t,h_{t−1}) + log p(z_t|h_{t−1})
    − log q(z_t|x_t,h_{t−1})], recomputed here step by step from the networks' weights and the
    guide's z (fixed noise), with the last step of sequence 1 padded; with decoder_h=False the
    emission reads φ_z(z_t) alone."""
    model, guide = build_vrnn(6, emission="bernoulli", decoder_h=decoder_h, **SMALL)
    batch = ragged_batch(lengths=(3, 2))
    x, mask = batch["x"], batch["mask"]
    loss = seeded_loss(Trace_ELBO(), model, guide, batch)
    pyro.set_rng_seed(3)
    trace = poutine.trace(guide).get_trace(x, mask)
    core = model.core
    total = torch.zeros(2)
    with torch.no_grad():
        h = torch.zeros(2, core.h_dim)
        for t in range(3):
            z = trace.nodes[f"z_{t}"]["value"]
            fx = torch.relu(core.phi_x[0](x[:, t]))
            q_loc, q_raw = guide.site_guide.net(torch.cat([fx, h], -1)).chunk(2, -1)
            p_loc, p_raw = core.prior_net(h).chunk(2, -1)
            fz = torch.relu(core.phi_z[0](z))
            logits = core.emission.net(torch.cat([fz, h], -1) if decoder_h else fz)
            log_px = (x[:, t] * torch.nn.functional.logsigmoid(logits)
                      + (1 - x[:, t]) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
            log_pz = _log_normal(z, p_loc, torch.nn.functional.softplus(p_raw) + 1e-3)
            log_qz = _log_normal(z, q_loc, torch.nn.functional.softplus(q_raw) + 1e-4)
            total += mask[:, t] * (log_px + log_pz - log_qz)
            h = core.rnn.cell(torch.cat([fx, fz], -1), h)
    assert loss == pytest.approx(-total.sum().item(), rel=1e-5)


@pytest.mark.parametrize("emission", ["bernoulli", "gaussian", "gmm"])
def test_padded_values_do_not_change_the_loss(emission):
    model, guide = build_vrnn(6, emission=emission, **SMALL)
    batch = ragged_batch(binary=emission == "bernoulli")
    changed = {"x": batch["x"].clone(), "mask": batch["mask"]}
    pad = ~batch["mask"]
    changed["x"][pad] = 1.0 - changed["x"][pad] if emission == "bernoulli" else 7.0
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        a = seeded_loss(elbo, model, guide, batch)
        b = seeded_loss(elbo, model, guide, changed)
        assert a == pytest.approx(b, rel=1e-6)
    # and the padded steps matter when the mask is dropped (the test can fail)
    full = {"x": changed["x"], "mask": torch.ones_like(batch["mask"])}
    assert abs(seeded_loss(Trace_ELBO(), model, guide, full) - a) > 1.0
    rnn, empty = build_rnn(6, emission=emission, h_dim=5, feature_dim=4, hidden_dim=8,
                           num_components=3)
    assert Trace_ELBO().loss(rnn, empty, **batch) == pytest.approx(
        Trace_ELBO().loss(rnn, empty, **changed), rel=1e-6)


@pytest.mark.parametrize("guide_kind, particles", [("meanfield", 1), ("iaf", 3)])
def test_model_reusing_guide_states_equals_naive_model(guide_kind, particles):
    """Reusing the guide's h_t changes no value or gradient (only the cost), also with the
    IAF flow guide and vectorized particles."""
    model, guide = build_vrnn(6, rnn="lstm", guide=guide_kind, **SMALL)
    batch = ragged_batch()
    params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1,
                      max_plate_nesting=1)
    results = []
    for reuse in (True, False):
        model.core.reuse_guide_states = reuse
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(model, guide, **batch)
        grads = torch.autograd.grad(loss, params)
        results.append((loss, grads))
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-6)
    for g1, g2 in zip(results[0][1], results[1][1]):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-5)


def test_iaf_guide_is_the_projects_flow_guide_and_its_density_is_exact_under_particles():
    """guide="iaf" is pyro_seqlatent.guides.FlowGuide with conditional IAFs; inside a particle
    plate its log q(z_t) equals the change of variables recomputed here: the base log density
    of the flow's inverse minus log|det J| from an autograd Jacobian, particle by particle."""
    model, guide = build_vrnn(6, guide="iaf", num_flows=2, **SMALL)
    assert isinstance(guide.site_guide, FlowGuide) and guide.site_guide.flow == "iaf"
    assert all(isinstance(f, ConditionalIAF) for f in guide.site_guide.flows.transforms)
    for flow in guide.site_guide.flows.transforms:  # non-trivial flows (MADE outputs start at 0)
        torch.nn.init.normal_(flow.made.out.weight, std=0.3)
    batch = ragged_batch(lengths=(3, 3, 2))
    with pyro.plate("particles", 4, dim=-2):
        trace = poutine.trace(guide).get_trace(**batch)
    node = trace.nodes["z_1"]
    q, z = node["fn"], node["value"]
    assert z.shape == (4, 3, SMALL["z_dim"])
    q = q.base_dist if isinstance(q, dist.MaskedDistribution) else q
    flow = q.transforms[0]
    with torch.no_grad():
        log_q = q.log_prob(z)
        z0 = flow.inv(z.clone())  # a new tensor: the sequential inverse, not the cache
    for p, b in ((0, 0), (3, 2), (2, 1)):
        def push(v, p=p, b=b):
            full = z0.clone()
            full[p, b] = v
            return flow(full)[p, b]

        jac = torch.autograd.functional.jacobian(push, z0[p, b])
        base = q.base_dist.log_prob(z0)[p, b]
        expected = base - torch.linalg.slogdet(jac)[1]
        assert log_q[p, b].item() == pytest.approx(expected.item(), abs=1e-4)
    # the flow is really there: log q differs from the base density at the same point
    assert (log_q - q.base_dist.log_prob(z)).abs().max() > 1e-2


def test_model_recomputes_after_a_conditioned_site():
    """A replayed z_t that is not the guide's tensor switches the model to its own recurrence."""
    model, guide = build_vrnn(6, **SMALL)
    batch = ragged_batch()
    trace = poutine.trace(guide).get_trace(**batch)
    z1 = trace.nodes["z_1"]["value"].clone()  # same values, another tensor
    conditioned = poutine.condition(poutine.replay(model, trace=trace), data={"z_1": z1})
    mt = poutine.trace(conditioned).get_trace(**batch)
    model.core.reuse_guide_states = False
    mt_naive = poutine.trace(poutine.replay(model, trace=trace)).get_trace(**batch)
    assert mt.log_prob_sum().item() == pytest.approx(mt_naive.log_prob_sum().item(), rel=1e-6)


def _seeded_model_log_prob(model, guide_trace, batch, seed, data=None):
    replayed = poutine.replay(model, trace=guide_trace)
    if data is not None:
        replayed = poutine.condition(replayed, data=data)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return poutine.trace(replayed).get_trace(**batch).log_prob_sum().item()


def test_dropout_masks_are_shared_by_guide_and_model():
    """With dropout, the model uses the guide's φ_x mask also when it recomputes the
    recurrence (a conditioned z_t): the same log p as when it reuses the guide's states, which
    a fresh φ_x mask would change. The decoder's own mask is drawn from the same RNG state."""
    model, guide = build_vrnn(6, dropout=0.5, **SMALL)
    batch = ragged_batch()
    assert model.training and guide.training
    pyro.set_rng_seed(0)
    stash = []
    trace = poutine.trace(guide).get_trace(**batch)
    stash.append(model.core._guide_states)
    reused = _seeded_model_log_prob(model, trace, batch, seed=11)
    model.core.stash(stash[0])
    z0 = trace.nodes["z_0"]["value"].clone()  # another tensor: recompute from step 0
    recomputed = _seeded_model_log_prob(model, trace, batch, seed=11, data={"z_0": z0})
    assert recomputed == pytest.approx(reused, rel=1e-6)
    # the masks are real: a fresh φ_x mask (naive model) gives another value
    model.core.reuse_guide_states = False
    naive = _seeded_model_log_prob(model, trace, batch, seed=11)
    assert abs(naive - reused) > 1e-3


def test_dropout_is_off_in_eval_mode_and_evaluation_uses_eval_mode():
    """eval(): the loss equals that of the same weights without dropout; log_marginal switches
    to eval mode by itself and gives the modules their modes back."""
    model, guide = build_vrnn(6, dropout=0.5, **SMALL)
    plain_model, plain_guide = build_vrnn(6, **SMALL)
    plain_model.load_state_dict(model.state_dict())
    plain_guide.load_state_dict(guide.state_dict())
    batch = ragged_batch()
    train_loss = seeded_loss(Trace_ELBO(), model, guide, batch)
    plain_loss = seeded_loss(Trace_ELBO(), plain_model, plain_guide, batch)
    assert abs(train_loss - plain_loss) > 1e-3  # dropout acts in train mode
    model.eval()
    guide.eval()
    assert seeded_loss(Trace_ELBO(), model, guide, batch) == pytest.approx(plain_loss, rel=1e-6)
    model.train()
    guide.train()
    pyro.set_rng_seed(2)
    est = log_marginal(model, guide, batch, num_samples=20)
    pyro.set_rng_seed(2)
    plain = log_marginal(plain_model, plain_guide, batch, num_samples=20)
    assert torch.allclose(est.log_marginal, plain.log_marginal, rtol=1e-5)
    assert model.training and guide.training and model.core.dropout.training


def test_dropout_option_is_checked():
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="dropout must be a probability"):
            build_vrnn(6, dropout=bad)
        with pytest.raises(ValueError, match="dropout must be a probability"):
            build_rnn(6, dropout=bad)


def test_rnn_baseline_dropout_acts_in_train_mode_only():
    rnn, empty = build_rnn(6, h_dim=5, feature_dim=4, hidden_dim=8, dropout=0.5)
    plain, _ = build_rnn(6, h_dim=5, feature_dim=4, hidden_dim=8)
    plain.load_state_dict(rnn.state_dict())
    batch = ragged_batch()
    reference = seeded_loss(Trace_ELBO(), plain, empty, batch)
    assert abs(seeded_loss(Trace_ELBO(), rnn, empty, batch) - reference) > 1e-3
    rnn.eval()
    assert seeded_loss(Trace_ELBO(), rnn, empty, batch) == pytest.approx(reference, rel=1e-6)


def test_smoothing_guide_reads_each_sequence_backwards_from_its_own_end():
    """a_t equals a backward GRU run on each sequence alone (no padding); padded values do not
    change the loss; a later frame changes q(z_t) of the smoothing guide only."""
    from pyro_seqlatent.models.vrnn import reverse_within_lengths

    model, guide = build_vrnn(6, smoothing=True, **SMALL)
    batch = ragged_batch(lengths=(4, 2, 3))
    x, mask = batch["x"], batch["mask"]
    with torch.no_grad():
        phi = model.core.features_x(x.masked_fill(~mask.unsqueeze(-1), 0.0))
        future = guide._backward_states(phi, mask)
        for b, n in enumerate((4, 2, 3)):
            alone, _ = guide.backward_rnn(phi[b:b + 1, :n].flip(1))
            expected = alone.flip(1)[0]  # a_t for t < n
            got = torch.stack([future[t][b] for t in range(n)])
            assert torch.allclose(got, expected, atol=1e-6)
    lengths = mask.sum(-1)
    assert torch.equal(reverse_within_lengths(reverse_within_lengths(x, lengths), lengths), x)
    changed = {"x": x.clone(), "mask": mask}
    changed["x"][~mask] = 1.0 - changed["x"][~mask]
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        assert seeded_loss(elbo, model, guide, batch) == pytest.approx(
            seeded_loss(elbo, model, guide, changed), rel=1e-6)

    def q_loc_at_0(g, data):
        trace = poutine.trace(g).get_trace(data, mask)
        fn = trace.nodes["z_0"]["fn"]
        return (fn.base_dist if isinstance(fn, dist.MaskedDistribution) else fn).mean
    later = x.clone()
    later[0, 2] = 1.0 - later[0, 2]  # frame 2 of sequence 0
    assert not torch.allclose(q_loc_at_0(guide, x)[0], q_loc_at_0(guide, later)[0])
    _, filtering = build_vrnn(6, **SMALL)
    assert torch.allclose(q_loc_at_0(filtering, x)[0], q_loc_at_0(filtering, later)[0])
    with pytest.raises(ValueError, match="prefix of every"):
        holes = mask.clone()
        holes[0, 1] = False
        guide(x, holes)


def test_smoothing_guide_registers_its_backward_rnn_for_svi():
    pyro.clear_param_store()
    model, guide = build_vrnn(6, smoothing=True, register_params=True, **SMALL)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    before = guide.backward_rnn.weight_hh_l0.detach().clone()
    svi.step(**ragged_batch())
    assert any(name.startswith("vrnn_guide_backward") for name in pyro.get_param_store())
    assert not torch.equal(before, guide.backward_rnn.weight_hh_l0)
    with pytest.raises(ValueError, match="smoothing must be True or False"):
        build_vrnn(6, smoothing="false")
    pyro.clear_param_store()


def test_analytic_and_monte_carlo_kl_agree_in_expectation():
    model, guide = build_vrnn(6, **SMALL)
    batch = ragged_batch()
    n = 4000
    pyro.set_rng_seed(0)
    mc = Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    mf = TraceMeanField_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        a, b = mc.loss(model, guide, **batch), mf.loss(model, guide, **batch)
        # per-particle spread to set the tolerance
        single = [Trace_ELBO().loss(model, guide, **batch) for _ in range(200)]
        single_mf = [TraceMeanField_ELBO().loss(model, guide, **batch) for _ in range(200)]
    sd = torch.tensor(single).std().item()
    assert abs(a - b) < 4 * sd / math.sqrt(n) + 1e-3
    assert sd > 0.1  # the estimators are really stochastic here
    # and the mean-field ELBO really takes the per-step KL in closed form: only the
    # reconstruction term is sampled, so its spread is far below the Monte Carlo KL's
    assert torch.tensor(single_mf).std().item() < 0.25 * sd


@pytest.mark.parametrize("kind", ["vrnn", "vrnn_iaf", "rnn"])
def test_log_marginal_with_particles(kind):
    batch = ragged_batch()
    if kind == "rnn":
        model, guide = build_rnn(6, h_dim=5, feature_dim=4, hidden_dim=8)
    else:
        model, guide = build_vrnn(6, guide="iaf" if kind == "vrnn_iaf" else "meanfield",
                                  **SMALL)
    est = log_marginal(model, guide, batch, num_samples=300, chunk_size=100)
    assert est.log_marginal.shape == (3,)
    assert torch.isfinite(est.log_marginal).all()
    assert (est.log_marginal >= est.elbo - 1e-4).all()  # IWAE bound ≥ ELBO average
    if kind == "rnn":  # no latents: log p(x) is exact and equals −loss
        loss = Trace_ELBO().loss(model, guide, **batch)
        assert est.log_marginal.sum().item() == pytest.approx(-loss, rel=1e-5)
    else:
        single = torch.tensor([-Trace_ELBO().loss(model, guide, **batch) for _ in range(100)])
        # the mean ELBO over the 300 particles matches the mean of 100 plain ELBO draws
        tol = 4 * single.std().item() * (1 / 300 + 1 / 100) ** 0.5 + 1e-3
        assert est.elbo.sum().item() == pytest.approx(single.mean().item(), abs=tol)


@pytest.mark.parametrize("emission", ["bernoulli", "gaussian", "gmm"])
def test_generation_from_the_prior_alone_and_forecast(emission):
    model, guide = build_vrnn(6, emission=emission, **SMALL)
    gen = model(length=7, num_sequences=4)
    assert gen.shape == (4, 7, 6) and torch.isfinite(gen).all()
    trace = poutine.trace(model).get_trace(length=3, num_sequences=2)
    assert {"z_0", "x_0", "z_2", "x_2"} <= set(trace.nodes)
    prefix = ragged_batch(lengths=(4, 4), binary=emission == "bernoulli")["x"]
    cont = forecast(model, guide, prefix, horizon=5, num_samples=3)
    assert cont.shape == (3, 2, 5, 6)
    assert not torch.equal(cont[0], cont[1])  # samples differ
    rnn, empty = build_rnn(6, emission=emission, h_dim=5, feature_dim=4, hidden_dim=8,
                           num_components=3)
    assert rnn(length=5, num_sequences=2).shape == (2, 5, 6)
    out = rnn(prefix, horizon=3)
    assert out.shape == (2, 7, 6) and torch.equal(out[:, :4], prefix)


def test_gmm_log_likelihood_equals_direct_mixture():
    torch.manual_seed(0)
    head = GMMEmission(5, 4, (7,), num_components=3, min_scale=1e-3).double()
    u, x = torch.randn(10, 5).double(), torch.randn(10, 4).double()
    lp = head(u).log_prob(x)
    out = head.net(u)
    logits, rest = out[:, :3], out[:, 3:].reshape(10, 3, 8)
    loc, scale = rest[..., :4], torch.nn.functional.softplus(rest[..., 4:]) + 1e-3
    weights = torch.softmax(logits, -1)
    dens = torch.exp(-0.5 * ((x[:, None] - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    direct = torch.log((weights * dens.prod(-1)).sum(-1))
    assert torch.allclose(lp, direct, atol=1e-10)
    # and not the lower bound Σπ·log N (differs)
    wrong = (weights * dens.prod(-1).log()).sum(-1)
    assert (lp - wrong).min() > 1e-3


def test_standard_prior_variant_and_iaf_guide_train_one_step():
    for opts in (dict(prior="standard"), dict(guide="iaf")):
        model, guide = build_vrnn(6, **SMALL, **opts)
        batch = ragged_batch()
        params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
        loss = Trace_ELBO().differentiable_loss(model, guide, **batch)
        loss.backward()
        assert all(p.grad is not None for p in params)
    if True:  # VRNN-I: the prior has no parameters and z_t ~ N(0, I)
        model, _ = build_vrnn(6, **SMALL, prior="standard")
        tr = poutine.trace(model).get_trace(length=2, num_sequences=3)
        fn = tr.nodes["z_1"]["fn"].base_dist
        assert torch.equal(fn.loc, torch.zeros(3, 3)) and torch.equal(fn.scale, torch.ones(3, 3))


def test_decoder_without_h_generates_and_reuses_the_guide_states_under_particles():
    model, guide = build_vrnn(6, decoder_h=False, **SMALL)
    assert model.core.emission.net.net[0].in_features == SMALL["feature_dim"]
    assert model(length=4, num_sequences=2).shape == (2, 4, 6)
    batch = ragged_batch()
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    losses = []
    for reuse in (True, False):
        model.core.reuse_guide_states = reuse
        pyro.set_rng_seed(5)
        losses.append(elbo.loss(model, guide, **batch))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_bad_input_gives_clear_errors():
    model, guide = build_vrnn(6, **SMALL)
    x = torch.zeros(2, 3, 6)
    with pytest.raises(ValueError, match="x_dim=6"):
        guide(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="mask has shape"):
        model(x, torch.ones(2, 4, dtype=torch.bool))
    bad = x.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        guide(bad)
    with pytest.raises(ValueError, match="length=T and num_sequences"):
        model()
    with pytest.raises(ValueError, match="emission must be one of"):
        build_vrnn(6, emission="poisson")
    with pytest.raises(ValueError, match="guide must be"):
        build_vrnn(6, guide="flowy")
    with pytest.raises(ValueError, match="z_dim"):
        build_vrnn(6, z_dim=0)
    with pytest.raises(ValueError, match="decoder_h must be True or False"):
        build_vrnn(6, decoder_h="no")
