"""The VRNN benchmark's table bookkeeping: tagged variant rows sit beside their default row."""

import math

from conftest import load_benchmark

bench = load_benchmark("vrnn")


def _row(row, ll, dataset="jsb"):
    return {"row": row, "label": row, "options": {"dataset": dataset}, "ll_sequences": ll}


def test_a_tagged_variant_is_compared_with_its_default_row_on_the_same_sequences():
    rows = [_row("jsb-vrnn", [-10.0, -20.0, -30.0]), _row("jsb-vrnn+wd", [-9.0, -18.0, -30.0]),
            _row("jsb-rnn", [-12.0, -22.0, -31.0])]
    pairs = {(a, b): (m, se, n) for _, a, b, m, se, n in bench.paired_differences(rows)}
    m, se, n = pairs[("jsb-vrnn+wd", "jsb-vrnn")]
    assert n == 3 and math.isclose(m, 1.0)  # differences 1, 2, 0
    assert math.isclose(se, 1.0 / 3**0.5)  # sample std 1 over sqrt(3)
    assert pairs[("jsb-vrnn", "jsb-rnn")][0] == 5.0 / 3


def test_variants_follow_their_default_row_in_the_table():
    names = ["fsdd-rnn-gauss", "jsb-vrnn+wd", "jsb-rnn", "jsb-vrnn", "jsb-vrnn+a"]
    ordered = sorted(({"row": r} for r in names), key=bench.table_order)
    assert [r["row"] for r in ordered] == ["jsb-rnn", "jsb-vrnn", "jsb-vrnn+a", "jsb-vrnn+wd",
                                           "fsdd-rnn-gauss"]
    assert bench.row_id("jsb-vrnn", "") == "jsb-vrnn"
    assert bench.row_id("jsb-vrnn", "wd") == "jsb-vrnn+wd"


def test_variant_flags_are_checked_before_any_data_loads():
    import argparse

    import pytest

    parser = argparse.ArgumentParser()
    ok = argparse.Namespace(train_options='{"weight_decay": 0.001}', tag="wd1e-3",
                            rows="jsb-vrnn")
    bench.check_variant_args(parser, ok)  # no error
    for train_options, tag in [('{"num_steps": 3}', ""), ('{"lr": 0.1}', ""),
                               ('{"weight_decay": }', ""), ("[1]", ""), ("{}", "a/b"),
                               ('{"lr_schedule": "cosine"}', ""), ('{"elbo": "bogus"}', "")]:
        with pytest.raises(SystemExit):
            bench.check_variant_args(parser, argparse.Namespace(
                train_options=train_options, tag=tag, rows="jsb-vrnn"))
