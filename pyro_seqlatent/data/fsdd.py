r"""Free Spoken Digit Dataset: raw 8 kHz speech waveforms as sequences of 200-sample frames.

Each recording ``{digit}_{speaker}_{index}.wav`` (mono, 16-bit PCM, 8 kHz) is scaled to
:math:`[-1, 1)`, normalised with the mean :math:`m` and standard deviation :math:`s` of every
training sample, :math:`\tilde w = (w - m) / s`, and cut into non-overlapping frames of
``frame_size = 200`` samples (the VRNN paper's Blizzard setup); a trailing partial frame is
dropped. Sequence ``x`` has shape ``(T, 200)`` with ``T = len(w) // 200``.

Split: recordings with index 0–4 are the test set (the usual FSDD split); index 5–9 form the
validation set; index 10–49 the training set (2,400 / 300 / 300 recordings).
The WAV files are read from the tarball in memory with the standard ``wave`` module.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import wave

import numpy as np
import torch

from pyro_seqlatent.data.root import data_file, data_file_error, reading_data_file
from pyro_seqlatent.data.sequences import SequenceDataset

RELATIVE_PATH = "fsdd/fsdd_recordings.tar.gz"
SAMPLE_RATE = 8000
FRAME_SIZE = 200
SPLITS = ("train", "valid", "test")
_NAME = re.compile(r"(?:^|/)(\d)_([a-z]+)_(\d+)\.wav$")


def split_of(index: int) -> str:
    """The split of a recording with this index: 0–4 test, 5–9 valid, else train."""
    if index < 5:
        return "test"
    if index < 10:
        return "valid"
    return "train"


def read_recordings(root: str | os.PathLike | None = None) -> list[dict]:
    """Every recording as ``{"digit", "speaker", "index", "wave"}`` (float64 in [-1, 1))."""
    path = data_file(RELATIVE_PATH, root)
    out = []
    with reading_data_file(path, "not a readable .tar.gz of WAV recordings (truncated or "
                                 "corrupt)"):
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                match = _NAME.search(member.name)
                if not member.isfile() or match is None:
                    continue
                out.append({
                    "digit": int(match.group(1)),
                    "speaker": match.group(2),
                    "index": int(match.group(3)),
                    "wave": _read_wave(path, member.name, archive.extractfile(member).read()),
                })
    if not out:
        raise data_file_error(path, "no recordings {digit}_{speaker}_{index}.wav in the archive")
    out.sort(key=lambda r: (r["speaker"], r["digit"], r["index"]))
    return out


def _read_wave(path, name: str, data: bytes) -> np.ndarray:
    """Samples of one WAV file of the archive ``path``, float64 in [-1, 1)."""
    with reading_data_file(path, f"its member {name} is not a readable WAV file"):
        with wave.open(io.BytesIO(data)) as wav:
            form = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
            if form != (SAMPLE_RATE, 1, 2):
                raise data_file_error(path, f"its member {name} is not mono 16-bit PCM at 8 kHz "
                                            f"(rate, channels, bytes per sample = {form})")
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float64) / 32768.0


def frame(wave_: np.ndarray, frame_size: int = FRAME_SIZE) -> np.ndarray:
    """``(len // frame_size, frame_size)`` non-overlapping frames (trailing samples dropped)."""
    n = len(wave_) // frame_size
    return np.asarray(wave_[: n * frame_size]).reshape(n, frame_size)


class FSDDSplits(dict):
    """``{"train", "valid", "test"}`` datasets plus the normalisation ``mean`` and ``std``."""

    mean: float
    std: float
    frame_size: int


def load_fsdd_splits(
    root: str | os.PathLike | None = None,
    frame_size: int = FRAME_SIZE,
    max_per_split: int | None = None,
) -> FSDDSplits:
    """The three FSDD splits as :class:`SequenceDataset` of normalised frames.

    :param frame_size: samples per frame (200 as in the VRNN paper).
    :param max_per_split: keep only the first ``n`` recordings of each split (smoke tests);
        the normalisation still uses the whole training split.
    """
    if frame_size < 1:
        raise ValueError(f"frame_size must be positive, got {frame_size}")
    recordings = read_recordings(root)
    train_waves = [r["wave"] for r in recordings if split_of(r["index"]) == "train"]
    allsamples = np.concatenate(train_waves)
    mean, std = float(allsamples.mean()), float(allsamples.std())
    out = FSDDSplits()
    for split in SPLITS:
        seqs = []
        for r in recordings:
            if split_of(r["index"]) != split:
                continue
            framed = frame((r["wave"] - mean) / std, frame_size)
            if len(framed):
                seqs.append(torch.as_tensor(framed, dtype=torch.get_default_dtype()))
        if max_per_split is not None:
            seqs = seqs[:max_per_split]
        out[split] = SequenceDataset(seqs, name=f"fsdd_{split}")
    out.mean, out.std, out.frame_size = mean, std, frame_size
    return out


def unnormalise(frames: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Waveform ``(..., T * frame_size)`` from normalised frames ``(..., T, frame_size)``."""
    return (frames * std + mean).flatten(-2)
