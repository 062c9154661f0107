"""``pyro-seqlatent --import MODULE_OR_PATH``: a user module (not an installed package) registers
its model, which the command line then trains and evaluates."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from pyro_seqlatent import registry
from pyro_seqlatent.cli import main

USER_MODULE = textwrap.dedent('''
    """A user's deep Markov model on generated random walks, registered as {name!r}."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from pyro_seqlatent.registry import ModelSpec, register_model


    class DMM(nn.Module):
        def __init__(self, z_dim, x_dim):
            super().__init__()
            self.trans = nn.Linear(z_dim, z_dim)
            self.emit = nn.Linear(z_dim, x_dim)

        def forward(self, x):
            z = x.new_zeros(x.shape[0], self.trans.in_features)
            with pyro.plate("data", x.shape[0], dim=-1):
                for t in pyro.markov(range(x.shape[1])):
                    z = pyro.sample(f"z_{{t}}", dist.Normal(self.trans(z), 1.0).to_event(1))
                    pyro.sample(f"x_{{t}}", dist.Normal(self.emit(z), 0.5).to_event(1),
                                obs=x[:, t])


    class Guide(nn.Module):
        def __init__(self, z_dim, x_dim):
            super().__init__()
            self.net = nn.Linear(x_dim, 2 * z_dim)

        def forward(self, x):
            with pyro.plate("data", x.shape[0], dim=-1):
                for t in pyro.markov(range(x.shape[1])):
                    loc, raw = self.net(x[:, t]).chunk(2, -1)
                    scale = nn.functional.softplus(raw) + 1e-3
                    pyro.sample(f"z_{{t}}", dist.Normal(loc, scale).to_event(1))


    def build(options):
        return DMM(options["z_dim"], 3), Guide(options["z_dim"], 3)


    def datasets(options, root):
        g = torch.Generator().manual_seed(0)
        x = 0.3 * torch.randn(64, options["length"], 3, generator=g).cumsum(1)
        return {{"train": TensorDataset(x[:48]), "valid": TensorDataset(x[48:56]),
                 "test": TensorDataset(x[56:])}}


    register_model(ModelSpec(
        name={name!r}, build=build, datasets=datasets,
        defaults={{"z_dim": 2, "length": 6}},
        option_help={{"z_dim": "latent size per step", "length": "steps per sequence"}},
        description="a deep Markov model from a user module",
    ))
''')


@pytest.fixture
def clean_registry(monkeypatch):
    """User models registered by a test do not stay registered, nor does the variable."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv(registry.IMPORT_ENV, "")  # restored (removed) after the test
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("user_models_"):
            del sys.modules[name]


def _write(tmp_path, model_name):
    stem = f"user_models_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{stem}.py"
    path.write_text(USER_MODULE.format(name=model_name))
    return stem, path


def test_import_a_file_then_train_and_evaluate_the_user_model(tmp_path, capsys, clean_registry):
    _, path = _write(tmp_path, "dmm")
    assert main(["--import", str(path), "list"]) == 0
    assert "a deep Markov model from a user module" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["--import", str(path), "train", "dmm", "--num-steps", "2", "--batch-size", "8",
                 "--z-dim", "3", "--run-dir", str(run), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert json.loads((run / "config.json").read_text())["options"]["z_dim"] == 3
    # the variable now names the file, for the processes this one starts (torchrun workers)
    assert os.environ[registry.IMPORT_ENV] == str(path)
    assert main([f"--import={path}", "evaluate", str(run), "--num-samples", "4"]) == 0
    assert (run / "eval_test_K4.json").exists()


def test_import_a_dotted_name_and_the_environment_variable(tmp_path, monkeypatch, capsys,
                                                           clean_registry):
    stem, _ = _write(tmp_path, "dmm_by_name")
    monkeypatch.chdir(tmp_path)  # a module in the current folder, as with `python -m`
    assert main(["--import", stem, "train", "dmm_by_name", "--num-steps", "2", "--batch-size",
                 "8", "--run-dir", str(tmp_path / "r1"), "--no-progress"]) == 0
    capsys.readouterr()
    stem2, path2 = _write(tmp_path, "dmm_from_env")
    monkeypatch.setenv(registry.IMPORT_ENV, str(path2))
    assert main(["train", "dmm_from_env", "--num-steps", "2", "--batch-size", "8",
                 "--run-dir", str(tmp_path / "r2"), "--no-progress"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--import", "no_such_module_xyz", "list"],
     "--import no_such_module_xyz: no module named 'no_such_module_xyz'"),
    (["--import", "/nowhere/models.py", "list"], "--import /nowhere/models.py: no such file"),
    (["--import"], "--import needs a module name or a .py file path"),
])
def test_a_module_that_cannot_be_imported_is_one_clear_line(argv, message, capsys,
                                                            clean_registry):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pyro-seqlatent: error: {message}" or (
        err.startswith(f"pyro-seqlatent: error: {message}") and "\n" not in err)


def test_a_module_that_raises_is_named_with_its_error(tmp_path, capsys, clean_registry):
    path = tmp_path / "user_models_broken.py"
    path.write_text("raise RuntimeError('oops')\n")
    assert main(["--import", str(path), "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--import {path}: importing it failed: RuntimeError('oops')" in err
    assert "user_models_broken" not in sys.modules


def test_the_installed_command_sees_a_user_module(tmp_path, clean_registry):
    """The console script (whose sys.path lacks the current folder) imports from it too."""
    stem, _ = _write(tmp_path, "dmm_script")
    script = os.path.join(os.path.dirname(sys.executable), "pyro-seqlatent")
    if not os.path.exists(script):
        pytest.skip("the pyro-seqlatent script is not installed in this environment")
    out = subprocess.run([script, "--import", stem, "list"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "dmm_script" in out.stdout
