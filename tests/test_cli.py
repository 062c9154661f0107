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


# ------------------------------------------------------------------ the flags `train --help` shows
_META = {"--help", "--option", "--train-options", "--help-all"}


def _shown_flags(name):
    import argparse

    from pyro_seqlatent.cli import _train_parser

    spec = get_model(name)
    parser = _train_parser(spec)
    shown = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    model = [a for a in shown if a.dest in spec.defaults]
    training = [a for a in shown if a not in model and a.option_strings[-1] not in _META]
    return parser, model, training


@pytest.mark.parametrize("name", ["vrnn", "latent_ode"])
def test_train_help_shows_about_a_dozen_training_flags_each_with_help_and_default(name, capsys):
    parser, model, training = _shown_flags(name)
    assert 10 <= len(training) <= 15, [a.option_strings for a in training]
    assert len(model) == len(get_model(name).defaults)  # the model options stay shown
    for action in model + training:
        assert action.help and "(default:" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        main(["train", name, "--help"])
    out = capsys.readouterr().out
    for title in ("length and budget", "optimisation", "output: run folder and validation",
                  "where it runs", "every other setting", f"{name} options"):
        assert title in out
    assert "--weight-decay" not in out and "--log-every" not in out  # unlisted
    assert "--option KEY=VALUE" in out and "--help-all" in out and "docs/api.md" in out


def test_unlisted_settings_keep_their_flags_and_help_all_lists_every_setting(capsys):
    from pyro_seqlatent.cli import _train_arguments, _train_parser
    from pyro_seqlatent.infer.config import settings

    spec = get_model("vae")
    parser = _train_parser(spec)
    args = vars(parser.parse_args(["--num-steps", "2", "--weight-decay", "0.01", "--no-progress",
                                   "--checkpoint-every", "3", "--lr-schedule", "cosine",
                                   "--elbo-kwargs", '{"num_particles": 2}']))
    options, train = _train_arguments(parser, spec, args)
    assert options == {}
    assert train == {"num_steps": 2, "weight_decay": 0.01, "progress": False,
                     "checkpoint_every": 3, "lr_schedule": "cosine",
                     "elbo_kwargs": {"num_particles": 2}}
    with pytest.raises(SystemExit) as stop:
        main(["train", "vae", "--help-all"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name, setting in settings().items():
        assert f"  {name} = " in out and setting.help in out
        assert f"group {setting.group!r}" in out
    spec_help = get_model("vae").option_help
    assert all(f"  {k} = " in out and spec_help[k] in out for k in spec.defaults)
    assert "clip_norm = 100.0" in out  # the model's own default, not the trainer's


def test_option_and_train_options_precedence_and_typing():
    from pyro_seqlatent.cli import _train_arguments, _train_parser

    spec = get_model("latent_ode")
    parser = _train_parser(spec)

    def parse(*argv):
        return _train_arguments(parser, spec, vars(parser.parse_args(list(argv))))

    options, train = parse("--num-steps", "1", "--train-options",
                           '{"lr": 0.1, "weight_decay": 0.001, "lr_schedule": "step"}',
                           "--option", "lr=0.2", "--option", "kl-anneal-steps=5",
                           "--option", "guide=iaf", "--option", "poisson=true",
                           "--option", "rtol=1", "--option", "lr_schedule=null",
                           "--option", "betas=[0.5, 0.9]")
    assert options == {"guide": "iaf", "poisson": True, "rtol": 1.0}
    assert isinstance(options["rtol"], float)
    assert train == {"lr": 0.2, "weight_decay": 0.001, "lr_schedule": None,
                     "kl_anneal_steps": 5, "num_steps": 1, "betas": [0.5, 0.9]}
    _, train = parse("--num-steps", "1", "--train-options", '{"lr": 0.1}', "--option", "lr=0.2",
                     "--lr", "0.3", "--num-particles", "4")
    assert train["lr"] == 0.3  # --train-options < --option < the named flag
    assert train["elbo_kwargs"] == {"num_particles": 4, "vectorize_particles": True}
    # a model option whose default is a string stays a string
    vae = get_model("vae")
    vae_parser = _train_parser(vae)
    args = vae_parser.parse_args(["--num-steps", "1", "--option", "hidden_dims=400"])
    assert _train_arguments(vae_parser, vae, vars(args))[0] == {"hidden_dims": "400"}


@pytest.mark.parametrize("argv, message", [
    (["--option", "nonsense=1"], r"--option nonsense: not an option of 'latent_ode'.*--help-all"),
    (["--option", "lr"], r"--option 'lr': use KEY=VALUE"),
    (["--train-options", "[1]"], r"--train-options: a JSON object"),
    (["--train-options", "{"], r"--train-options: not JSON"),
    (["--train-options", '{"latent_dim": 3}'], r"\['latent_dim'\] are not training settings "
                                               r"\(model options: use --option"),
    (["--option", "method=rk5"], r"option method must be one of \['dopri5', .*got 'rk5'"),
    (["--method", "rk5"], r"argument --method: invalid choice: 'rk5'"),
    (["--option", "lr=-1"], r"lr must be a positive finite number"),
    (["--num-steps", "1", "--nproc", "0"], r"--nproc must be >= 1"),
])
def test_train_usage_errors_name_the_option(argv, message, capsys):
    argv = argv if "--num-steps" in argv else ["--num-steps", "1", *argv]
    with pytest.raises(SystemExit) as stop:
        main(["train", "latent_ode", *argv])
    assert stop.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_every_model_option_has_help_and_its_choices():
    from pyro_seqlatent.cli import _train_parser

    for name in list_models():
        spec = get_model(name)
        for option, default in spec.defaults.items():
            assert spec.option_help.get(option, "").strip(), f"{name}: {option} has no help"
            if option in spec.option_choices:
                assert default in spec.option_choices[option], (name, option)
        parser = _train_parser(spec)
        for action in parser._actions:
            if action.dest in spec.option_choices:
                assert list(action.choices) == list(spec.option_choices[action.dest])
    # the options with a fixed set of values that the builders check have their choices
    assert set(get_model("vrnn").option_choices) >= {"dataset", "emission", "guide", "rnn",
                                                     "prior"}
    assert set(get_model("latent_ode").option_choices) >= {
        "dataset", "task", "recipe", "protocol", "extrap_train", "guide", "poisson_rates",
        "method", "obs_weighting", "init"}


def test_a_wrong_choice_from_python_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model 'vrnn': option rnn must be one of "
                                         r"\['gru', 'lstm'\], got 'tcn'"):
        get_model("vrnn").options(rnn="tcn")
    with pytest.raises(ValueError, match=r"option guide must be one of .*got 'planar'"):
        from pyro_seqlatent.experiments.systems import train_system

        train_system("vrnn", {"guide": "planar"}, num_steps=1)
    with pytest.raises(ValueError, match=r"default option g must be one of \['a', 'b'\], "
                                         r"got 'c'"):
        ModelSpec(name="bad", build=lambda o: None, datasets=lambda o, r: {},
                  defaults={"g": "c"}, option_choices={"g": ["a", "b"]})
    with pytest.raises(ValueError, match=r"option_help names \['typo'\]"):
        ModelSpec(name="bad", build=lambda o: None, datasets=lambda o, r: {},
                  defaults={"g": "c"}, option_help={"typo": "?"})


def test_option_and_train_options_reach_the_trainer(tmp_path, capsys):
    from pyro_seqlatent.infer.config import TrainConfig

    run = tmp_path / "rnn_dt"
    code = main(["train", "rnn_dt", "--n-series", "20", "--num-steps", "1", "--batch-size", "4",
                 "--option", "lr=0.5", "--option", "hidden_dim=4", "--option", "progress=false",
                 "--train-options", '{"weight_decay": 0.001, "log_every": 1}',
                 "--run-dir", str(run)])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    saved = TrainConfig.flatten(json.loads((run / "train_config.json").read_text()))
    assert saved["lr"] == 0.5 and saved["weight_decay"] == 0.001 and saved["progress"] is False
    assert saved["clip_norm"] == get_model("rnn_dt").train_defaults["clip_norm"]
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["hidden_dim"] == 4 and options["n_series"] == 20
