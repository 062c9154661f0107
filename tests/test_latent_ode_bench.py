"""The Latent ODE benchmark's variant rows: ``--options`` / ``--tag`` train a changed model as
a row of its own beside the default row, and bad flags fail before any data loads."""

import json

import pytest

from conftest import load_benchmark

bench = load_benchmark("latent_ode")


@pytest.mark.parametrize("flags, message", [
    (["--options", '{"latent_dim": 15}'], "--tag"),
    (["--options", '{"latent_dim": 15}', "--tag", "a b"], "--tag"),
    (["--options", '{"fraction": 0.2}', "--tag", "x"], "data settings"),
    (["--options", '{"latent_dim": 15}', "--tag", "x", "--models", "ode_rnn"], "ode_rnn"),
    (["--options", "[1]", "--tag", "x"], "JSON object"),
    (["--options", '{"latent_dim": }', "--tag", "x"], "not JSON"),
    (["--options", '{"latent_dim": 15}', "--tag", "x", "--speed"], "--speed"),
])
def test_bad_variant_flags_fail_before_any_data_loads(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "latent_ode", "--out", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_a_tagged_variant_trains_the_changed_model_beside_the_default_row(tmp_path):
    common = ["--minutes", "0.02", "--cells", "periodic:interp:0.5", "--models", "latent_ode",
              "--n-series", "30", "--valid-every", "0", "--no-persistence", "--no-solve-bench",
              "--out", str(tmp_path)]
    bench.main(common)
    bench.main(common + ["--options", '{"latent_dim": 3, "ode_units": 8}', "--tag", "narrow"])
    rows = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"latent_ode", "latent_ode [narrow]"}
    default, variant = rows["latent_ode"], rows["latent_ode [narrow]"]
    assert variant["options"]["latent_dim"] == 3 and variant["options"]["ode_units"] == 8
    assert default["options"].get("latent_dim") is None  # the default row kept its own model
    assert "--tag narrow" in variant["command"] and "--options" in variant["command"]
    assert (tmp_path / "periodic-interp-0.5-latent_ode+narrow" / "row.json").exists()
    assert (tmp_path / "periodic-interp-0.5-latent_ode" / "row.json").exists()
    config = json.loads((tmp_path / "periodic-interp-0.5-latent_ode+narrow" / "config.json")
                        .read_text())
    assert config["options"]["latent_dim"] == 3  # the trained model, not only the label
    assert "latent_ode [narrow]" in (tmp_path / "results.md").read_text()
