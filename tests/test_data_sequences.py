"""Padded batches and masks; JSB and FSDD loaders on the real files (skipped when absent)."""

import io
import pickle

import numpy as np
import pytest
import torch

from conftest import require_data
from pyro_seqlatent.data.fsdd import frame, split_of
from pyro_seqlatent.data.jsb import (
    LOWEST_MIDI,
    NUM_KEYS,
    RestrictedUnpickler,
    piano_roll,
)
from pyro_seqlatent.data.sequences import (
    PadCollate,
    SequenceDataset,
    check_padded_batch,
    pad_collate,
)


def test_pad_collate_pads_with_zeros_and_masks_the_tail():
    seqs = [torch.ones(3, 2), 2 * torch.ones(5, 2), 3 * torch.ones(1, 2)]
    batch = pad_collate(seqs)
    x, mask = batch["x"], batch["mask"]
    assert x.shape == (3, 5, 2) and mask.shape == (3, 5) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 5, 1]
    for b, s in enumerate(seqs):
        n = s.shape[0]
        assert torch.equal(x[b, :n], s)
        assert torch.all(x[b, n:] == 0)
        assert mask[b, :n].all() and not mask[b, n:].any()


def test_pad_to_multiple_rounds_length_up():
    batch = PadCollate(8)([torch.ones(3, 2), torch.ones(9, 2)])
    assert batch["x"].shape == (2, 16, 2)
    assert batch["mask"].sum().item() == 12


def test_sequence_dataset_rejects_bad_sequences():
    with pytest.raises(ValueError, match="features"):
        SequenceDataset([torch.zeros(3, 2), torch.zeros(3, 4)])
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        SequenceDataset([torch.zeros(3)])
    with pytest.raises(ValueError, match="no sequences"):
        SequenceDataset([])
    ds = SequenceDataset([torch.zeros(3, 2), torch.zeros(4, 2)])
    assert ds.num_steps() == 7 and ds.feature_dim == 2


def test_check_padded_batch_errors_name_the_argument():
    x = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="x_dim=5"):
        check_padded_batch(x, None, 5, "m")
    with pytest.raises(ValueError, match="mask has shape"):
        check_padded_batch(x, torch.ones(2, 3, dtype=torch.bool), 3, "m")
    with pytest.raises(TypeError, match="torch.bool"):
        check_padded_batch(x, torch.ones(2, 4), 3, "m")
    bad = x.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_padded_batch(bad, None, 3, "m")
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1:] = False  # NaN only in padding: fine
    assert torch.equal(check_padded_batch(bad, mask, 3, "m"), mask)


def test_piano_roll_keys():
    roll = piano_roll([(21, 108), (60,), ()])
    assert roll.shape == (3, NUM_KEYS)
    assert roll[0, 0] == 1 and roll[0, 87] == 1 and roll[1, 60 - LOWEST_MIDI] == 1
    assert roll.sum() == 3
    with pytest.raises(ValueError, match="MIDI note"):
        piano_roll([(120,)])


def test_restricted_unpickler_refuses_other_globals():
    payload = pickle.dumps(io.BytesIO)  # any global outside numpy scalar/dtype
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    ok = pickle.dumps({"a": np.float64(1.5)})
    assert RestrictedUnpickler(io.BytesIO(ok)).load()["a"] == 1.5


def test_fsdd_framing_and_split():
    w = np.arange(450.0)
    f = frame(w, 200)
    assert f.shape == (2, 200) and f[1, 0] == 200
    assert [split_of(i) for i in (0, 4, 5, 9, 10, 49)] == [
        "test", "test", "valid", "valid", "train", "train"]


@pytest.mark.data
def test_jsb_real_split_sizes_and_range():
    require_data("jsb_chorales/jsb_chorales.pickle")
    from pyro_seqlatent.data.jsb import load_jsb_splits

    splits = load_jsb_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 229, "valid": 76, "test": 77}
    allx = torch.cat([s for s in splits["train"].sequences])
    assert allx.shape[1] == 88
    used = allx.sum(0).nonzero().flatten()
    # the notes present are MIDI 43..96 as the data README says
    assert used.min().item() + LOWEST_MIDI >= 43 and used.max().item() + LOWEST_MIDI <= 96
    lengths = torch.cat([splits[k].lengths for k in splits])
    assert lengths.min() >= 25 and lengths.max() <= 160


@pytest.mark.data
def test_fsdd_real_split_and_normalisation():
    require_data("fsdd/fsdd_recordings.tar.gz")
    from pyro_seqlatent.data.fsdd import load_fsdd_splits

    splits = load_fsdd_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 2400, "valid": 300, "test": 300}
    train = torch.cat(splits["train"].sequences)
    assert train.shape[1] == 200
    # normalised over all train samples (the dropped tails make it approximate)
    assert abs(train.mean().item()) < 0.05 and abs(train.std().item() - 1) < 0.05


def test_transpose_rolls_against_shifted_note_lists():
    from pyro_seqlatent.data.jsb import transpose_rolls

    # a low chorale (lowest note MIDI 22: only one shift down fits) and a high one (top 107)
    low = [[22, 40], [30], []]
    high = [[60, 107], [100]]
    data = SequenceDataset([piano_roll(low), piano_roll(high)], name="toy")
    out = transpose_rolls(data, 2)
    expected = [piano_roll([[n + s for n in f] for f in low]) for s in (-1, 0, 1, 2)]
    expected += [piano_roll([[n + s for n in f] for f in high]) for s in (-2, -1, 0, 1)]
    assert len(out) == len(expected)
    for got, want in zip(out.sequences, expected):
        assert torch.equal(got, want)
    assert out.num_steps() == 4 * 3 + 4 * 2
    assert transpose_rolls(data, 0) is data
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_shift"):
            transpose_rolls(data, bad)
    with pytest.raises(ValueError, match="88-key"):
        transpose_rolls(SequenceDataset([torch.zeros(3, 5)]), 1)
    silent = SequenceDataset([torch.zeros(2, 88)])
    assert len(transpose_rolls(silent, 3)) == 1


@pytest.mark.data
def test_transposed_jsb_training_split_only():
    require_data("jsb_chorales/jsb_chorales.pickle")
    from pyro_seqlatent.models.vrnn import sequence_datasets

    plain = sequence_datasets({"dataset": "jsb"})
    moved = sequence_datasets({"dataset": "jsb", "transpose": 3})
    # every training chorale spans MIDI 43..96 at most, so all 7 shifts fit
    assert len(moved["train"]) == 7 * len(plain["train"])
    assert moved["train"].num_steps() == 7 * plain["train"].num_steps()
    for split in ("valid", "test"):
        assert all(torch.equal(a, b) for a, b in zip(plain[split], moved[split]))
    with pytest.raises(ValueError, match="transpose"):
        sequence_datasets({"dataset": "fsdd", "transpose": 2})
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="transpose must be an int"):
            sequence_datasets({"dataset": "jsb", "transpose": bad})
