"""Unreadable data and cache files: one error type (DataFileError) whose one-line message names
the file, says what is wrong and what to do; corrupt caches are rebuilt with a warning.

Every case builds a small damaged file under ``tmp_path`` laid out as the data root
(``binarized_mnist/``, ``jsb_chorales/``, ``fsdd/``, ``physionet2012/``) or as the cache folder
(``$PYRO_SEQLATENT_CACHE``).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import wave

import numpy as np
import pytest
import torch

from pyro_seqlatent.data import fsdd, hopper, jsb, mnist, physionet
from pyro_seqlatent.data.root import DataFileError, DataNotFoundError


def _put(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _assert_names(err: pytest.ExceptionInfo, path, *words):
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_data_file_error_is_reported_as_missing_data_and_as_a_value_error():
    assert issubclass(DataFileError, DataNotFoundError)  # the CLI prints it as one line
    assert issubclass(DataFileError, ValueError)


# ------------------------------------------------------------------------------------- MNIST
def _mat_bytes(**arrays) -> bytes:
    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, arrays)
    return buffer.getvalue()


def _mnist_file(root, data: bytes):
    return _put(root / "binarized_mnist" / "binarized_mnist_train.mat", data)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_mnist_unreadable_mat(tmp_path, damage):
    good = _mat_bytes(X=np.zeros((3, 784), dtype=np.uint8))
    data = {"garbage": b"not a MATLAB file" * 20, "truncated": good[: len(good) // 2],
            "empty": b""}[damage]
    path = _mnist_file(tmp_path, data)
    with pytest.raises(DataFileError) as err:
        mnist.load_binarized_mnist("train", tmp_path)
    _assert_names(err, path, "MATLAB", "Copy the data folder again")


@pytest.mark.parametrize("arrays, found", [({"Y": np.zeros((2, 784))}, "no variable X"),
                                           ({"X": np.zeros((2, 10))}, "(2, 10)")])
def test_mnist_mat_without_the_expected_images(tmp_path, arrays, found):
    path = _mnist_file(tmp_path, _mat_bytes(**arrays))
    with pytest.raises(DataFileError) as err:
        mnist.load_binarized_mnist("train", tmp_path)
    _assert_names(err, path, "(N, 784)", found)


def test_mnist_good_file_still_loads(tmp_path):
    _mnist_file(tmp_path, _mat_bytes(X=np.eye(784, dtype=np.uint8)[:5]))
    assert mnist.load_binarized_mnist("train", tmp_path).shape == (5, 784)


# --------------------------------------------------------------------------------------- JSB
def _jsb_file(root, data: bytes):
    return _put(root / jsb.RELATIVE_PATH, data)


_CHORALE = [[(60, 64, 67), (62,)], [(43,)]]


def test_jsb_truncated_pickle(tmp_path):
    good = pickle.dumps({s: _CHORALE for s in jsb.SPLITS}, protocol=2)
    path = _jsb_file(tmp_path, good[: len(good) // 2])
    with pytest.raises(DataFileError) as err:
        jsb.load_jsb("train", tmp_path)
    _assert_names(err, path, "pickle", "Copy the data folder again")


def test_jsb_pickle_with_a_code_global_is_refused(tmp_path):
    path = _jsb_file(tmp_path, pickle.dumps({"train": os.getcwd}, protocol=2))
    with pytest.raises(DataFileError) as err:
        jsb.load_raw(tmp_path)
    _assert_names(err, path, "refusing to load global")


@pytest.mark.parametrize("content, words", [
    ([1, 2, 3], ["expected a dict", "list"]),
    ({"train": _CHORALE}, ["expected a dict", "train"]),
    ({s: [[("C4",)]] for s in jsb.SPLITS}, ["MIDI notes"]),
    ({s: [[(12,)]] for s in jsb.SPLITS}, ["MIDI notes", "outside the piano range"]),
])
def test_jsb_pickle_of_the_wrong_shape(tmp_path, content, words):
    path = _jsb_file(tmp_path, pickle.dumps(content, protocol=2))
    with pytest.raises(DataFileError) as err:
        jsb.load_jsb_splits(tmp_path)
    _assert_names(err, path, *words)


def test_jsb_good_pickle_still_loads(tmp_path):
    _jsb_file(tmp_path, pickle.dumps({s: _CHORALE for s in jsb.SPLITS}, protocol=2))
    assert jsb.load_jsb("valid", tmp_path, max_sequences=1).sequences[0].shape == (2, 88)


# -------------------------------------------------------------------------------------- FSDD
def _wav(rate=8000, channels=1, width=2, frames=400) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        samples = (np.arange(frames * channels) % 200 - 100).astype(f"<i{width}")
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fsdd_members(**replace) -> dict[str, bytes]:
    members = {f"recordings/{d}_jackson_{i}.wav": _wav() for d in (0, 1) for i in (0, 5, 10)}
    members.update(replace)
    return members


def _fsdd_file(root, data: bytes):
    return _put(root / fsdd.RELATIVE_PATH, data)


@pytest.mark.parametrize("damage", ["not_gzip", "truncated", "empty"])
def test_fsdd_unreadable_archive(tmp_path, damage):
    good = _tar_gz(_fsdd_members())
    data = {"not_gzip": b"PK\x03\x04 a zip, not a gzip" * 10, "truncated": good[: len(good) // 2],
            "empty": b""}[damage]
    path = _fsdd_file(tmp_path, data)
    with pytest.raises(DataFileError) as err:
        fsdd.load_fsdd_splits(tmp_path)
    _assert_names(err, path, ".tar.gz", "Copy the data folder again")


def test_fsdd_corrupt_wav_member(tmp_path):
    name = "recordings/1_jackson_10.wav"
    path = _fsdd_file(tmp_path, _tar_gz(_fsdd_members(**{name: b"RIFF....WAVEjunk"})))
    with pytest.raises(DataFileError) as err:
        fsdd.read_recordings(tmp_path)
    _assert_names(err, path, name, "WAV")


def test_fsdd_wav_of_the_wrong_format(tmp_path):
    name = "recordings/1_jackson_10.wav"
    path = _fsdd_file(tmp_path, _tar_gz(_fsdd_members(**{name: _wav(rate=16000)})))
    with pytest.raises(DataFileError) as err:
        fsdd.read_recordings(tmp_path)
    _assert_names(err, path, name, "16000")


def test_fsdd_archive_without_recordings(tmp_path):
    path = _fsdd_file(tmp_path, _tar_gz({"README.md": b"hello"}))
    with pytest.raises(DataFileError) as err:
        fsdd.read_recordings(tmp_path)
    _assert_names(err, path, "no recordings")


def test_fsdd_good_archive_still_loads(tmp_path):
    _fsdd_file(tmp_path, _tar_gz(_fsdd_members()))
    splits = fsdd.load_fsdd_splits(tmp_path)
    assert [len(splits[s]) for s in fsdd.SPLITS] == [2, 2, 2]


# --------------------------------------------------------------------------------- PhysioNet
_RECORD = b"Time,Parameter,Value\n00:00,RecordID,132539\n00:07,HR,80\n01:37,HR,75\n02:00,Temp,37\n"


def _physionet_file(root, data: bytes):
    return _put(root / physionet.ARCHIVE, data)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PYRO_SEQLATENT_CACHE", str(folder))
    return folder


def _physionet_good(root):
    return _physionet_file(root, _tar_gz({"set-a/132539.txt": _RECORD,
                                          "set-b/142539.txt": _RECORD.replace(b"80", b"90")}))


@pytest.mark.parametrize("damage", ["not_gzip", "truncated"])
def test_physionet_unreadable_archive(tmp_path, cache, damage):
    good = _tar_gz({"set-a/132539.txt": _RECORD * 50})
    data = {"not_gzip": b"plain text, not a gzip file\n" * 10,
            "truncated": good[: len(good) // 2]}[damage]
    path = _physionet_file(tmp_path, data)
    with pytest.raises(DataFileError) as err:
        physionet.load_raw(tmp_path)
    _assert_names(err, path, ".tar.gz", "Copy the data folder again")
    assert not list(cache.glob("*.pt"))  # nothing cached from a damaged archive


def test_physionet_record_that_is_not_csv(tmp_path, cache):
    bad = b"Time,Parameter,Value\nsoon,HR,80\n"
    path = _physionet_file(tmp_path, _tar_gz({"set-a/132540.txt": bad}))
    with pytest.raises(DataFileError) as err:
        physionet.load_raw(tmp_path)
    _assert_names(err, path, "set-a/132540.txt", "HH:MM")


def test_physionet_archive_without_records(tmp_path, cache):
    path = _physionet_file(tmp_path, _tar_gz({"Outcomes-a.txt": b"RecordID,In-hospital_death\n"}))
    with pytest.raises(DataFileError) as err:
        physionet.load_raw(tmp_path)
    _assert_names(err, path, "no set-a/ or set-b/ record")


def _only_cache_file(cache):
    (path,) = cache.glob("physionet2012_raw*.pt")
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_content", "code"])
def test_physionet_corrupt_cache_is_rebuilt(tmp_path, cache, damage):
    _physionet_good(tmp_path)
    first = physionet.load_raw(tmp_path)
    path = _only_cache_file(cache)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 30)
    elif damage == "wrong_content":
        torch.save({"ids": torch.arange(3)}, path)
    else:  # a pickled callable: refused by the safe load, never run
        path.write_bytes(pickle.dumps(os.getcwd))
    with pytest.warns(UserWarning, match=f"cache file {path}.*deleted, rebuilding it"):
        again = physionet.load_raw(tmp_path)
    for key, value in first.items():
        assert torch.equal(again[key], value), key
    assert torch.load(path, weights_only=True)["ids"].tolist() == [132539, 142539]


def test_physionet_cache_that_cannot_be_deleted_is_refused_naming_it(tmp_path, cache,
                                                                    monkeypatch):
    _physionet_good(tmp_path)
    physionet.load_raw(tmp_path)
    path = _only_cache_file(cache)
    path.write_bytes(b"broken")

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "unlink", refuse)
    with pytest.raises(DataFileError) as err:
        physionet.load_raw(tmp_path)
    _assert_names(err, path, "cannot be deleted", "Delete it by hand")


# ------------------------------------------------------------------------------------ hopper
@pytest.fixture
def fake_hopper(monkeypatch):
    """generate_hopper replaced by a seeded random set (no dm-control); counts its calls."""
    calls = []

    def generate(n_traj, n_steps, seed, indices=None):
        calls.append(indices)
        full = np.random.RandomState(seed).randn(n_traj, n_steps, 14).astype(np.float32)
        return full if indices is None else full[list(indices)]

    monkeypatch.setattr(hopper, "generate_hopper", generate)
    return calls


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape"])
def test_hopper_corrupt_cache_is_regenerated(cache, fake_hopper, damage):
    first = hopper.load_hopper(n_traj=6, n_steps=5, seed=1)
    path = hopper._cache_path(6, 5, 1)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save(torch.zeros(6, 5, 3), path)
    with pytest.warns(UserWarning, match=f"cache file {path}"):
        again = hopper.load_hopper(n_traj=6, n_steps=5, seed=1)
    assert torch.equal(again, first)
    assert len(fake_hopper) == 2


def test_hopper_corrupt_range_cache_is_rebuilt(cache, fake_hopper):
    hopper.load_hopper(n_traj=6, n_steps=5, seed=1)
    path = hopper._cache_path(6, 5, 1, "_range")
    expected = torch.load(path, weights_only=True)
    path.write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match=f"cache file {path}"):
        reference = hopper.load_hopper(n_traj=6, n_steps=5, seed=1, protocol="reference")
    saved = torch.load(path, weights_only=True)
    torch.testing.assert_close(saved["lo"], expected["lo"])
    torch.testing.assert_close(saved["hi"], expected["hi"])
    assert reference.shape == (6, 5, 14)


# ------------------------------------------------------------------------------ command line
def test_cli_prints_one_line_for_a_corrupt_data_file(tmp_path, capsys):
    from pyro_seqlatent.cli import main

    good = _mat_bytes(X=np.zeros((3, 784), dtype=np.uint8))
    for split in mnist.SPLITS:
        path = _put(tmp_path / "binarized_mnist" / f"binarized_mnist_{split}.mat", good)
    bad = _put(tmp_path / "binarized_mnist" / "binarized_mnist_train.mat", good[:200])
    code = main(["train", "vae", "--num-steps", "1", "--data-root", str(tmp_path),
                 "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyro-seqlatent: error: ")
    assert str(bad) in lines[0] and "Copy the data folder again" in lines[0]
    assert path.exists()
