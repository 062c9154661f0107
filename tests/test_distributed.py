"""Data-parallel training and EM on 2 CPU processes (gloo, loopback), against one process.

The 2-process runs happen in one spawn (``run_local``) per test module: each worker trains a VAE
and a VRNN with global batch B (B/2 per process) and fits a sharded GMM and PPCA, and rank 0
saves what it got; the parent computes the same in one process and compares.
"""

import pyro
import pytest
import torch
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import Dataset

from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.em import PPCA, GaussianMixture
from pyro_seqlatent.em.distributed import DistributedGaussianMixture, DistributedPPCA, shard_rows
from pyro_seqlatent.infer import train
from pyro_seqlatent.infer.distributed import ExampleNoise
from pyro_seqlatent.models.vae import VAE, VAEGuide
from pyro_seqlatent.models.vrnn import build_vrnn
from pyro_seqlatent.nn.ode import CountingField
from pyro_seqlatent.parallel import derived_seed, local_batch_size, world
from pyro_seqlatent.testing import count_host_syncs, run_local

pytestmark = pytest.mark.timeout(150)  # the spawned jobs have their own, shorter timeouts

STEPS, BATCH, SEED = 6, 8, 3  # 32 examples: 4 steps per epoch, so the run crosses an epoch


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def vae_setup():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(32, 6, generator=g) < 0.4).float()
    torch.manual_seed(0)
    model = VAE(6, 2, (8,), "bernoulli")
    guide = VAEGuide(6, 2, (8,), guide="iaf", num_flows=1)
    return model, guide, Items(list(x)), None


def vrnn_setup():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 7, (32,), generator=g)
    seqs = [(torch.rand(int(t), 4, generator=g) < 0.3).float() for t in lengths]
    torch.manual_seed(0)
    model, guide = build_vrnn(4, z_dim=2, h_dim=6, feature_dim=5, hidden_dim=6)
    return model, guide, Items(seqs), pad_collate


def gmm_data():
    g = torch.Generator().manual_seed(2)
    centers = torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 3.0]], dtype=torch.float64)
    labels = torch.randint(0, 3, (601,), generator=g)
    return centers[labels] + torch.randn(601, 3, generator=g, dtype=torch.float64)


GMM_KW = {"covariance_type": "full", "tol": 0.0, "max_iter": 15, "random_state": 0,
          "chunk_size": 64, "init_max_samples": 200}
PPCA_KW = {"tol": 0.0, "max_iter": 20, "random_state": 0, "chunk_size": 50}


def ppca_data():
    x = gmm_data() @ torch.tensor([[1.0, 0.5, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0],
                                   [0.3, 0.0, 1.0, 1.0]], dtype=torch.float64)
    x[::7, 1] = float("nan")  # missing values too
    return x


def fit_models(setup, out=None, steps=STEPS, resume=False):
    model, guide, data, collate = setup()
    train(model, guide, data, collate_fn=collate, num_steps=steps, batch_size=BATCH, lr=0.02,
          seed=SEED, example_noise=True, progress=False, clip_norm=5.0, run_dir=out,
          resume=resume)
    return {k: v.detach().clone() for k, v in {**model.state_dict(),
                                               **guide.state_dict()}.items()}


def fit_averaged(rank=0):
    """The VAE with Polyak averaging; a process other than rank 0 starts from other weights,
    which rank 0's broadcast must replace, in the average too."""
    model, guide, data, collate = vae_setup()
    if rank:
        with torch.no_grad():
            for p in [*model.parameters(), *guide.parameters()]:
                p.add_(0.5)
    train(model, guide, data, num_steps=STEPS, batch_size=BATCH, lr=0.02, seed=SEED,
          example_noise=True, progress=False, clip_norm=5.0, ema_decay=0.5)
    return {k: v.detach().clone() for k, v in {**model.state_dict(),
                                               **guide.state_dict()}.items()}


class Scale(CountingField):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def field(self, t, z):
        return self.w * z


class CountedVAE(VAE):
    """A VAE whose model evaluates a counting field once per call (one backward product too)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.counted = Scale()

    def forward(self, x):
        return super().forward(x + 0.0 * self.counted(None, x))


def nfe_history():
    """Per-step (forward, backward) NFE of the model in the metrics of a short training run."""
    torch.manual_seed(0)
    model, _, data, _ = vae_setup()
    model = CountedVAE(6, 2, (8,), "bernoulli")
    result = train(model, VAEGuide(6, 2, (8,)), data, num_steps=3, batch_size=BATCH, lr=0.02,
                   seed=SEED, progress=False)
    return torch.tensor([[r["model_nfe_forward"], r["model_nfe_backward"]]
                         for r in result.history])


def _worker(rank, out_dir):
    pyro.clear_param_store()
    results = {"vae": fit_models(vae_setup, f"{out_dir}/vae-run"),
               "vrnn": fit_models(vrnn_setup), "nfe": nfe_history(),
               "vae_averaged": fit_averaged(rank)}
    fit_models(vrnn_setup, f"{out_dir}/to-resume", steps=STEPS - 3)  # finished by 1 process
    x = gmm_data()
    gmm = DistributedGaussianMixture(3, **GMM_KW).fit(x[shard_rows(len(x))])
    results["gmm"] = {"means": gmm.means_, "covariances": gmm.covariances_,
                      "history": torch.tensor(gmm.log_likelihood_history_)}
    y = ppca_data()
    ppca = DistributedPPCA(2, **PPCA_KW).fit(y[shard_rows(len(y))])
    results["ppca"] = {"W": ppca.components_, "mu": ppca.mean_, "s2": ppca.noise_variance_}
    results["world"] = torch.tensor(world())
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _failing_worker(rank):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()  # would wait for rank 1 forever without the launcher's watch


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_local(_worker, 2, str(out), timeout_s=90)
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt"), out


@pytest.mark.parametrize("setup, name", [(vae_setup, "vae"), (vrnn_setup, "vrnn")])
def test_two_processes_equal_one_process_with_the_global_batch(two_process_results, setup,
                                                               name):
    rank0, rank1, _ = two_process_results
    assert rank0["world"].tolist() == [0, 2]
    single = fit_models(setup)
    moved = 0.0
    model, guide, *_ = setup()
    start = {**model.state_dict(), **guide.state_dict()}
    for key, value in single.items():
        torch.testing.assert_close(rank0[name][key], value, rtol=1e-4, atol=2e-5, msg=key)
        torch.testing.assert_close(rank1[name][key], rank0[name][key], rtol=0, atol=0)
        moved = max(moved, float((value - start[key]).abs().max()))
    assert moved > 1e-3  # the parameters did move: the comparison is not vacuous


def test_the_parameter_average_is_rank0s_on_every_process(two_process_results):
    rank0, rank1, _ = two_process_results
    single = fit_averaged()
    for key, value in single.items():
        torch.testing.assert_close(rank1["vae_averaged"][key], rank0["vae_averaged"][key],
                                   rtol=0, atol=0)
        torch.testing.assert_close(rank0["vae_averaged"][key], value, rtol=1e-4, atol=2e-5,
                                   msg=key)


def test_the_logged_function_evaluations_are_summed_over_processes(two_process_results):
    rank0, _, _ = two_process_results
    assert nfe_history().tolist() == [[1, 1]] * 3  # one process: one evaluation per step
    assert rank0["nfe"].tolist() == [[2, 2]] * 3  # two processes: one each, summed


def test_without_example_noise_the_runs_differ(two_process_results):
    """Negative control: with the ordinary global RNG, the 2-process run sees other noise."""
    rank0, _, _ = two_process_results
    model, guide, data, collate = vae_setup()
    train(model, guide, data, num_steps=STEPS, batch_size=BATCH, lr=0.02, seed=SEED,
          progress=False, clip_norm=5.0)
    params = {**model.state_dict(), **guide.state_dict()}
    gap = max(float((params[k] - rank0["vae"][k]).abs().max()) for k in params)
    assert gap > 1e-3


def test_rank0_alone_writes_the_run_folder(two_process_results):
    _, _, out = two_process_results
    run = out / "vae-run"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == STEPS  # one writer, one row per step
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl",
                                                      "train_config.json"]


def test_resume_with_another_number_of_processes(two_process_results):
    """2 processes train 3 steps, 1 process resumes to 6: the same as 6 steps in one process
    (global step, data position and optimizer state travel in the checkpoint)."""
    _, _, out = two_process_results
    resumed = fit_models(vrnn_setup, out / "to-resume", resume=True)
    single = fit_models(vrnn_setup)
    for key, value in single.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=2e-5, msg=key)
    rows = (out / "to-resume" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == STEPS


def test_sharded_gmm_and_ppca_equal_single_process_fits(two_process_results):
    rank0, rank1, _ = two_process_results
    x = gmm_data()
    gmm = GaussianMixture(3, **GMM_KW).fit(x)
    torch.testing.assert_close(rank0["gmm"]["means"], gmm.means_, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rank0["gmm"]["covariances"], gmm.covariances_, rtol=1e-9,
                               atol=1e-9)
    torch.testing.assert_close(rank0["gmm"]["history"],
                               torch.tensor(gmm.log_likelihood_history_), rtol=1e-10, atol=0)
    torch.testing.assert_close(rank1["gmm"]["means"], rank0["gmm"]["means"], rtol=0, atol=0)
    # PPCA initialises from the first 100,000 rows, i.e. rank 0's shard alone here: the
    # single-process reference starts from that same point and runs EM on all rows
    y = ppca_data()
    ppca = PPCA(2, **PPCA_KW)
    ppca._initialize(ppca._source(y[shard_rows(len(y), 0, 2)]))
    for _ in range(PPCA_KW["max_iter"]):
        ppca.m_step(ppca.accumulate_statistics(ppca._source(y)))
    torch.testing.assert_close(rank0["ppca"]["W"], ppca.components_, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(rank0["ppca"]["mu"], ppca.mean_, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(rank0["ppca"]["s2"], ppca.noise_variance_, rtol=1e-8, atol=0)
    # negative control: a shard alone gives another fit
    half = GaussianMixture(3, **GMM_KW).fit(x[shard_rows(len(x), 0, 2)])
    assert float((half.means_ - gmm.means_).abs().max()) > 1e-3


def test_a_failing_process_stops_the_job_with_its_error():
    import time

    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="rank 1 fails on purpose"):
        run_local(_failing_worker, 2, timeout_s=60)
    assert time.monotonic() - start < 60


def test_timeout_kills_a_hung_job():
    with pytest.raises(TimeoutError, match="did not finish within"):
        run_local(_sleeping_worker, 1, timeout_s=3)


def _sleeping_worker(rank):
    import time

    time.sleep(60)


def test_example_noise_depends_on_the_example_not_the_batch():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", pyro.distributions.Normal(x, 1.0).to_event(1))

    x = torch.zeros(4, 3)
    with ExampleNoise([5, 6, 7, 8], seed=1, step=2):
        z_all = guide(x)
    with ExampleNoise([7, 5], seed=1, step=2):
        z_two = guide(x[:2])
    torch.testing.assert_close(z_two, z_all[[2, 0]], rtol=0, atol=0)
    with ExampleNoise([5, 6, 7, 8], seed=1, step=3):
        assert not torch.equal(guide(x), z_all)  # a new step, new noise
    with pytest.raises(ValueError, match="example indices"), ExampleNoise([1], seed=0, step=0):
        guide(x)
    assert derived_seed(1, "a") == derived_seed(1, "a") != derived_seed(1, "b")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not divisible"):
        local_batch_size(10, 4)
    with pytest.raises(ValueError, match="rank must lie"):
        shard_rows(10, 3, 2)
    assert [shard_rows(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    model, guide, data, _ = vae_setup()
    with pytest.raises(ValueError, match="example_noise"):
        train(model, guide, data, num_steps=1, elbo="JitTrace_ELBO", example_noise=True,
              progress=False)


def test_trainer_makes_one_host_sync_per_step():
    """The loop's own syncs: one ``.cpu().tolist()`` per step (the model here makes none).
    ``.item()`` calls are not the loop's: Pyro's ``Trace_ELBO.differentiable_loss`` calls it once
    per sample site and once on the loss, and Adam on its CPU step counter (no device wait);
    benchmarks/scaling.py reports those counts per model."""
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", pyro.distributions.Normal(self.loc, 1.0).to_event(1), obs=x)

    class Guide(nn.Module):
        def forward(self, x):
            pass

    data = Items(list(torch.randn(16, 2)))

    def run(steps):
        pyro.clear_param_store()
        with count_host_syncs() as counts:
            train(Model(), Guide(), data, num_steps=steps, batch_size=4, progress=False)
        return counts

    few, many = run(1), run(3)  # one epoch (the sampler's CPU randperm().tolist() is per epoch)
    per_step = {k: (many[k] - few[k]) / 2 for k in many}
    assert per_step["tolist"] == 1 and per_step["cpu"] == 1


def test_cli_nproc_relaunches_under_torchrun():
    from pyro_seqlatent.experiments.launch import torchrun_command

    cmd = torchrun_command(["vrnn", "--nproc", "2", "--run-dir", "old", "--lr=0.1",
                            "--nproc=3"], 2, "runs/x")
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m"]
    assert cmd[6:] == ["pyro_seqlatent.cli", "train", "vrnn", "--lr=0.1", "--run-dir", "runs/x"]


def _late_worker(rank):
    import time

    from pyro_seqlatent.parallel import health_check, init_distributed

    init_distributed()
    if rank == 1:
        time.sleep(6)  # hangs, as far as the others can tell
    health_check(timeout_s=1.5)


def test_the_health_check_names_the_rank_that_hangs():
    import time

    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match=r"rank 1 did not reach the health check"):
        run_local(_late_worker, 2, timeout_s=60)
    assert time.monotonic() - start < 30  # seconds, not the 300 s collective timeout


def _processes_mentioning(text):
    """PIDs of the live processes whose command line contains ``text``."""
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = next(line for line in (entry / "status").read_text().splitlines()
                             if line.startswith("State:"))
            except (OSError, StopIteration):
                continue
            if text in cmdline and "zombie" not in state:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stopping_the_launcher_leaves_no_process_behind(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / f"nproc-{sig}"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pyro_seqlatent.cli", "train", "rnn_dt", "--nproc", "2",
         "--n-series", "40", "--batch-size", "4", "--num-steps", "100000", "--no-progress",
         "--run-dir", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size):
            assert launcher.poll() is None, "the launcher stopped by itself"
            assert time.monotonic() < deadline, "the workers never started training"
            time.sleep(0.5)
        assert len(_processes_mentioning(str(run))) >= 4  # launcher, torchrun, 2 workers
        launcher.send_signal(getattr(signal, sig))
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 10
        while _processes_mentioning(str(run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_mentioning(str(run)) == []
    finally:
        import os

        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in _processes_mentioning(str(run)):
            os.kill(pid, signal.SIGKILL)
