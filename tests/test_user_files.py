"""Your own data (pyro_seqlatent.data.user_files, docs/own-data.md): small generated files of
each family train through the command line and from arrays in Python, and each bad file gets
one clear error naming the argument, the key and the fix."""

import json
import pickle

import numpy as np
import pytest
import torch

from pyro_seqlatent.cli import main
from pyro_seqlatent.data.user_files import (
    UserDataError,
    load_user_data,
    read_arrays,
    split_sizes,
    task_datasets,
)

RNG = np.random.default_rng(0)
TINY = {  # a few steps of tiny networks per system
    "vae": ["--latent-dim", "2", "--hidden-dims", "8"],
    "vrnn": ["--z-dim", "2", "--h-dim", "8", "--feature-dim", "8", "--hidden-dim", "8"],
    "rnn": ["--h-dim", "8", "--feature-dim", "8", "--hidden-dim", "8"],
    "latent_ode": ["--latent-dim", "2", "--hidden-dim", "8", "--ode-units", "8",
                   "--ode-layers", "1", "--method", "euler"],
    "ode_rnn": ["--hidden-dim", "8", "--ode-units", "8"],
    "rnn_dt": ["--hidden-dim", "8"],
    "flow_density": ["--hidden", "8", "--num-couplings", "2"],
    "sbn": ["--hidden-dim", "4"],
}


def _images(n=30):
    """(n, 6, 5) uint8 0/1 images whose first pixels spell the row index in binary (so a row
    can be traced through the splits) and labels y = index."""
    x = (RNG.random((n, 6, 5)) > 0.5).astype(np.uint8)
    bits = (np.arange(n)[:, None] >> np.arange(6)) & 1
    x[:, 0, :5], x[:, 1, 0] = bits[:, :5], bits[:, 5]
    return x, np.arange(n)


def _index_of(row: torch.Tensor) -> int:
    bits = [int(row[i]) for i in (0, 1, 2, 3, 4, 5)]
    return sum(b << i for i, b in enumerate(bits))


def _sequences(n=20, d=3):
    return [RNG.normal(size=(int(RNG.integers(2, 7)), d)) for _ in range(n)]


def _series(n=20, t=12, d=2, missing=0.25):
    values = RNG.normal(size=(n, t, d))
    values[RNG.random(values.shape) < missing] = np.nan
    values[:, 0] = 1.0  # every series has an observation
    times = np.sort(RNG.random((n, t)), axis=1) + np.arange(t) * 1e-3
    return times, values


# ----------------------------------------------------------------------------- loading


def test_images_with_labels_are_flattened_to_floats_and_split_with_a_seed(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "img.npz", x=x, y=y)
    data = load_user_data(tmp_path / "img.npz", "vectors", binary=True, labels=True)
    assert (data.family, data.dim, data.item_shape, data.has_labels) == \
        ("vectors", 30, (6, 5), True)
    sizes = [len(data.splits[s]) for s in ("train", "valid", "test")]
    assert sizes == list(split_sizes(30)) == [24, 3, 3]
    seen = []
    for split in ("train", "valid", "test"):
        for i in range(len(data.splits[split])):
            row, label = data.splits[split][i]
            assert row.dtype == torch.get_default_dtype() and row.shape == (30,)
            index = _index_of(row)
            assert int(label) == index  # labels travel with their rows
            assert torch.equal(row, torch.as_tensor(x[index].reshape(-1), dtype=row.dtype))
            seen.append(index)
    assert sorted(seen) == list(range(30))  # a partition of the rows
    again = load_user_data(tmp_path / "img.npz", "vectors", labels=True)
    other = load_user_data(tmp_path / "img.npz", "vectors", labels=True, seed=1)
    first = [int(again.splits["test"][i][1]) for i in range(3)]
    assert first == [_index_of(data.splits["test"][i][0]) for i in range(3)]
    assert first != [int(other.splits["test"][i][1]) for i in range(3)]
    # without labels=True the items are the rows alone (what the VAE scores)
    assert torch.is_tensor(load_user_data(tmp_path / "img.npz", "vectors").splits["train"][0])
    first = data.first(train=5, valid=0, test=None)
    assert [len(first[s]) for s in ("train", "valid", "test")] == [5, 3, 3]
    assert torch.equal(first["train"].tensors[1], data.splits["train"].tensors[1][:5])
    with pytest.raises(ValueError, match="no split"):
        data.first(validation=3)


def test_split_keys_are_used_as_given(tmp_path):
    x, _ = _images(9)
    np.savez(tmp_path / "s.npz", train=x[:5], valid_x=x[5:7], test_x=x[7:])
    data = load_user_data(tmp_path / "s.npz", "vectors")
    assert [[_index_of(data.splits[s][i]) for i in range(len(data.splits[s]))]
            for s in ("train", "valid", "test")] == [[0, 1, 2, 3, 4], [5, 6], [7, 8]]


@pytest.mark.parametrize("layout", ["seq_i", "packed", "pt_list", "dense"])
def test_sequences_in_every_layout_give_the_same_sequences(tmp_path, layout):
    seqs = _sequences()
    if layout == "dense":
        seqs = [s[:2] for s in seqs]
    path = tmp_path / ("s.pt" if layout == "pt_list" else "s.npz")
    if layout == "seq_i":
        np.savez(path, **{f"seq_{i}": s for i, s in enumerate(seqs)})
    elif layout == "packed":
        np.savez(path, values=np.concatenate(seqs), lengths=np.array([len(s) for s in seqs]))
    elif layout == "pt_list":
        torch.save({"sequences": [torch.tensor(s) for s in seqs]}, path)
    else:
        np.savez(path, values=np.stack(seqs))
    data = load_user_data(path, "sequences")
    assert data.dim == 3 and not data.binary and data.collate_fn.__name__ == "pad_collate"
    got = [data.splits[s][i] for s in ("train", "valid", "test")
           for i in range(len(data.splits[s]))]
    assert len(got) == len(seqs)
    want = sorted(tuple(np.asarray(s, np.float32).ravel()) for s in seqs)
    assert sorted(tuple(g.numpy().ravel()) for g in got) == want


def test_irregular_nan_is_missing_and_the_mask_is_kept(tmp_path):
    times, values = _series(n=10)
    observed = (RNG.random(values.shape) > 0.3) & ~np.isnan(values)
    observed[:, 0] = True
    np.savez(tmp_path / "nan.npz", times=times, values=np.where(observed, values, np.nan))
    # with a mask, the values at mask 0 may be anything (NaN included)
    np.savez(tmp_path / "mask.npz", times=times, values=np.where(observed, values, 7.0),
             mask=observed.astype(np.float32))
    for name in ("nan", "mask"):
        data = load_user_data(tmp_path / f"{name}.npz", "irregular", seed=3)
        for split in data.splits.values():
            for item in split.items:
                i = int(np.argmin(np.abs(times[:, 0] - float(item["times"][0]))))
                assert np.array_equal(item["mask"].numpy(), observed[i])
                want = np.where(observed[i], values[i], 0.0).astype(np.float32)
                assert np.array_equal(item["values"].numpy(), want)  # missing entries hold 0
                assert np.allclose(item["times"].numpy(), times[i])


def test_irregular_shared_and_packed_times(tmp_path):
    _, values = _series(n=6, t=5)
    grid = np.linspace(0, 1, 5)
    np.savez(tmp_path / "shared.npz", times=grid, values=values)
    data = load_user_data(tmp_path / "shared.npz", "irregular")
    assert all(torch.allclose(it["times"], torch.tensor(grid, dtype=torch.float32))
               for d in data.splits.values() for it in d.items)
    lengths = np.array([2, 3, 1, 4, 2, 3])
    times = np.concatenate([np.arange(n, dtype=float) for n in lengths])
    packed = RNG.normal(size=(lengths.sum(), 2))
    np.savez(tmp_path / "packed.npz", times=times, values=packed, lengths=lengths)
    data = load_user_data(tmp_path / "packed.npz", "irregular")
    assert sorted(len(it["times"]) for d in data.splits.values() for it in d.items) == \
        sorted(lengths.tolist())


def test_extrapolation_masks_split_at_the_middle_of_the_time_range(tmp_path):
    times, values = _series(n=10)
    np.savez(tmp_path / "s.npz", times=times, values=values)
    data = load_user_data(tmp_path / "s.npz", "irregular")
    split = (times.min() + times.max()) / 2
    tasks = task_datasets(data.splits, "extrap", fraction=1.0)
    for d in tasks.values():
        for it in d.items:
            before = (it["times"] <= split).unsqueeze(-1)
            assert not (it["obs_mask"].bool() & ~before).any()  # the encoder sees the past
            assert not (it["mask"].bool() & before).any()  # the future is scored
    interp = task_datasets(data.splits, "interp", fraction=0.5)
    item = interp["train"].items[0]
    assert torch.equal(item["mask"], data.splits["train"].items[0]["mask"])
    assert 0 < item["obs_mask"].sum() < item["mask"].sum()


# ----------------------------------------------------------------------------- training


def _write_family(tmp_path, family):
    if family == "vectors":
        x, y = _images(40)
        path = tmp_path / "images.npz"
        np.savez(path, x=x, y=y)
    elif family == "sequences":
        path = tmp_path / "sequences.npz"
        np.savez(path, **{f"seq_{i}": s for i, s in enumerate(_sequences(15))})
    else:
        times, values = _series(n=15)
        path = tmp_path / "series.npz"
        np.savez(path, times=times, values=values)
    return path


SYSTEMS = [("vae", "vectors"), ("flow_density", "vectors"), ("sbn", "vectors"),
           ("vrnn", "sequences"),
           ("rnn", "sequences"), ("latent_ode", "irregular"), ("ode_rnn", "irregular"),
           ("rnn_dt", "irregular")]


@pytest.mark.parametrize("system,family", SYSTEMS, ids=[s for s, _ in SYSTEMS])
def test_every_system_trains_and_evaluates_from_a_user_file_on_the_command_line(
        tmp_path, capsys, monkeypatch, system, family):
    path = _write_family(tmp_path, family)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    argv = ["train", system, "--data", path.name, *TINY[system], "--num-steps", "2",
            "--batch-size", "4", "--valid-every", "2", "--run-dir", str(run)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["data"] == str(path.resolve())  # found again from anywhere
    if system in ("vae", "flow_density", "sbn", "vrnn", "latent_ode"):
        monkeypatch.chdir("/")
        assert main(["evaluate", str(run), "--num-samples", "3", "--split", "valid"]) == 0
        scores = json.loads((run / "eval_valid_K3.json").read_text())
        assert np.isfinite(scores["log_marginal"]) and scores["log_marginal"] >= \
            scores["elbo"] - 1e-3


def test_evaluate_scores_another_file_with_a_trained_run(tmp_path, capsys):
    x, _ = _images(60)
    np.savez(tmp_path / "a.npz", x=x[:40])
    np.savez(tmp_path / "b.npz", x=x[40:])  # 20 images the run never saw
    run = tmp_path / "run"
    assert main(["train", "vae", "--data", str(tmp_path / "a.npz"), *TINY["vae"],
                 "--num-steps", "20", "--batch-size", "10", "--run-dir", str(run)]) == 0
    scores = {}
    for split in ("train", "valid", "test", "all"):
        assert main(["evaluate", str(run), "--data", str(tmp_path / "b.npz"), "--split", split,
                     "--num-samples", "20"]) == 0
        scores[split] = json.loads((run / f"eval_b_{split}_K20.json").read_text())
    parts = [scores[s] for s in ("train", "valid", "test")]
    assert [p["num_points"] for p in parts] == [16, 2, 2] and scores["all"]["num_points"] == 20
    # the whole file's mean is the size-weighted mean of its splits' (Monte Carlo: 4 SEM)
    pooled = sum(p["log_marginal"] * p["num_points"] for p in parts) / 20
    sem = scores["all"]["log_marginal_sem"]
    assert abs(pooled - scores["all"]["log_marginal"]) < 4 * max(sem, 0.05)
    assert json.loads((run / "config.json").read_text())["options"]["data"].endswith("a.npz")


def test_a_bad_file_is_one_line_on_the_command_line(tmp_path, capsys):
    np.savez(tmp_path / "gray.npz", x=RNG.integers(0, 256, (10, 4, 4)).astype(np.uint8))
    code = main(["train", "vae", "--data", str(tmp_path / "gray.npz"), "--num-steps", "1",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "data=" in err and "'x'" in err and "(x > 127).astype(np.uint8)" in err


def test_data_on_a_system_that_reads_no_file_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from torch import nn

    from pyro_seqlatent import registry

    spec = registry.ModelSpec(name="nodata", build=lambda o: (nn.Linear(1, 1), nn.Linear(1, 1)),
                              datasets=lambda o, r: {}, defaults={"dataset": "toy"})
    monkeypatch.setitem(registry._REGISTRY, "nodata", spec)
    with pytest.raises(SystemExit) as info:
        main(["train", "nodata", "--data", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "'nodata' does not train on your own files" in err
    assert "vae" in err and "latent_ode" in err and "own-data.md" in err


def test_the_flow_density_dequantizes_integer_levels_and_refuses_floats_outside_0_1(tmp_path):
    from pyro_seqlatent.models.flow_density import user_data, user_datasets

    levels = RNG.integers(0, 5, (30, 3, 2)).astype(np.int16)
    levels[0, 0, 0] = 4  # L = 5
    np.savez(tmp_path / "k.npz", x=levels)
    user = user_data({"data": str(tmp_path / "k.npz")})
    assert (user.levels, user.dim, user.item_shape) == (5, 6, (3, 2))
    splits = user_datasets(user)
    for split in ("train", "valid", "test"):
        k = user.splits[split].x  # the levels, as floats
        x = torch.stack([splits[split][i] for i in range(len(k))])
        assert torch.equal(torch.floor(x * 5), k) and ((x * 5 - k) > 0).all()
    valid = splits["valid"]
    assert torch.equal(valid[0], valid[0]) and not torch.equal(splits["train"][0],
                                                               splits["train"][0])
    np.savez(tmp_path / "f.npz", x=RNG.random((30, 4)) * 2)
    with pytest.raises(UserDataError, match=r"floats from .* \[0, 1\)"):
        user_datasets(user_data({"data": str(tmp_path / "f.npz")}))


def test_training_from_arrays_in_python():
    from pyro_seqlatent.infer import train
    from pyro_seqlatent.models.latent_ode import LatentODEGuide, LatentODEModel
    from pyro_seqlatent.models.vae import VAE, VAEGuide
    from pyro_seqlatent.models.vrnn import build_vrnn

    x, _ = _images(20)
    times, values = _series(n=10)
    cases = [
        (load_user_data({"x": torch.as_tensor(x)}, "vectors", binary=True),
         lambda d: (lambda m: (m, VAEGuide(d, 2, (8,), model=m)))(VAE(d, 2, (8,)))),
        (load_user_data({"sequences": [torch.tensor(s) for s in _sequences(10)]}, "sequences"),
         lambda d: build_vrnn(d, z_dim=2, h_dim=8, feature_dim=8, hidden_dim=8,
                              emission="gaussian")),
        (load_user_data({"times": times, "values": values}, "irregular"),
         lambda d: (LatentODEModel(d, 2, (8,), method="euler"),
                    LatentODEGuide(d, 2, 8, (8,)))),
    ]
    for data, build in cases:
        model, guide = build(data.dim)
        result = train(model, guide, data.splits["train"], valid_data=data.splits["valid"],
                       collate_fn=data.collate_fn, num_steps=2, batch_size=4, valid_every=2,
                       progress=False)
        assert result.step == 2 and np.isfinite(result.final_loss), data.family


# ----------------------------------------------------------------------------- bad files


class _Anything:
    pass


def _bad_files(tmp_path):
    """``(name, family, writer, phrases the message must hold)``."""
    seqs = _sequences(5)
    times, values = _series(n=5)
    yield "missing key", "vectors", lambda p: np.savez(p, X=np.zeros((5, 3))), \
        ["no key 'x'", "x (N, D)"]
    yield "wrong family", "vectors", lambda p: np.savez(p, values=np.concatenate(seqs),
                                                        lengths=[len(s) for s in seqs]), \
        ["no key 'x'", "vrnn or rnn"]
    yield "unknown key", "sequences", lambda p: np.savez(p, values=np.zeros((5, 2, 3)),
                                                         lenghts=[1]), \
        ["unexpected key(s) ['lenghts']", "values, lengths"]
    yield "string dtype", "vectors", lambda p: np.savez(p, x=np.array([["a", "b"]] * 5)), \
        ["key 'x'", "not numeric", "bool, int or float"]
    yield "object array", "sequences", \
        lambda p: np.savez(p, values=np.array(seqs, dtype=object)), \
        ["key 'values' is an object array", "never loaded", "seq_0, seq_1"]
    yield "pickled npz", "vectors", lambda p: p.write_bytes(pickle.dumps({"x": [1, 2]})), \
        ["pickled Python objects", "never loaded", "numpy.savez"]
    yield "pickled pt", "vectors", lambda p: torch.save({"x": _Anything()}, p), \
        ["weights_only=True", "dict of tensors"]
    yield "unnamed array", "vectors", lambda p: np.save(open(p, "wb"), np.zeros((5, 3))), \
        ["one unnamed array", "numpy.savez(path, x=array)"]
    yield "rank", "vectors", lambda p: np.savez(p, x=np.zeros(5)), \
        ["key 'x' has shape (5,)", "x[:, None]"]
    yield "label count", "vectors", lambda p: np.savez(p, x=np.zeros((5, 2)), y=np.zeros(4)), \
        ["key 'y' has shape (4,)", "one label per example"]
    yield "not binary", "vae", lambda p: np.savez(p, x=np.full((5, 2), 0.5)), \
        ["values other than 0 and 1", "(x > 0.5).astype(np.uint8)"]
    yield "lengths mismatch", "sequences", \
        lambda p: np.savez(p, values=np.zeros((9, 2)), lengths=np.array([4, 4])), \
        ["key 'lengths' sums to 8", "values has 9 rows"]
    yield "packed without lengths", "sequences", lambda p: np.savez(p, values=np.zeros((9, 2))), \
        ["need lengths (N,)", "(N, T, D)"]
    yield "gap in seq_i", "sequences", lambda p: np.savez(p, seq_0=seqs[0], seq_2=seqs[1]), \
        ["without gaps", "seq_1"]
    yield "NaN in sequences", "sequences", \
        lambda p: np.savez(p, values=np.full((5, 2, 2), np.nan)), \
        ["key 'values' has 20 NaN", "drop or impute"]
    yield "NaN where the mask is 1", "irregular", \
        lambda p: np.savez(p, times=times, values=values, mask=np.ones(values.shape)), \
        ["has NaN where the mask is 1", "set the mask to 0"]
    yield "fractional mask", "irregular", \
        lambda p: np.savez(p, times=times, values=np.nan_to_num(values),
                           mask=np.full(values.shape, 0.5)), \
        ["key 'mask' holds values other than 0 and 1", "(mask > 0)"]
    yield "times shape", "irregular", \
        lambda p: np.savez(p, times=times[:, :3], values=values), \
        ["key 'times' has shape (5, 3)", "times (T,)"]
    yield "unsorted times", "irregular", \
        lambda p: np.savez(p, times=times[:, ::-1], values=values), \
        ["times", "sorted in increasing order"]
    yield "missing split", "vectors", lambda p: np.savez(p, train_x=np.zeros((5, 2)),
                                                         test_x=np.zeros((2, 2))), \
        ["none of ['valid']", "valid_*"]
    yield "too few", "vectors", lambda p: np.savez(p, x=np.zeros((2, 2))), \
        ["2 examples are too few"]
    yield "extension", "vectors", lambda p: p.with_suffix(".csv").write_text("1,2"), \
        ["unknown file type '.csv'", "numpy.savez"]


def test_every_bad_file_gets_one_clear_error(tmp_path):
    checked = 0
    for name, family, write, phrases in _bad_files(tmp_path):
        path = tmp_path / (name.replace(" ", "_") + (".pt" if "pt" in name.split() else ".npz"))
        write(path)
        if name == "extension":
            path = path.with_suffix(".csv")
        binary = family == "vae"
        with pytest.raises(UserDataError) as info:
            load_user_data(path, "vectors" if binary else family, binary=binary)
        message = str(info.value)
        assert message.startswith(f"data={path}") and "\n" not in message, name
        for phrase in phrases:
            assert phrase in message, f"{name}: {phrase!r} not in {message!r}"
        checked += 1
    assert checked == 22


def test_read_arrays_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"x": _Anything()}))
    with pytest.raises(UserDataError, match="pickled"):
        read_arrays(path)
    with pytest.raises(UserDataError, match="no such file"):
        read_arrays(tmp_path / "missing.npz")
