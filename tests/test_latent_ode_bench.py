"""The Latent ODE benchmark's variant rows: ``--options`` / ``--tag`` train a changed model as
a row of its own beside the default row, and bad flags fail before any data loads."""

import json
import shlex

import pytest

from conftest import load_benchmark
from pyro_seqlatent.infer.config import TrainConfig
from pyro_seqlatent.models.forecast_metrics import predictive_mse

bench = load_benchmark("latent_ode")


@pytest.mark.parametrize("flags, message", [
    (["--options", '{"latent_dim": 15}'], "give the rows a --tag"),
    (["--options", '{"latent_dim": 15}', "--tag", "a b"], "use letters"),
    (["--options", '{"latent_dim": 15}', "--tag=-x"], "use letters"),
    (["--options", '{"fraction": 0.2}', "--tag", "x"], "data settings"),
    (["--options", '{"poisson": true}', "--tag", "x"], "latent_ode_poisson"),
    (["--options", '{"latent_dim": 15}', "--tag", "x", "--models", "ode_rnn"],
     "model 'ode_rnn' has no such option"),
    (["--options", '{"ode_layers": "4"}', "--tag", "x"], "type of its default"),
    (["--options", '{"guide": "bogus"}', "--tag", "x"], "cannot be built"),
    (["--options", "[1]", "--tag", "x"], "JSON object"),
    (["--options", '{"latent_dim": }', "--tag", "x"], "not JSON"),
    (["--options", '{"latent_dim": 15}', "--tag", "x", "--speed"], "drop --options"),
    (["--models", "latent_ode", "lstm"], "--models ['lstm']"),
    (["--train-options", '{"optimizer": "adamax"}'], "give the rows a --tag"),
    (["--train-options", '{"num_steps": 5}', "--tag", "x"], "cannot be set here"),
    (["--train-options", '{"lr_min_factor": 2}', "--tag", "x"], "lr_min_factor"),
    (["--train-options", '{"optimizer": "lbfgs"}', "--tag", "x"], "optimizer"),
    (["--train-options", '{"elbo": "bogus"}', "--tag", "x"], "elbo='bogus'"),
    # the Latent ODE's own defaults anneal the KL, which a JIT ELBO cannot
    (["--train-options", '{"elbo": "JitTrace_ELBO"}', "--tag", "x"], "kl_anneal_steps=200"),
    (["--train-options", '{"lr_schedule": "cosine"}', "--tag", "x"], "use 'step'"),
    (["--train-options", '{"early_stopping_patience": 3}', "--tag", "x", "--valid-every", "0"],
     "needs validation"),
])
def test_bad_variant_flags_fail_before_any_data_loads(flags, message, tmp_path, capsys,
                                                      monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the flags were checked")

    monkeypatch.setattr(bench, "system_datasets", no_data)
    monkeypatch.setattr(bench, "train_system", no_data)
    argv = ["--cells", "hopper:interp:0.1", "--out", str(tmp_path), *flags]
    if "--models" not in flags:
        argv += ["--models", "latent_ode"]
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def _config(folder):
    return json.loads((folder / "config.json").read_text())["options"]


def test_a_tagged_variant_trains_the_changed_model_beside_the_default_row(tmp_path):
    common = ["--minutes", "0.02", "--cells", "periodic:interp:0.5", "--models", "latent_ode",
              "--n-series", "30", "--valid-every", "0", "--no-persistence", "--no-solve-bench",
              "--out", str(tmp_path)]
    bench.main(common)
    bench.main(common + ["--options", '{"latent_dim": 3, "ode_units": 8}', "--tag", "narrow",
                         "--train-options", '{"optimizer": "adamax", "lr_min_factor": 0.1}'])
    rows = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"latent_ode", "latent_ode [narrow]"}
    variant = rows["latent_ode [narrow]"]
    assert variant["options"]["latent_dim"] == 3 and variant["options"]["ode_units"] == 8
    # each row trained its own networks, in its own folder
    assert _config(tmp_path / "periodic-interp-0.5-latent_ode")["latent_dim"] == 10
    assert _config(tmp_path / "periodic-interp-0.5-latent_ode@narrow")["latent_dim"] == 3
    assert "latent_ode [narrow]" in (tmp_path / "results.md").read_text()
    def settings(folder):
        return TrainConfig.flatten(json.loads((tmp_path / folder / "train_config.json")
                                              .read_text()))

    trained = settings("periodic-interp-0.5-latent_ode@narrow")
    assert trained["optimizer"] == "adamax" and trained["lr_min_factor"] == 0.1
    assert settings("periodic-interp-0.5-latent_ode")["optimizer"] == "adam"
    # the printed command reproduces the variant
    argv = shlex.split(variant["command"])[3:]  # after OMP_NUM_THREADS=1 python <script>
    again = bench.build_parser().parse_args(argv)
    assert json.loads(again.options) == {"latent_dim": 3, "ode_units": 8}
    assert again.tag == "narrow" and again.models == ["latent_ode"]
    assert json.loads(again.train_options) == {"optimizer": "adamax", "lr_min_factor": 0.1}


def test_rescore_scores_a_row_again_from_its_best_checkpoint(tmp_path, capsys):
    common = ["--cells", "periodic:interp:0.5", "--models", "latent_ode", "--n-series", "30",
              "--valid-every", "5", "--no-persistence", "--no-solve-bench", "--out", str(tmp_path)]
    bench.main(["--minutes", "0.03"] + common)
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    run = tmp_path / "periodic-interp-0.5-latent_ode"
    capsys.readouterr()
    bench.main(["--rescore", str(run)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == row["scored_step"]
    assert lines[0]["protocol"] == "ours" and "test_mse_pooled" not in lines[0]
    # new z0 samples, the same weights: close to the row's figure, and repeatable (seed 0)
    assert lines[0]["test_mse"] == pytest.approx(row["test_mse"], rel=0.2)
    bench.main(["--rescore", str(run)])
    assert json.loads(capsys.readouterr().out)["test_mse"] == lines[0]["test_mse"]
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        bench.main(["--rescore", str(tmp_path / "nowhere")])


def test_tagged_prefix_rows_through_subprocesses_keep_their_options(tmp_path):
    bench.main(["--minutes", "0.02", "--cells", "periodic:extrap:0.5", "--models", "latent_ode",
                "--n-series", "30", "--valid-every", "0", "--no-persistence", "--no-solve-bench",
                "--extrap-train", "all", "--jobs", "2", "--options", '{"latent_dim": 3}',
                "--tag", "poisson", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["latent_ode (prefix too) [poisson]"]
    folder = tmp_path / "periodic-extrap-0.5-latent_ode-prefix@poisson"
    assert _config(folder)["latent_dim"] == 3 and _config(folder)["extrap_train"] == "all"
    assert not (tmp_path / "periodic-extrap-0.5-latent_ode+poisson").exists()


def spent_minutes(folder) -> float:
    """The budget a row's last checkpoint has used (what a resume counts from)."""
    from pyro_seqlatent.infer.checkpoint import load_checkpoint

    return load_checkpoint(folder / "checkpoint.pt")["state"]["elapsed"] / 60


def test_a_cut_row_resumes_from_its_last_checkpoint(tmp_path):
    """--resume continues the row's run folder (checkpoints at every validation) up to the
    total --minutes, and the printed command does not carry the flag."""
    common = ["--cells", "periodic:interp:0.5", "--models", "ode_rnn", "--n-series", "30",
              "--valid-every", "2", "--no-persistence", "--no-solve-bench", "--out", str(tmp_path)]
    bench.main(["--minutes", "0.01"] + common)
    folder = tmp_path / "periodic-interp-0.5-ode_rnn"
    first = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert (folder / "checkpoint.pt").exists()
    bench.main(["--minutes", "0.01", "--resume"] + common)  # the budget is spent: no step
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["steps"] == first[-1]["step"]
    # a budget past the CPU time already spent (a loaded machine can spend 0.01 min on one step)
    more = f"{spent_minutes(folder) + 0.03:.4f}"
    bench.main(["--minutes", more, "--resume"] + common)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["steps"] > first[-1]["step"]
    assert "--resume" not in rows[0]["command"]
    steps = [json.loads(line)["step"]
             for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # continued, not restarted
    other_data = [("40" if a == "30" else a) for a in common]  # --n-series 40: other series
    with pytest.raises(ValueError, match="n_series: 30 -> 40"):
        bench.main(["--minutes", "0.05", "--resume"] + other_data)


def test_a_diverged_row_is_scored_at_its_best_checkpoint(tmp_path, monkeypatch):
    """A row whose training diverges keeps its work: it is scored at its best-validation
    checkpoint and says where it stopped; without a best checkpoint the error stands."""
    import math

    from pyro_seqlatent.infer import TrainingDiverged, load_run

    real = bench.train_system

    def diverging(name, options, run_dir, **kwargs):
        result, *_ = real(name, options, run_dir, **kwargs)
        raise TrainingDiverged(result.step + 1, "the loss", run_dir / "checkpoint.pt",
                               result.step)

    monkeypatch.setattr(bench, "train_system", diverging)
    common = ["--minutes", "0.01", "--cells", "periodic:interp:0.5", "--models", "ode_rnn",
              "--n-series", "30", "--no-persistence", "--no-solve-bench", "--out", str(tmp_path)]
    bench.main(common + ["--valid-every", "2"])
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    best = load_run(tmp_path / "periodic-interp-0.5-ode_rnn", which="best")
    best_step = min((r for r in best.metrics if "valid_loss" in r),
                    key=lambda r: r["valid_loss"])["step"]
    assert row["scored"] == f"best valid (step {best_step}); diverged at step {row['steps'] + 1}"
    test = best.datasets()["test"]
    assert math.isclose(row["test_mse"], predictive_mse(best.model, best.guide, test),
                        rel_tol=1e-6)
    with pytest.raises(TrainingDiverged):  # no validation, so no best checkpoint to score
        bench.main(common + ["--valid-every", "0", "--out", str(tmp_path / "none")])


def test_a_row_resumed_with_another_lr_says_so(tmp_path):
    """The recovery of a diverged row (resume with a lower lr) is visible in its row: the
    recorded command alone would retrain at the new lr from the start."""
    common = ["--cells", "periodic:interp:0.5", "--models", "ode_rnn", "--n-series", "30",
              "--valid-every", "2", "--no-persistence", "--no-solve-bench", "--out", str(tmp_path),
              "--tag", "recovered"]
    bench.main(common + ["--minutes", "0.01"])
    first = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert "resumed" not in first["scored"]
    folder = tmp_path / "periodic-interp-0.5-ode_rnn@recovered"
    old_lr = TrainConfig.flatten(json.loads((folder / "train_config.json").read_text()))["lr"]
    more = f"{spent_minutes(folder) + 0.05:.4f}"  # past the CPU time spent, however loaded
    bench.main(common + ["--minutes", more, "--train-options", '{"lr": 0.0003}', "--resume"])
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["steps"] > first["steps"]
    change = f"; resumed at step {first['steps']} with lr 0.0003 (was {old_lr})"
    assert row["scored"].endswith(change) or row["scored"].endswith(
        change + ", after the scored state")
    assert row["scored"].endswith(", after the scored state") == (
        row["scored_step"] <= first["steps"])
