"""The command line: list, train (model options as flags), evaluate, sample, resume, errors."""

import json

import pytest
import torch

from conftest import require_data
from pyro_seqlatent.cli import main
from pyro_seqlatent.infer import load_run
from pyro_seqlatent.registry import ModelSpec, get_model, list_models, register_model


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    assert "vae" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "vae", "--help"])
    out = capsys.readouterr().out
    assert "--guide" in out and "--clip-norm" in out and "--num-flows" in out
    assert main(["train"]) == 2


def test_every_registered_model_has_a_train_command_line():
    from pyro_seqlatent.cli import _train_parser

    for name in list_models():
        _train_parser(get_model(name))  # an option named like a trainer flag would raise
    clash = ModelSpec(name="clash", build=lambda o: None, datasets=lambda o, r: {},
                      defaults={"seed": 0, "width": 3})
    with pytest.raises(ValueError, match=r"\['seed'\].*data_seed"):
        _train_parser(clash)


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(KeyError, match="registered models"):
        get_model("no-such-model")
    with pytest.raises(ValueError, match="no option"):
        get_model("vae").options(latent=3)
    with pytest.raises(TypeError, match="ModelSpec"):
        register_model("vae")
    assert "vae" in list_models() and isinstance(get_model("vae"), ModelSpec)


def test_train_evaluate_sample_resume_end_to_end(tmp_path, capsys):
    require_data("binarized_mnist/binarized_mnist_train.mat")
    run = tmp_path / "vae"
    args = ["train", "vae", "--latent-dim", "2", "--hidden-dims", "32", "--guide", "planar",
            "--num-flows", "2", "--train-limit", "300", "--valid-limit", "100",
            "--num-steps", "6", "--batch-size", "50", "--valid-every", "3",
            "--checkpoint-every", "3", "--run-dir", str(run), "--no-progress", "--seed", "3"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "vae" and config["options"]["guide"] == "planar"
    loaded = load_run(run)
    assert loaded.options["latent_dim"] == 2 and len(loaded.metrics) == 6
    assert main(["evaluate", str(run), "--num-samples", "8", "--max-points", "20"]) == 0
    out = json.loads((run / "eval_test_K8.json").read_text())
    from pyro_seqlatent.data.subsets import fixed_subset
    from pyro_seqlatent.infer import evaluate

    test = fixed_subset(loaded.datasets()["test"], 20)  # what --max-points 20 scores
    direct = evaluate(loaded.model, loaded.guide, test, num_samples=8)  # the Python path
    assert out["num_points"] == 20
    assert out["log_marginal"] == pytest.approx(direct["log_marginal"], rel=1e-4)
    assert main(["sample", str(run), "-n", "3"]) == 0
    samples = torch.load(run / "samples.pt")
    assert samples.shape == (3, 28, 28) and ((samples >= 0) & (samples <= 1)).all()
    first_losses = [r["loss"] for r in loaded.metrics]
    # resume to 9 steps continues from the checkpoint at step 6
    assert main([*args[:-5], "--num-steps", "9", "--run-dir", str(run), "--no-progress",
                 "--seed", "3", "--resume"]) == 0
    resumed = load_run(run, which="last").metrics
    assert [r["step"] for r in resumed] == list(range(1, 10))
    assert [r["loss"] for r in resumed[:6]] == first_losses  # continued, not restarted


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["train", "vae", "--num-steps", "1", "--data-root", str(tmp_path),
                 "--run-dir", str(tmp_path / "r"), "--no-progress"])
    assert code == 2
    assert "PYRO_SEQLATENT_DATA" in capsys.readouterr().err
