r"""Your own data from ``.npz`` / ``.pt`` files or arrays: datasets every model family reads.

Three families, each a set of named arrays (docs/own-data.md walks through each):

* ``"vectors"`` (VAE, flow density): ``x`` of shape ``(N, D)`` or images ``(N, H, W)`` /
  ``(N, C, H, W)``, flattened to ``(N, D)`` with :math:`D = \prod` of the trailing sizes;
  optional labels ``y`` ``(N, ...)``. Integer and bool dtypes become float with their values
  unchanged; a Bernoulli model (``binary=True``) needs every value in {0, 1}. Items are
  ``x[i]`` (``(x[i], y[i])`` with ``labels=True``).
* ``"sequences"`` (VRNN, RNN baselines): sequences :math:`x^{(i)}_{1:T_i}`, ``(T_i, D)``, as
  ``seq_0, seq_1, ...`` (one array each; ``(T_i,)`` means ``D = 1``), or packed as ``values``
  ``(\sum_i T_i, D)`` + ``lengths`` ``(N,)`` (row blocks in order), or equal lengths as
  ``values`` ``(N, T, D)``; a ``.pt`` file may hold a list of tensors under ``sequences``.
  Batched by :func:`~pyro_seqlatent.data.sequences.pad_collate` (padded ``x`` and its mask).
* ``"irregular"`` (Latent ODE, ODE-RNN, RNN-Δt): ``times``, ``values`` and an optional
  ``mask``: ``values`` ``(N, T, D)`` (or ``(N, T)``: ``D = 1``) with ``times`` ``(T,)``
  (shared) or ``(N, T)`` (one grid per series), or packed as ``times`` ``(\sum_i T_i,)``,
  ``values`` ``(\sum_i T_i, D)`` + ``lengths`` ``(N,)``. NaN in ``values`` marks a missing
  entry; ``mask`` (same shape as ``values``, 0/1 or bool; 1: observed) may mark more. An item
  is ``{"times", "values", "mask"}`` (:mod:`pyro_seqlatent.data.irregular`; missing entries
  hold 0 and mask 0), batched by :func:`~pyro_seqlatent.data.irregular.union_grid_collate`.

**Splits.** A file holds either the arrays above, split here (the examples in the order of a
permutation drawn from a generator seeded with ``seed``, cut at the sizes of
:func:`split_sizes`; fractions :data:`DEFAULT_FRACTIONS`: 80/10/10 % train/valid/test), or the
same arrays once per split, named with the split as a prefix: ``train_x``,
``valid_x``, ``test_x`` (vectors also take ``train``, ``valid``, ``test``), ``train_values`` +
``train_lengths``, ``train_seq_0``, ``train_times``, ...

**Safety.** ``.npz`` files are read by ``numpy.load(allow_pickle=False)`` and ``.pt`` files by
``torch.load(weights_only=True)``: numbers and tensors only, never pickled Python objects (a
file that holds some is refused by name). A file that does not fit raises
:class:`UserDataError` (one line: the file, the key, what is wrong and the fix; the command
line prints it without a traceback).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pyro_seqlatent.data.irregular import IrregularDataset, apply_task, union_grid_collate
from pyro_seqlatent.data.root import DataFileError
from pyro_seqlatent.data.sequences import SequenceDataset, pad_collate

__all__ = [
    "DEFAULT_FRACTIONS",
    "FAMILIES",
    "UserData",
    "UserDataError",
    "VectorDataset",
    "load_user_data",
    "read_arrays",
    "split_sizes",
    "task_datasets",
]

FAMILIES = ("vectors", "sequences", "irregular")
SPLITS = ("train", "valid", "test")
#: train / valid / test fractions of a file without split keys
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
#: the keys of each family (without a split prefix)
KEYS = {
    "vectors": ("x", "y"),
    "sequences": ("values", "lengths", "sequences", "seq_<i>"),
    "irregular": ("times", "values", "mask", "lengths"),
}
#: the help text of the ``data`` option of the systems that take a file
DATA_HELP = ("your own data: a .npz or .pt file of named arrays (docs/own-data.md); replaces "
             "the built-in data set ('' : the built-in one)")
_SEQ_KEY = re.compile(r"^seq_(\d+)$")


class UserDataError(DataFileError):
    """A user data file (or arrays) that does not fit its family: the one-line message names
    the file, the key, what is wrong and the fix. A :class:`~pyro_seqlatent.data.root.
    DataFileError`, so the command line prints it as one line (exit status 2)."""


def _fail(source: str, message: str) -> UserDataError:
    return UserDataError(f"data={source}: {message}")


# ----------------------------------------------------------------------------- reading files


def read_arrays(path: str | os.PathLike) -> dict[str, Any]:
    """The named arrays of a ``.npz`` (``numpy.load(allow_pickle=False)``) or ``.pt``
    (``torch.load(weights_only=True)``: a dict of tensors, or of lists of tensors) file, as
    numpy arrays (lists of arrays for lists). Pickled objects, object arrays and other
    formats raise :class:`UserDataError` naming the file and what to save instead."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _fail(str(path), "no such file; pass the path of a .npz or .pt file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in (".pt", ".pth"):
        return _read_pt(path)
    raise _fail(str(path), f"unknown file type {suffix or '(none)'!r}; save your arrays with "
                "numpy.savez(path.npz, x=...) or torch.save({'x': tensor}, path.pt)")


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        contents = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise _fail(str(path), "the file holds pickled Python objects, which are never "
                        "loaded (they can run code); save numeric arrays with numpy.savez("
                        "path, x=array, ...)") from None
        raise _fail(str(path), f"not a readable .npz file ({err})") from None
    except Exception as err:  # truncated zip, not numpy at all
        raise _fail(str(path), f"not a readable .npz file ({type(err).__name__}: {err}); "
                    "write it with numpy.savez") from None
    if isinstance(contents, np.ndarray):
        raise _fail(str(path), "the file holds one unnamed array (numpy.save); save named "
                    "arrays with numpy.savez(path, x=array) so each has its key")
    out = {}
    with contents:
        for key in contents.files:
            try:
                out[key] = contents[key]
            except ValueError as err:
                if "allow_pickle" not in str(err):
                    raise _fail(str(path), f"key {key!r} cannot be read ({err})") from None
                raise _fail(str(path), f"key {key!r} is an object array (pickled Python "
                            "objects, e.g. a list of arrays of different lengths), which is "
                            "never loaded; save sequences as seq_0, seq_1, ... or as values "
                            "+ lengths (docs/own-data.md)") from None
    return out


def _read_pt(path: Path) -> dict[str, Any]:
    import pickle

    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).splitlines() or [""])[0][:160]
        raise _fail(str(path), "the file holds Python objects that torch.load(weights_only="
                    f"True) refuses ({first}); save a dict of tensors: torch.save({{'x': "
                    "tensor}, path)") from None
    except Exception as err:
        raise _fail(str(path), f"not a readable torch file ({type(err).__name__}: {err})") \
            from None
    if not isinstance(contents, Mapping):
        raise _fail(str(path), f"the file holds a {type(contents).__name__}, not a dict of "
                    "tensors; save torch.save({'x': tensor}, path)")
    return {str(k): _as_numpy(str(path), str(k), v) for k, v in contents.items()}


def _as_numpy(source: str, key: str, value: Any) -> Any:
    if torch.is_tensor(value):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    if isinstance(value, (list, tuple)) and all(torch.is_tensor(v) for v in value):
        return [_as_numpy(source, key, v) for v in value]
    if isinstance(value, np.ndarray):
        return value
    raise _fail(source, f"key {key!r} holds a {type(value).__name__}; save a tensor (or a list "
                "of tensors for sequences)")


# ----------------------------------------------------------------------------- array checks


def _numeric(source: str, key: str, value: Any, allow_nan: bool = False) -> np.ndarray:
    """``value`` as a numeric numpy array, or the error naming ``key`` and the fix."""
    if isinstance(value, (list, tuple)):
        raise _fail(source, f"key {key!r} holds a list; give one array (a list of sequences "
                    "goes under 'sequences' or seq_0, seq_1, ...)")
    array = np.asarray(value)
    kind = array.dtype.kind
    if kind in "mM":
        raise _fail(source, f"key {key!r} has dtype {array.dtype}; convert times to numbers "
                    "first, e.g. hours since the start: (t - t[0]) / np.timedelta64(1, 'h')")
    if kind not in "biuf":
        raise _fail(source, f"key {key!r} has dtype {array.dtype}, which is not numeric; save "
                    "numbers (bool, int or float arrays)")
    if kind == "f" and not allow_nan and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise _fail(source, f"key {key!r} has {bad} NaN or infinite values; drop or impute "
                    "them (only irregular series take NaN, as a missing value)")
    return array


def _float(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.get_default_dtype())


def _is_binary(array: np.ndarray) -> bool:
    return bool(np.isin(array, (0, 1)).all())


# ----------------------------------------------------------------------------- splits


def split_sizes(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """``(n_train, n_valid, n_test)``: ``n_valid = round(f_valid n)``, ``n_test = round(f_test
    n)``, each at least 1, and the rest for training (at least 1); ``ValueError`` when
    ``n < 3`` or the fractions are not three positive numbers summing to 1."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers (train, valid, test) "
                         f"summing to 1, got {tuple(fractions)}")
    n_valid = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise ValueError(f"{n} examples are too few to split into train/valid/test; give at "
                         "least 3, or put train_*, valid_* and test_* keys in the file")
    return n_train, n_valid, n_test


def _split_keys(arrays: Mapping[str, Any], family: str) -> dict[str, dict[str, Any]] | None:
    """``{split: {key without prefix: array}}`` when the file is split, else ``None``."""
    prefixed = {s: {k[len(s) + 1:]: v for k, v in arrays.items() if k.startswith(s + "_")}
                for s in SPLITS}
    if family == "vectors":
        for s in SPLITS:
            if s in arrays:
                prefixed[s].setdefault("x", arrays[s])
    given = [s for s in SPLITS if prefixed[s]]
    return prefixed if given else None


def _check_keys(source: str, arrays: Mapping[str, Any], family: str, split: str = "") -> None:
    allowed = {k for k in KEYS[family] if "<" not in k}
    prefix = f"{split}_" if split else ""
    unknown = sorted(k for k in arrays if k not in allowed and not (
        family == "sequences" and _SEQ_KEY.match(k)))
    if unknown:
        expected = ", ".join(prefix + k for k in KEYS[family])
        raise _fail(source, f"unexpected key(s) {[prefix + k for k in unknown]} for "
                    f"{family}; expected {expected}{_other_family(set(arrays), family)} "
                    "(docs/own-data.md)")


def _family_hint(arrays: Mapping[str, Any], family: str) -> str:
    """What the keys of ``arrays`` are and, when they fit another family, its systems."""
    keys = set(arrays)
    return f" (found {sorted(keys)})" + _other_family(keys, family)


def _other_family(keys: set, family: str) -> str:
    if family != "vectors" and "x" in keys:
        return "; a file with x holds vectors: train the vae on it"
    if family != "irregular" and "times" in keys:
        return "; a file with times holds irregular series: train latent_ode, ode_rnn or rnn_dt"
    if family == "vectors" and keys & {"values", "lengths", "sequences"}:
        return "; this file holds sequences: train vrnn or rnn on it"
    return ""


def _splits_of(source: str, arrays: Mapping[str, Any], family: str, parse: Callable,
               fractions: Sequence[float], seed: int) -> dict[str, list]:
    """Each split's examples (a list, or a tuple of arrays for vectors) from ``parse``."""
    split = _split_keys(arrays, family)
    if split is None:
        examples = parse(arrays, "")
        _check_keys(source, arrays, family)
        n = _count(examples)
        try:
            sizes = split_sizes(n, fractions)
        except ValueError as err:
            raise _fail(source, str(err)) from None
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        bounds = np.cumsum([0, *sizes])
        return {s: _take(examples, order[bounds[i]:bounds[i + 1]]) for i, s in enumerate(SPLITS)}
    missing = [s for s in SPLITS if not split[s]]
    if missing:
        raise _fail(source, f"the file has keys of split(s) {[s for s in SPLITS if split[s]]} "
                    f"but none of {missing}; give train_*, valid_* and test_* keys, or no "
                    f"split prefix at all (split {'/'.join(map(str, fractions))} here)")
    rest = [k for k in arrays if not any(k.startswith(s + "_") or k == s for s in SPLITS)]
    if rest:
        raise _fail(source, f"key(s) {rest} have no split prefix but the file is split; name "
                    "every key train_*, valid_* or test_*")
    out = {}
    for s in SPLITS:
        out[s] = parse(split[s], s + "_")
        _check_keys(source, split[s], family, s)
    return out


def _count(examples) -> int:
    return len(examples[0]) if isinstance(examples, tuple) else len(examples)


def _take(examples, index: list[int]):
    if isinstance(examples, tuple):
        return tuple(None if a is None else a[index] for a in examples)
    return [examples[i] for i in index]


# ----------------------------------------------------------------------------- vectors


class VectorDataset(Dataset):
    """Rows of ``x`` ``(N, D)`` (items ``x[i]``), with labels ``y`` items ``(x[i], y[i])``.
    Its ``tensors`` let :func:`pyro_seqlatent.infer.loader.make_loader` batch by index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.x, self.y = x, y

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.x,) if self.y is None else (self.x, self.y)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int):
        return self.x[index] if self.y is None else (self.x[index], self.y[index])


def _parse_vectors(source: str, binary: bool) -> Callable:
    def parse(arrays: Mapping[str, Any], prefix: str):
        if "x" not in arrays:
            raise _fail(source, f"no key {prefix + 'x'!r}; vectors need {prefix}x (N, D) or "
                        f"images (N, H, W) (+ labels {prefix}y){_family_hint(arrays, 'vectors')}")
        x = _numeric(source, prefix + "x", arrays["x"])
        if x.ndim < 2 or x.shape[0] < 1:
            raise _fail(source, f"key {prefix + 'x'!r} has shape {x.shape}; give one row per "
                        "example: (N, D), images (N, H, W) or (N, C, H, W) (one feature per "
                        "example: x[:, None])")
        if binary and not _is_binary(x):
            top = x.max()
            fix = ("(x > 127).astype(np.uint8) for 0..255 images" if top > 1
                   else "(x > 0.5).astype(np.uint8)")
            raise _fail(source, f"key {prefix + 'x'!r} holds values other than 0 and 1 (from "
                        f"{x.min()} to {top}); a Bernoulli model needs binary data: save "
                        f"{fix}")
        y = None
        if "y" in arrays:
            y = _numeric(source, prefix + "y", arrays["y"])
            if y.ndim < 1 or y.shape[0] != x.shape[0]:
                raise _fail(source, f"key {prefix + 'y'!r} has shape {y.shape} but "
                            f"{prefix}x has {x.shape[0]} rows; give one label per example")
        return x.reshape(x.shape[0], -1), y
    return parse


def _vector_data(source, arrays, fractions, seed, binary, labels) -> UserData:
    splits = _splits_of(source, arrays, "vectors", _parse_vectors(source, binary),
                        fractions, seed)
    dims = {s: splits[s][0].shape[1] for s in SPLITS}
    if len(set(dims.values())) != 1:
        raise _fail(source, f"the splits have different numbers of values per example {dims}; "
                    "give every split the same image size")
    has_y = {s: splits[s][1] is not None for s in SPLITS}
    if len(set(has_y.values())) != 1:
        raise _fail(source, f"labels are given for some splits only {has_y}; give y for every "
                    "split or none")
    datasets = {}
    for s in SPLITS:
        x, y = splits[s]
        y_t = torch.as_tensor(np.ascontiguousarray(y)) if labels and y is not None else None
        datasets[s] = VectorDataset(_float(x), y_t)
    shape = tuple(np.shape(arrays.get("x", arrays.get("train_x", arrays.get("train"))))[1:])
    xs = [splits[s][0] for s in SPLITS]
    levels = None
    if all(x.dtype.kind in "biu" for x in xs) and min(int(x.min()) for x in xs) >= 0:
        levels = max(2, max(int(x.max()) for x in xs) + 1)
    return UserData("vectors", datasets, dims["train"], None,
                    all(_is_binary(x) for x in xs), shape, has_y["train"], source, levels)


# ----------------------------------------------------------------------------- sequences


def _as_steps(source: str, key: str, value: Any, allow_nan: bool = False) -> np.ndarray:
    array = _numeric(source, key, value, allow_nan)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] < 1:
        raise _fail(source, f"key {key!r} has shape {array.shape}; a sequence is (T, D) with "
                    "T >= 1 steps (or (T,) for one feature)")
    return array


def _lengths(source: str, key: str, value: Any, rows: int, what: str) -> np.ndarray:
    lengths = _numeric(source, key, value)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 1).any():
        raise _fail(source, f"key {key!r} must be a 1-D integer array of sequence lengths >= 1, "
                    f"got shape {lengths.shape}, dtype {lengths.dtype}")
    if int(lengths.sum()) != rows:
        raise _fail(source, f"key {key!r} sums to {int(lengths.sum())} but {what} has {rows} "
                    "rows; the lengths must add up to the rows of the packed arrays")
    return lengths


def _parse_sequences(source: str) -> Callable:
    def parse(arrays: Mapping[str, Any], prefix: str) -> list[np.ndarray]:
        numbered = {int(m.group(1)): k for k in arrays if (m := _SEQ_KEY.match(k))}
        if numbered:
            if sorted(numbered) != list(range(len(numbered))):
                gaps = sorted(set(range(max(numbered) + 1)) - set(numbered))[:3]
                raise _fail(source, f"{prefix}seq_<i> keys must be numbered 0, 1, 2, ... "
                            f"without gaps; missing {[f'{prefix}seq_{i}' for i in gaps]}")
            return [_as_steps(source, prefix + numbered[i], arrays[numbered[i]])
                    for i in range(len(numbered))]
        if "sequences" in arrays:
            seqs = arrays["sequences"]
            if not isinstance(seqs, list):
                seqs = list(_numeric(source, prefix + "sequences", seqs))
            return [_as_steps(source, f"{prefix}sequences[{i}]", s) for i, s in enumerate(seqs)]
        if "values" not in arrays:
            raise _fail(source, f"no sequences: give {prefix}seq_0, {prefix}seq_1, ... or "
                        f"{prefix}values + {prefix}lengths{_family_hint(arrays, 'sequences')}")
        values = _numeric(source, prefix + "values", arrays["values"])
        if "lengths" not in arrays:
            if values.ndim != 3:
                raise _fail(source, f"key {prefix + 'values'!r} has shape {values.shape}: "
                            f"without {prefix}lengths give equal-length sequences (N, T, D); "
                            f"packed rows (sum of T_i, D) need {prefix}lengths (N,)")
            return [_as_steps(source, f"{prefix}values[{i}]", v) for i, v in enumerate(values)]
        values = _as_steps(source, prefix + "values", values)
        lengths = _lengths(source, prefix + "lengths", arrays["lengths"], values.shape[0],
                           prefix + "values")
        return np.split(values, np.cumsum(lengths)[:-1])
    return parse


def _sequence_data(source, arrays, fractions, seed) -> UserData:
    splits = _splits_of(source, arrays, "sequences", _parse_sequences(source), fractions, seed)
    dims = {s.shape[1] for seqs in splits.values() for s in seqs}
    if len(dims) != 1:
        raise _fail(source, f"the sequences have different numbers of features {sorted(dims)}; "
                    "every step of every sequence needs the same D")
    datasets = {s: SequenceDataset([_float(a) for a in splits[s]], name=f"{source} {s}")
                for s in SPLITS}
    binary = all(_is_binary(a) for seqs in splits.values() for a in seqs)
    return UserData("sequences", datasets, dims.pop(), pad_collate, binary, (), False, source)


# ----------------------------------------------------------------------------- irregular


def _parse_irregular(source: str) -> Callable:
    def parse(arrays: Mapping[str, Any], prefix: str) -> list[dict]:
        for key in ("times", "values"):
            if key not in arrays:
                raise _fail(source, f"no key {prefix + key!r}; irregular series need "
                            f"{prefix}times and {prefix}values (NaN: missing), optionally "
                            f"{prefix}mask and {prefix}lengths"
                            f"{_family_hint(arrays, 'irregular')}")
        times = _numeric(source, prefix + "times", arrays["times"])
        values = _numeric(source, prefix + "values", arrays["values"], allow_nan=True)
        mask = None
        if "mask" in arrays:
            mask = _mask(source, prefix + "mask", arrays["mask"], values.shape)
        if "lengths" in arrays:
            series = _packed_series(source, prefix, times, values, mask, arrays["lengths"])
        else:
            series = _dense_series(source, prefix, times, values, mask)
        return [_item(source, f"{prefix}values[{i}]", *s) for i, s in enumerate(series)]
    return parse


def _mask(source: str, key: str, value: Any, shape: tuple) -> np.ndarray:
    mask = _numeric(source, key, value)
    if mask.shape != shape:
        raise _fail(source, f"key {key!r} has shape {mask.shape} but values has {shape}; the "
                    "mask marks each entry of values (1: observed, 0: missing)")
    if not _is_binary(mask):
        raise _fail(source, f"key {key!r} holds values other than 0 and 1; a mask is 1 "
                    "(observed) or 0 (missing): save (mask > 0), not weights")
    return mask


def _packed_series(source, prefix, times, values, mask, lengths):
    if values.ndim == 1:
        values = values[:, None]
        mask = None if mask is None else mask[:, None]
    if times.ndim != 1 or values.ndim != 2 or values.shape[0] != times.shape[0]:
        raise _fail(source, f"packed series ({prefix}lengths given) need {prefix}times "
                    f"(sum of T_i,) and {prefix}values (sum of T_i, D) with as many rows, got "
                    f"{times.shape} and {values.shape}")
    lengths = _lengths(source, prefix + "lengths", lengths, times.shape[0], prefix + "times")
    cut = np.cumsum(lengths)[:-1]
    masks = [None] * len(lengths) if mask is None else np.split(mask, cut)
    return list(zip(np.split(times, cut), np.split(values, cut), masks))


def _dense_series(source, prefix, times, values, mask):
    if values.ndim == 2:
        values = values[..., None]
        mask = None if mask is None else mask[..., None]
    if values.ndim != 3:
        raise _fail(source, f"key {prefix + 'values'!r} has shape {values.shape}; give (N, T, D) "
                    f"(or (N, T) for one feature), or packed rows with {prefix}lengths")
    n, t = values.shape[:2]
    if times.shape == (t,):
        times = np.broadcast_to(times, (n, t))
    if times.shape != (n, t):
        raise _fail(source, f"key {prefix + 'times'!r} has shape {times.shape} but values is "
                    f"{values.shape}; give times (T,) = ({t},) shared by all series or "
                    f"(N, T) = ({n}, {t}), one grid per series")
    masks = [None] * n if mask is None else list(mask)
    return list(zip(times, values, masks))


def _item(source: str, key: str, times, values, mask) -> dict:
    from pyro_seqlatent.nn.times import validate_times

    missing = np.isnan(values)
    if np.isinf(values).any():
        raise _fail(source, f"{key} has infinite values; mark missing entries with NaN")
    if mask is None:
        mask = ~missing
    elif (missing & (mask != 0)).any():
        raise _fail(source, f"{key} has NaN where the mask is 1 (observed); set the mask to 0 "
                    "there, or give the value")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise _fail(source, f"{key}: this series has no observed value; drop it")
    t = torch.tensor(np.asarray(times, dtype=np.float64), dtype=torch.get_default_dtype())
    try:
        validate_times(t, name=f"{key.replace('values', 'times')}", shared=True)
    except (TypeError, ValueError) as err:
        raise _fail(source, str(err)) from None
    return {"times": t, "values": _float(np.where(mask, np.nan_to_num(values), 0.0)),
            "mask": _float(mask)}


def _irregular_data(source, arrays, fractions, seed) -> UserData:
    splits = _splits_of(source, arrays, "irregular", _parse_irregular(source), fractions, seed)
    dims = {item["values"].shape[1] for items in splits.values() for item in items}
    if len(dims) != 1:
        raise _fail(source, f"the series have different numbers of features {sorted(dims)}; "
                    "every series needs the same D")
    datasets = {s: IrregularDataset(splits[s]) for s in SPLITS}
    return UserData("irregular", datasets, dims.pop(), union_grid_collate, False, (), False,
                    source)


def task_datasets(datasets: Mapping[str, IrregularDataset], task: str, fraction: float,
                  seed: int = 0) -> dict[str, IrregularDataset]:
    """Irregular splits with the Latent ODE's encoder/target masks
    (:func:`pyro_seqlatent.data.irregular.apply_task`): ``"interp"`` observes a random
    ``fraction`` of each series' time points and scores all; ``"extrap"`` observes a
    ``fraction`` of the points up to :math:`t_{split} = (t_{min} + t_{max})/2`, the middle of
    the time range of all series (all splits), and scores the points after it."""
    items = [it for d in datasets.values() for it in d.items]
    split = None
    if task == "extrap":
        lo = min(float(it["times"][0]) for it in items)
        hi = max(float(it["times"][-1]) for it in items)
        split = (lo + hi) / 2
    out = {}
    for i, (name, data) in enumerate(datasets.items()):
        out[name] = IrregularDataset(apply_task(data.items, task, fraction=fraction,
                                                split=split, seed=seed + 1 + i))
    return out


# ----------------------------------------------------------------------------- entry point


@dataclass
class UserData:
    """What :func:`load_user_data` read: the splits and what a model needs to know of them."""

    #: ``"vectors"``, ``"sequences"`` or ``"irregular"``
    family: str
    #: ``{"train", "valid", "test"}`` torch Datasets
    splits: dict[str, Dataset]
    #: values per example (vectors) or features per step (sequences, irregular)
    dim: int
    #: the DataLoader ``collate_fn`` the splits need (``None``: torch's default)
    collate_fn: Callable | None
    #: every value is 0 or 1 (a Bernoulli likelihood fits)
    binary: bool
    #: the shape of one example in the file (vectors: e.g. ``(28, 28)``)
    item_shape: tuple
    #: the file holds labels ``y``
    has_labels: bool
    #: the file, or ``"<arrays>"``
    source: str
    #: vectors of an integer or bool dtype, all >= 0: ``L`` = their largest value + 1 (at
    #: least 2), the grey levels ``0..L-1`` a flow density dequantizes; else ``None``
    levels: int | None = None

    def datasets(self) -> dict[str, Dataset]:
        """The ``{"train", "valid", "test"}`` dict a ``ModelSpec.datasets`` returns."""
        return dict(self.splits)

    def first(self, **limits: int | None) -> dict[str, Dataset]:
        """:meth:`datasets` with only the first ``n`` examples of each split named
        (``first(train=1000, valid=200)``; 0 or ``None``: all of it), as the ``train_limit``
        options of the built-in data sets."""
        unknown = set(limits) - set(SPLITS)
        if unknown:
            raise ValueError(f"first(): no split(s) {sorted(unknown)}; use {SPLITS}")
        out = self.datasets()
        for split, n in limits.items():
            if n:
                out[split] = _first(out[split], int(n))
        return out


def _first(data: Dataset, n: int) -> Dataset:
    if isinstance(data, VectorDataset):
        return VectorDataset(*(t[:n] for t in data.tensors))
    if isinstance(data, SequenceDataset):
        return SequenceDataset(data.sequences[:n], data.name)
    return IrregularDataset(data.items[:n])


_CACHE: dict[tuple, UserData] = {}


def load_user_data(data: str | os.PathLike | Mapping[str, Any], family: str, *,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                   binary: bool = False, labels: bool = False) -> UserData:
    """Read your own data of a ``family`` (see the module docstring for the keys) from a
    ``.npz`` / ``.pt`` file or a dict of arrays (numpy arrays, tensors, lists of them).

    :param fractions: train/valid/test fractions when the data has no split keys.
    :param seed: seed of the permutation that makes those splits.
    :param binary: refuse vectors with values other than 0 and 1 (a Bernoulli model).
    :param labels: vectors: items ``(x, y)`` when ``y`` is given (else ``y`` is dropped).
    :raises UserDataError: naming the file, the key and the fix.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if isinstance(data, Mapping):
        arrays = {str(k): _as_numpy("<arrays>", str(k), v) for k, v in data.items()}
        return _load(arrays, "<arrays>", family, tuple(fractions), int(seed), binary, labels)
    path = Path(data).expanduser().resolve()
    stat = path.stat() if path.is_file() else None
    key = (str(path), stat and (stat.st_mtime_ns, stat.st_size), family, tuple(fractions),
           int(seed), binary, labels)
    if stat is not None and key in _CACHE:
        return _CACHE[key]
    out = _load(read_arrays(path), str(path), family, tuple(fractions), int(seed), binary,
                labels)
    _CACHE.clear()  # one file at a time: build() and datasets() of a run read it once
    _CACHE[key] = out
    return out


def _load(arrays, source, family, fractions, seed, binary, labels) -> UserData:
    if not arrays:
        raise _fail(source, f"no arrays; {family} need the keys {', '.join(KEYS[family])}")
    if family == "vectors":
        return _vector_data(source, arrays, fractions, seed, binary, labels)
    if family == "sequences":
        return _sequence_data(source, arrays, fractions, seed)
    return _irregular_data(source, arrays, fractions, seed)
