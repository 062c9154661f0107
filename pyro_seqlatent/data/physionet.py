r"""PhysioNet/CinC Challenge 2012 ICU records as irregular multivariate series (Latent ODE paper).

Protocol (Rubanova et al. 2019 §4.3 and the reference's PhysioNet command):

* records of ``set-a`` and ``set-b`` (8,000 stays) read straight from
  ``physionet2012/physionet2012_seta_setb.tar.gz`` under the data root (no extraction);
* the 37 time-varying variables :data:`VARIABLES` (the static RecordID, Age, Gender, Height and
  ICUType are dropped), observations in the first 48 h; ``Weight`` is also a descriptor at
  00:00, where -1 means unknown: those 673 values (and any other weight <= 0) are dropped, not
  read as -1 kg (the reference keeps them, and with them its Weight minimum is -1). Other
  outliers stay as recorded (pH up to 735, Temp down to -17.8; they set those variables'
  min–max range);
* times quantized to multiples of ``quantization`` hours: ``1/60`` (the minute, up to 2,881 grid
  points; the reference's ``--quantization 0.016`` is 0.96 min) or the coarser ``0.1`` h (481
  points) for CPU budgets; several values of one variable in one bin are averaged;
* per-variable min–max normalisation :math:`(x - \min)/(\max - \min)` over the observed values
  of the **training** records (the reference uses all records); masks mark observed entries;
* times divided by ``time_scale`` (48 h → :math:`t \in [0, 1]`).

The parsed raw records are cached once under :func:`cache_dir` (``$PYRO_SEQLATENT_CACHE`` or
``~/.cache/pyro_seqlatent``), never inside the repository. A cache file that cannot be read or
does not hold what it should is deleted, with a warning naming it, and rebuilt
(:func:`read_cache`).
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyro_seqlatent.data.irregular import IrregularDataset, apply_task
from pyro_seqlatent.data.root import (
    data_file,
    data_file_error,
    describe_error,
    reading_data_file,
)

ARCHIVE = "physionet2012/physionet2012_seta_setb.tar.gz"
VARIABLES = (
    "Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN", "Cholesterol", "Creatinine", "DiasABP",
    "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg", "MAP", "MechVent", "Na",
    "NIDiasABP", "NIMAP", "NISysABP", "PaCO2", "PaO2", "pH", "Platelets", "RespRate", "SaO2",
    "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC", "Weight",
)
STATIC = ("RecordID", "Age", "Gender", "Height", "ICUType")
#: the reference implementation's 41 variables (``physionet.py`` ``params``): the descriptors
#: Age, Gender, Height, ICUType (one value at 00:00) and Weight first, then the series
REFERENCE_VARIABLES = ("Age", "Gender", "Height", "ICUType", "Weight") + tuple(
    v for v in VARIABLES if v != "Weight")
PROTOCOLS = ("ours", "reference")
MAX_MINUTES = 48 * 60
_CACHE_VERSION = 2  # 2: Weight <= 0 (the missing marker -1) dropped


def cache_dir() -> Path:
    """``$PYRO_SEQLATENT_CACHE`` or ``~/.cache/pyro_seqlatent`` (created on demand)."""
    path = Path(os.environ.get("PYRO_SEQLATENT_CACHE", "~/.cache/pyro_seqlatent")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_cache(path: Path, check: Callable[[Any], bool] | None = None) -> Any | None:
    """The object cached in ``path`` (read with ``weights_only=True``), or ``None`` when there is
    none. A cache that cannot be read (truncated, corrupt, refused by the safe load) or for which
    ``check(obj)`` is false is deleted with a warning naming it, and ``None`` returned so that
    the caller rebuilds it; one that cannot be deleted raises
    :class:`~pyro_seqlatent.data.root.DataFileError` (delete it by hand)."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, weights_only=True)
        problem = None if check is None or check(obj) else "not the expected content"
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, UnpicklingError
        problem = f"truncated or corrupt ({describe_error(err)})"
    if problem is None:
        return obj
    try:
        path.unlink()
    except OSError as err:
        raise data_file_error(path, f"this cache file is {problem} and cannot be deleted", err,
                              "Delete it by hand: it is rebuilt from the data.") from err
    warnings.warn(f"cache file {path} was {problem}: deleted, rebuilding it", stacklevel=3)
    return None


def _raw_is_valid(raw: Any) -> bool:
    keys = ("ids", "minutes", "params", "values", "offsets")
    if not isinstance(raw, dict) or any(not torch.is_tensor(raw.get(k)) for k in keys):
        return False
    n, offsets = raw["minutes"].numel(), raw["offsets"]
    return (offsets.numel() == raw["ids"].numel() + 1 and raw["params"].numel() == n
            and raw["values"].numel() == n and int(offsets[0]) == 0 and int(offsets[-1]) == n)


def _parse_record(text: str, index: dict, keep_unknown: bool = False) -> tuple[list, list, list]:
    """``(minutes, variable indices, values)`` of one record's rows whose variable is in
    ``index``, up to 48 h; ``keep_unknown`` keeps Weight = -1 (the reference does)."""
    minutes, params, values = [], [], []
    reader = csv.reader(io.StringIO(text))
    next(reader, None)  # header Time,Parameter,Value
    for row in reader:
        if len(row) != 3 or row[1] not in index:
            continue
        hh, mm = row[0].split(":")
        minute = int(hh) * 60 + int(mm)
        if minute > MAX_MINUTES:
            continue
        if row[1] == "Weight" and float(row[2]) <= 0 and not keep_unknown:  # -1 = unknown
            continue
        minutes.append(minute)
        params.append(index[row[1]])
        values.append(float(row[2]))
    return minutes, params, values


def load_raw(root=None, refresh: bool = False, protocol: str = "ours") -> dict:
    """Parse the archive once (cached): ``{"ids", "minutes", "params", "values", "offsets"}``,
    the observations of record ``r`` being ``offsets[r]:offsets[r+1]``; ``params`` index
    :data:`VARIABLES` (``protocol="ours"``) or :data:`REFERENCE_VARIABLES` (``"reference"``:
    descriptors included, Weight = -1 kept)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}")
    archive = data_file(ARCHIVE, root)
    suffix = "" if protocol == "ours" else "_reference"
    cached = cache_dir() / f"physionet2012_raw{suffix}_v{_CACHE_VERSION}.pt"
    if not refresh:
        raw = read_cache(cached, _raw_is_valid)
        if raw is not None:
            return raw
    names = VARIABLES if protocol == "ours" else REFERENCE_VARIABLES
    index = {name: i for i, name in enumerate(names)}
    ids, minutes, params, values, offsets = [], [], [], [], [0]
    records = []
    with reading_data_file(archive, "not a readable .tar.gz (truncated or corrupt)"):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # stream order: seeking back in a .tar.gz re-decompresses
                name = "/" + member.name
                if not (member.isfile() and "/set-" in name and name.endswith(".txt")):
                    continue
                text = tar.extractfile(member).read()
                with reading_data_file(archive, f"its record {member.name} is not UTF-8 "
                                                "Time,Parameter,Value rows with HH:MM times"):
                    mins, pars, vals = _parse_record(text.decode(), index,
                                                     keep_unknown=protocol == "reference")
                if mins:
                    records.append((int(Path(member.name).stem), mins, pars, vals))
    if not records:
        raise data_file_error(archive, "no set-a/ or set-b/ record with observations in the "
                                       "archive")
    for record_id, mins, pars, vals in sorted(records, key=lambda r: r[0]):
        ids.append(record_id)
        minutes += mins
        params += pars
        values += vals
        offsets.append(len(minutes))
    raw = {
        "ids": torch.tensor(ids),
        "minutes": torch.tensor(minutes, dtype=torch.int32),
        "params": torch.tensor(params, dtype=torch.int64),
        "values": torch.tensor(values, dtype=torch.float32),
        "offsets": torch.tensor(offsets),
    }
    tmp = cached.with_suffix(".tmp")
    torch.save(raw, tmp)
    tmp.replace(cached)
    return raw


def _quantized_record(minutes, params, values, quantization: float, num_vars: int):
    bins = torch.round(minutes.double() / (60.0 * quantization)).long()
    grid, row = torch.unique(bins, sorted=True, return_inverse=True)
    total = torch.zeros(grid.numel(), num_vars, dtype=torch.float64)
    count = torch.zeros(grid.numel(), num_vars, dtype=torch.float64)
    total.index_put_((row, params), values.double(), accumulate=True)
    count.index_put_((row, params), torch.ones_like(values, dtype=torch.float64),
                     accumulate=True)
    mask = count > 0
    mean = torch.where(mask, total / count.clamp_min(1), torch.zeros_like(total))
    return grid.double() * quantization, mean, mask


def physionet_items(root=None, quantization: float = 0.1, time_scale: float = 48.0,
                    n_records: int | None = None, seed: int = 0,
                    split_fractions=None, protocol: str = "ours") -> dict[str, list[dict]]:
    r"""Items per split; ``n_records`` takes a random subset (seeded) for small budgets.

    ``protocol="ours"``: the 37 :data:`VARIABLES`, :math:`(x - \min)/(\max - \min)` over the
    observed training values, splits 80/10/10. ``protocol="reference"``: as the reference
    implementation, the 41 :data:`REFERENCE_VARIABLES` (descriptors included, Weight = -1
    kept), :math:`(x - \min)/\max` with min and max over the quantized observed values of all
    8,000 records (a max of 0 divides by 1; ``utils.normalize_masked_data``), test = 20 %
    (70/10/20). Times are divided by ``time_scale`` in both (the reference divides each
    batch's times by the batch's largest time, ≈ 48 h)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: use one of {PROTOCOLS}")
    if not quantization > 0:
        raise ValueError(f"quantization must be positive (hours), got {quantization!r}")
    if split_fractions is None:
        split_fractions = (0.8, 0.1, 0.1) if protocol == "ours" else (0.7, 0.1, 0.2)
    raw = load_raw(root, protocol=protocol)
    names = VARIABLES if protocol == "ours" else REFERENCE_VARIABLES
    num_vars = len(names)
    n_total = raw["ids"].numel()
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    if n_records is not None:
        order = order[: int(n_records)]
    n = order.numel()
    n_train, n_valid = int(split_fractions[0] * n), int(split_fractions[1] * n)
    splits = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
              "test": order[n_train + n_valid:]}
    off = raw["offsets"]

    def quantized(r):
        sl = slice(int(off[r]), int(off[r + 1]))
        return _quantized_record(raw["minutes"][sl], raw["params"][sl], raw["values"][sl],
                                 quantization, num_vars)

    if protocol == "ours":  # min-max over the observed training values
        rows = torch.cat([torch.arange(int(off[r]), int(off[r + 1])) for r in splits["train"]])
        lo = torch.full((num_vars,), float("inf"))
        hi = torch.full((num_vars,), float("-inf"))
        lo = lo.scatter_reduce(0, raw["params"][rows], raw["values"][rows], "amin")
        hi = hi.scatter_reduce(0, raw["params"][rows], raw["values"][rows], "amax")
        lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
        scale = torch.where(torch.isfinite(hi) & (hi > lo), hi - lo, torch.ones_like(lo))
        cache = {}
    else:  # min and max over the quantized observed values of every record
        cache = {r: quantized(r) for r in range(n_total)}
        lo = torch.full((num_vars,), float("inf"), dtype=torch.float64)
        hi = torch.full((num_vars,), float("-inf"), dtype=torch.float64)
        for _, mean, mask in cache.values():
            lo = torch.minimum(lo, torch.where(mask, mean, torch.inf).amin(0))
            hi = torch.maximum(hi, torch.where(mask, mean, -torch.inf).amax(0))
        lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
        scale = torch.where(torch.isfinite(hi) & (hi != 0), hi, torch.ones_like(hi))
    out = {}
    for name, records in splits.items():
        items = []
        for r in records.tolist():
            t, mean, mask = cache[r] if r in cache else quantized(r)
            values = ((mean - lo.double()) / scale.double()) * mask
            items.append({"times": (t / time_scale).float(), "values": values.float(),
                          "mask": mask.float()})
        out[name] = items
    return out


def physionet_datasets(root=None, task: str = "interp", fraction: float = 1.0,
                       quantization: float = 0.1, n_records: int | None = None,
                       seed: int = 0, protocol: str = "ours") -> dict[str, IrregularDataset]:
    """Train/valid/test datasets. ``task="interp"`` with ``fraction=1`` is the paper's
    interpolation (encode every observation, reconstruct every observation); ``fraction < 1``
    hides time points from the encoder; ``"extrap"`` observes ``fraction`` of the time points of
    the first 24 h (all of them with ``fraction=1``) and predicts the rest. ``protocol``: see
    :func:`physionet_items`."""
    items = physionet_items(root, quantization, n_records=n_records, seed=seed,
                            protocol=protocol)
    return {name: IrregularDataset(apply_task(split, task, fraction=fraction, split=0.5,
                                              seed=seed + i))
            for i, (name, split) in enumerate(items.items())}
