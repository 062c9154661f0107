"""PhysioNet under the reference implementation's protocol: its 41 variables and normalisation
(``data.physionet``) and its per-record, per-variable MSE (``models.forecast_metrics``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require_data
from pyro_seqlatent.data.physionet import REFERENCE_VARIABLES, VARIABLES, _parse_record
from pyro_seqlatent.models.forecast_metrics import observed_mse_sums, reference_record_mse

ROOT = Path(__file__).resolve().parents[1]


def test_reference_variables_are_the_descriptors_then_the_series():
    assert len(REFERENCE_VARIABLES) == 41 and len(set(REFERENCE_VARIABLES)) == 41
    assert REFERENCE_VARIABLES[:5] == ("Age", "Gender", "Height", "ICUType", "Weight")
    assert set(REFERENCE_VARIABLES) == set(VARIABLES) | {"Age", "Gender", "Height", "ICUType"}


def test_parse_keeps_descriptors_and_unknown_weight_only_when_asked():
    text = ("Time,Parameter,Value\n00:00,RecordID,7\n00:00,Age,61\n00:00,Height,-1\n"
            "00:00,Weight,-1\n00:10,HR,80\n")
    ref = {name: i for i, name in enumerate(REFERENCE_VARIABLES)}
    minutes, params, values = _parse_record(text, ref, keep_unknown=True)
    assert [REFERENCE_VARIABLES[p] for p in params] == ["Age", "Height", "Weight", "HR"]
    assert values == [61.0, -1.0, -1.0, 80.0] and minutes == [0, 0, 0, 10]
    ours = {name: i for i, name in enumerate(VARIABLES)}
    _, params, _ = _parse_record(text, ours)
    assert [VARIABLES[p] for p in params] == ["HR"]


def _loop_reference_mse(pred, values, mask):
    """The reference's nested loop (per sample, record, variable; empty -> 0; mean over D)."""
    S, B, _, D = pred.shape
    res = torch.zeros(S, B, D)
    for i in range(S):
        for k in range(B):
            for j in range(D):
                sel = mask[k, :, j] > 0
                if sel.any():
                    res[i, k, j] = ((pred[i, k, sel, j] - values[k, sel, j]) ** 2).mean()
    return res.mean(-1)  # (S, B)


def test_record_mse_equals_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    S, B, N, D = 3, 4, 6, 5
    values = torch.randn(B, N, D, generator=g)
    mask = (torch.rand(B, N, D, generator=g) < 0.4).float()
    mask[1, :, 2] = 0  # a variable a record never observed counts as 0 in the mean over D
    pred = torch.randn(S, B, N, D, generator=g)
    total, count = reference_record_mse(pred, values, mask)
    expected = _loop_reference_mse(pred, values, mask)
    assert count == S * B
    assert total / count == pytest.approx(float(expected.mean()), rel=1e-6)
    # without sample dimension: one prediction per record
    total, count = reference_record_mse(pred[0], values, mask)
    assert count == B and total / count == pytest.approx(float(expected[0].mean()), rel=1e-6)
    # differs from the mean over observed entries whenever counts differ
    flat = float(((pred[0] - values) ** 2 * mask).sum() / mask.sum())
    assert abs(flat - total / count) > 1e-3
    sse, n = observed_mse_sums(pred[0], values, mask)
    assert n == float(mask.sum()) and sse / n == pytest.approx(flat, rel=1e-6)
    # with samples: every sample's entries counted, so the ratio is the samples' pooled mean
    sse, n = observed_mse_sums(pred, values, mask)
    per_sample = [float(((p - values) ** 2 * mask).sum()) for p in pred]
    assert n == S * float(mask.sum()) and sse == pytest.approx(sum(per_sample), rel=1e-6)


@pytest.mark.data
def test_reference_physionet_items():
    require_data("physionet2012/physionet2012_seta_setb.tar.gz")
    from pyro_seqlatent.data.physionet import load_raw, physionet_items
    from pyro_seqlatent.models.latent_ode import data_dim, system_datasets
    from pyro_seqlatent.registry import get_model

    items = physionet_items(quantization=1.0, n_records=100, seed=0, protocol="reference")
    assert [len(items[k]) for k in ("train", "valid", "test")] == [70, 10, 20]
    x = items["train"][0]
    assert x["values"].shape[-1] == 41
    # descriptors are observed once, at t = 0
    desc = x["mask"][:, :4]
    assert desc[0].all() and desc[1:].sum() == 0
    # (x - min) / max with min, max over every record: the largest Age maps to (max - min)/max
    raw = load_raw(protocol="reference")
    ages = raw["values"][raw["params"] == 0]
    lo, hi = float(ages.min()), float(ages.max())
    age = torch.cat([it["values"][0, 0:1] for split in items.values() for it in split])
    raw_age = age * hi + lo
    assert raw_age.min() >= lo - 1e-3 and raw_age.max() <= hi + 1e-3
    options = get_model("latent_ode").options(dataset="physionet", protocol="reference",
                                              n_records=40, quantization=1.0)
    assert data_dim(options) == 41
    assert system_datasets(options)["train"].num_features == 41
