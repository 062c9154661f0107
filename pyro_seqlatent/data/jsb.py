r"""JSB Chorales (Boulanger-Lewandowski et al. 2012) as 88-key binary piano rolls.

Frame :math:`t` of a chorale is the set of MIDI notes sounding; the piano roll is
:math:`x_t \in \{0, 1\}^{88}` with :math:`x_{t,k} = 1` iff MIDI note :math:`21 + k` sounds
(keys MIDI 21..108, A0..C8). The standard split is 229 / 76 / 77 chorales (train / valid / test).

The data file is a Python 2 pickle; it is read with a restricted unpickler that allows exactly
the two numpy globals the file refers to and refuses every other global, so a tampered file
cannot run code.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from pyro_seqlatent.data.root import data_file, data_file_error, reading_data_file
from pyro_seqlatent.data.sequences import SequenceDataset

RELATIVE_PATH = "jsb_chorales/jsb_chorales.pickle"
LOWEST_MIDI = 21
NUM_KEYS = 88
SPLITS = ("train", "valid", "test")
SPLIT_SIZES = {"train": 229, "valid": 76, "test": 77}

_ALLOWED = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's ``scalar`` and ``dtype`` and refuses all else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a data file (only numpy "
                "scalar/dtype are allowed)"
            )
        if name == "dtype":
            return np.dtype
        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar
        return scalar


def load_raw(root: str | os.PathLike | None = None) -> dict[str, list]:
    """The pickle's dict ``{"train", "valid", "test"}`` of lists of lists of note tuples."""
    path = data_file(RELATIVE_PATH, root)
    with reading_data_file(path, "not a readable JSB Chorales pickle (truncated, corrupt, or "
                                 "it refers to Python objects other than numpy scalars)"):
        with open(path, "rb") as handle:
            data = RestrictedUnpickler(handle, encoding="latin1").load()
    if not isinstance(data, dict) or set(SPLITS) - set(data):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise data_file_error(path, f"expected a dict with keys {SPLITS}, found {found}")
    return data


def _rolls(sequences, root, limit: int | None) -> list[torch.Tensor]:
    """Piano rolls of the first ``limit`` chorales of one split of the pickle (all if ``None``);
    malformed content is an error naming the file."""
    with reading_data_file(data_file(RELATIVE_PATH, root),
                           "a split is not a list of chorales, each a list of frames of MIDI "
                           "notes 21..108"):
        return [piano_roll(seq) for seq in sequences[:limit]]


def piano_roll(frames) -> torch.Tensor:
    """``(T, 88)`` float tensor from a list of frames, each an iterable of MIDI notes."""
    roll = torch.zeros(len(frames), NUM_KEYS)
    for t, notes in enumerate(frames):
        for note in notes:
            key = int(note) - LOWEST_MIDI
            if not 0 <= key < NUM_KEYS:
                raise ValueError(f"MIDI note {note} outside the piano range 21..108")
            roll[t, key] = 1.0
    return roll


def load_jsb(
    split: str, root: str | os.PathLike | None = None, max_sequences: int | None = None
) -> SequenceDataset:
    """JSB Chorales ``split`` (``"train"``, ``"valid"`` or ``"test"``) as piano rolls.

    :param max_sequences: keep only the first ``n`` chorales (smoke tests, demos).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    raw = load_raw(root)[split]
    return SequenceDataset(_rolls(raw, root, max_sequences), name=f"jsb_{split}")


def load_jsb_splits(root=None, max_sequences: int | None = None) -> dict[str, SequenceDataset]:
    """All three splits, reading the file once."""
    raw = load_raw(root)
    out = {}
    for split in SPLITS:
        out[split] = SequenceDataset(_rolls(raw[split], root, max_sequences),
                                     name=f"jsb_{split}")
    return out


def transpose_rolls(dataset: SequenceDataset, max_shift: int) -> SequenceDataset:
    r"""Every piano roll of ``dataset`` transposed by every :math:`s \in \{-k, \dots, k\}`
    semitones (:math:`k` = ``max_shift``) that keeps all its notes on the keyboard:
    :math:`x^{(s)}_{t,j} = x_{t,j-s}`.

    A training-set augmentation for key-invariant music models (a chorale moved up or down a
    few semitones is still a plausible chorale); apply it to the training split only, so the
    validation and test figures stay those of the original chorales. ``max_shift=0`` returns
    ``dataset`` itself. Shifts that would push a note off the 88 keys are skipped for that roll
    only, so the result holds at most :math:`2k + 1` versions of each; a roll without any note
    is kept once (its transpositions would be copies of it).
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0 (semitones), got {max_shift!r}")
    if max_shift == 0:
        return dataset
    if dataset.feature_dim != NUM_KEYS:
        raise ValueError(f"{dataset.name}: transposition needs {NUM_KEYS}-key piano rolls, got "
                         f"{dataset.feature_dim} features")
    out = []
    for roll in dataset.sequences:
        keys = roll.sum(0).nonzero().flatten()
        low, high = (int(keys.min()), int(keys.max())) if len(keys) else (0, NUM_KEYS - 1)
        for shift in range(-max_shift, max_shift + 1):
            if low + shift < 0 or high + shift >= NUM_KEYS:
                continue
            moved = torch.zeros_like(roll)
            if shift >= 0:
                moved[:, shift:] = roll[:, :NUM_KEYS - shift]
            else:
                moved[:, :shift] = roll[:, -shift:]
            out.append(moved)
    return SequenceDataset(out, name=f"{dataset.name}_transposed{max_shift}")
