"""Run folders stay out of git (benchmarks/README.md), so a benchmark rebuilds its table from
the run folders on a disk: ``benchmarks/latent_ode.py --from-runs`` merges each folder's
``row.json`` into ``results.json`` / ``results.md`` without training or loading data."""

import json

import pytest

from conftest import load_benchmark

bench = load_benchmark("latent_ode")


def _row(model, test_mse, **extra):
    return {"model": model, "dataset": "periodic", "task": "interp", "fraction": 0.5,
            "protocol": "ours", "options": {}, "steps": 0 if model == "persistence" else 40,
            "epochs": 2.0, "train_s": 1.0, "train_cpu_s": 1.0, "s_per_epoch": 0.5,
            "test_mse": test_mse, "command": f"python benchmarks/latent_ode.py # {model}",
            "anchor_mse": None, **extra}


def _run_folder(out, name, row):
    run = out / name
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    (run / "row.json").write_text(json.dumps(row))
    return run


@pytest.fixture
def no_training(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("--from-runs trained or loaded data")

    for name in ("train_system", "system_datasets", "union_vs_rescaled", "persistence_row",
                 "baseline_rows"):
        monkeypatch.setattr(bench, name, forbidden)


def test_from_runs_merges_the_rows_of_run_folders_into_the_table(tmp_path, no_training):
    # a results.json from an earlier session: a stale latent_ode row, a persistence row (no
    # run folder) and the solve comparison, all of which a rebuild keeps unless replaced
    solve = {k: {"grid": 10, "s": 0.1, "nfe_forward": 8, "nfe_backward": 9}
             for k in ("union", "rescaled")} | {"max_abs_diff": 1e-6}
    (tmp_path / "results.json").write_text(json.dumps(
        {"rows": [_row("latent_ode", 9.9), _row("persistence", 0.11)], "solve": solve}))
    run = _run_folder(tmp_path, "periodic-interp-0.5-latent_ode", _row("latent_ode", 0.029))
    _run_folder(tmp_path, "periodic-interp-0.5-ode_rnn", _row("ode_rnn", 0.0064))
    (tmp_path / "periodic-interp-0.5-rnn_dt").mkdir()  # an old run folder: no row.json
    (tmp_path / "periodic-interp-0.5-rnn_dt" / "train_config.json").write_text("{}")

    bench.main(["--from-runs", str(run), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    mse = {r["model"]: r["test_mse"] for r in saved["rows"]}
    assert mse == {"latent_ode": 0.029, "persistence": 0.11}
    assert saved["solve"] == solve
    table = (tmp_path / "results.md").read_text()
    assert "| latent_ode | 0.029 |" in table and "9.9" not in table
    assert "| persistence | 0.11 |" in table and "union grid (a) vs time rescaling" in table

    bench.main(["--from-runs", "--out", str(tmp_path)])  # every run folder under --out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["model"]: r["test_mse"] for r in saved["rows"]} == {
        "latent_ode": 0.029, "ode_rnn": 0.0064, "persistence": 0.11}
    assert "| ode_rnn | 0.0064 |" in (tmp_path / "results.md").read_text()


def test_from_runs_names_a_folder_without_its_row(tmp_path, no_training, capsys):
    old = tmp_path / "periodic-interp-0.5-rnn_dt"
    old.mkdir()
    with pytest.raises(SystemExit):
        bench.main(["--from-runs", str(old), "--out", str(tmp_path)])
    assert "no row.json in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing to rebuild from: results.json is not emptied
        bench.main(["--from-runs", "--out", str(tmp_path)])
    assert "no run folder with a row.json" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
