"""Run folders are safe to open and hard to lose: a checkpoint never runs code through any entry
point, unreadable files give one clear error naming them, an interrupted save leaves nothing
behind, and a run that blows up keeps its last checkpoint from before the blow-up."""

import ast
import json
import os
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import TensorDataset

from pyro_seqlatent.cli import main
from pyro_seqlatent.infer import TrainingDiverged, load_run, train
from pyro_seqlatent.infer.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    load_checkpoint,
)
from pyro_seqlatent.infer.checkpointing import restore_modules
from pyro_seqlatent.models.conjugate import AffineNormalGuide, NormalNormal

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_seqlatent"


class Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(path: Path, marker: Path) -> None:
    ckpt = load_checkpoint(path) if path.exists() else {}
    torch.save({**ckpt, "model": Payload(marker)}, path)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run folder of a registered system (toy data, two steps, both checkpoints)."""
    run = tmp_path_factory.mktemp("runs") / "rnn_dt"
    assert main(["train", "rnn_dt", "--n-series", "20", "--num-steps", "2", "--batch-size", "4",
                 "--train-options", '{"valid_every": 1, "checkpoint_every": 1}',
                 "--no-progress", "--run-dir", str(run)]) == 0
    assert (run / "best.pt").exists() and (run / "checkpoint.pt").exists()
    return run


@pytest.fixture
def poisoned(cli_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    marker = tmp_path / "pwned"
    for name in ("best.pt", "checkpoint.pt"):
        poison(run / name, marker)
    return run, marker


def test_a_poisoned_checkpoint_runs_nothing_through_any_entry_point(poisoned, capsys):
    run, marker = poisoned
    for name in ("best.pt", "checkpoint.pt"):
        with pytest.raises(UnsafeCheckpointError, match="nothing in it was run"):
            load_checkpoint(run / name)
    with pytest.raises(UnsafeCheckpointError):
        load_run(run)
    with pytest.raises(UnsafeCheckpointError):
        load_run(run, which="last")
    with pytest.raises(UnsafeCheckpointError):
        restore_modules(run / "checkpoint.pt", torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    capsys.readouterr()
    for argv in (["evaluate", str(run), "--num-samples", "2"], ["sample", str(run), "-n", "2"],
                 ["train", "rnn_dt", "--n-series", "20", "--num-steps", "3", "--batch-size",
                  "4", "--no-progress", "--run-dir", str(run), "--resume"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "nothing in it was run" in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_checkpoint_is_one_clear_error_naming_the_file(cli_run, tmp_path, damage,
                                                                  capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    path = run / "best.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x80\x04not a pickle",
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert main(["evaluate", str(run), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_torch_load_of_the_package_is_weights_only():
    """In the package, the benchmarks and the examples; the one trusted exception is the
    explicit conversion of an old checkpoint."""
    offenders = []
    scripts = [*(PACKAGE.parent / "benchmarks").rglob("*.py"),
               *(PACKAGE.parent / "examples").rglob("*.py")]
    for file in [*PACKAGE.rglob("*.py"), *scripts]:
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                continue
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in node.keywords)
            if not safe:
                offenders.append(f"{file.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == ["pyro_seqlatent/infer/checkpoint.py:" + str(_convert_line())], offenders


def _convert_line() -> int:
    source = (PACKAGE / "infer" / "checkpoint.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1)
                if "weights_only=False" in line and "torch.load(" in line)


def test_a_failed_save_leaves_no_temporary_file_and_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_run_removes_the_temporary_files_of_a_killed_save(tmp_path):
    x = TensorDataset(torch.randn(16))
    kw = dict(num_steps=2, batch_size=8, checkpoint_every=1, progress=False, run_dir=tmp_path)
    train(NormalNormal(), AffineNormalGuide(), x, **kw)
    for stale in (".checkpoint.pt.abc123.tmp", ".best.pt.x.tmp"):
        (tmp_path / stale).write_bytes(b"partial")
    train(NormalNormal(), AffineNormalGuide(), x, **{**kw, "num_steps": 3}, resume=True)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["step"] == 3


class BlowsUp(NormalNormal):
    """Its loss jumps by 1e6 nats per data point (finite) from call ``at`` on."""

    def __init__(self, at):
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, x):
        self.calls += 1
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, self.noise), obs=x)
            if self.calls >= self.at:
                pyro.factor("boom", torch.full_like(x, -1e6))


def test_an_exploding_finite_loss_stops_with_the_checkpoint_from_before_it(tmp_path):
    x = TensorDataset(torch.randn(64))
    # call 1 is the trainer's first trace, step k is call k + 1: step 31 explodes, so the
    # parameters of step 30 gave the exploding loss and its checkpoint must not be kept
    with pytest.raises(TrainingDiverged, match=r"step 31: the loss .* exploded .*step 25\)"):
        train(BlowsUp(at=32), AffineNormalGuide(), x, num_steps=60, batch_size=16, lr=1e-2,
              checkpoint_every=5, run_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["step"] == 25
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == 30
    # off, the same run goes on to the end (the rule is what stopped it)
    result = train(BlowsUp(at=32), AffineNormalGuide(), x, num_steps=40, batch_size=16,
                   lr=1e-2, divergence_factor=None, progress=False)
    assert result.step == 40 and result.final_loss > 1e5


def test_the_explosion_rule_leaves_ordinary_training_alone():
    """A falling loss, minibatch noise and a rising KL weight are not explosions."""
    x = TensorDataset(torch.randn(400) * 3)
    result = train(NormalNormal(), AffineNormalGuide(), x, num_steps=300, batch_size=8,
                   lr=0.05, kl_anneal_steps=200, kl_anneal_start=0.0, progress=False)
    assert result.step == 300


def test_a_run_that_blows_up_in_its_first_steps_is_stopped(tmp_path):
    """A learning rate far too high blows the loss up before any window of history exists: the
    first loss is the yardstick then (``--lr 100`` on the VAE went from 552 to 6.5e17)."""
    x = TensorDataset(torch.randn(64))
    with pytest.raises(TrainingDiverged, match=r"step 3: the loss .* exploded .*first loss") as e:
        train(BlowsUp(at=4), AffineNormalGuide(), x, num_steps=10, batch_size=16,
              checkpoint_every=1, run_dir=tmp_path, progress=False)
    assert e.value.checkpoint_step == 1  # step 2's parameters gave the exploding loss
    assert "train again" not in str(e.value)
    with pytest.raises(TrainingDiverged, match=r"no checkpoint from before it was kept"):
        train(BlowsUp(at=3), AffineNormalGuide(), x, num_steps=10, batch_size=16,
              checkpoint_every=1, run_dir=tmp_path / "b", progress=False)


@pytest.mark.parametrize("name", ["config.json", "train_config.json", "metrics.jsonl"])
@pytest.mark.parametrize("damage", ["garbage", "half"])
def test_a_corrupt_json_file_of_a_run_is_one_clear_error(cli_run, tmp_path, name, damage,
                                                          capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    path = run / name
    text = path.read_text()
    broken = {"garbage": "\x00\x01 not json {", "half": text[: len(text) // 2]}[damage]
    if name == "metrics.jsonl":  # a torn last line is tolerated; a bad first line is not
        broken = "{not json\n" + text
    path.write_text(broken)
    capsys.readouterr()
    for argv in (["evaluate", str(run), "--num-samples", "2"],
                 ["train", "rnn_dt", "--n-series", "20", "--num-steps", "3", "--batch-size",
                  "4", "--train-options", '{"valid_every": 1, "checkpoint_every": 1}',
                  "--no-progress", "--run-dir", str(run), "--resume"]):
        code = main(argv)
        err = capsys.readouterr().err
        if name == "train_config.json" and argv[0] == "train":
            assert code == 0  # a resumed run writes its settings anew; nothing reads the old
            continue
        assert code == 2, (argv, err)
        assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_torn_last_metrics_line_is_left_out_with_a_warning(cli_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')  # what a killed write leaves
    with pytest.warns(UserWarning, match="line 3 is incomplete"):
        rows = load_run(run).metrics
    assert [r["step"] for r in rows] == [1, 2]


def test_the_flat_train_config_of_an_old_run_reads_as_the_grouped_one():
    from pyro_seqlatent.infer.config import TrainConfig

    folder = Path(__file__).parent / "fixtures" / "run_a3fd1e6"
    flat = json.loads((folder / "train_config.json").read_text())
    assert "schema" not in flat and "lr" in flat  # the layout before the groups
    cfg = TrainConfig.from_json(flat)
    assert cfg.optim.lr == 0.05 and cfg.optim.ema_decay == 0.8 and cfg.length.num_steps == 23
    assert cfg.schedule.kl_anneal_steps == 10 and cfg.validation.valid_every == 4
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.flatten(cfg.to_json()) == {**cfg.flat(), "elbo": "Trace_ELBO"}
