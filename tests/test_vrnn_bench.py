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


def test_rows_stored_before_an_option_existed_are_rebuilt_in_eval_mode(tmp_path):
    """A results.json row without the (later) "dropout" option is rebuilt with its default for
    the figures, from its checkpoint, in eval mode; a row without a run folder is named, and
    Figure 3 without it does not replace the full one."""
    import argparse

    import torch

    from pyro_seqlatent.infer.checkpoint import atomic_save
    from pyro_seqlatent.infer.train import BEST
    from pyro_seqlatent.registry import get_model

    spec = get_model("vrnn")
    options = spec.options(dataset="jsb", h_dim=4, feature_dim=4, hidden_dim=4, z_dim=2)
    model, guide = spec.build(options)
    (tmp_path / "jsb-vrnn").mkdir()
    atomic_save({"model": model.state_dict(), "guide": guide.state_dict(),
                 "state": {"step": 1}}, tmp_path / "jsb-vrnn" / BEST)
    old = {k: v for k, v in options.items() if k != "dropout"}
    rows = [{"row": "jsb-vrnn", "system": "vrnn", "options": old}]
    missing = []
    rows.append({"row": "jsb-rnn", "label": "RNN", "system": "rnn", "options": {"dataset": "jsb"}})
    rows.append({"row": "fsdd-rnn-gmm", "label": "RNN-GMM", "system": "rnn",
                 "options": {"dataset": "fsdd"}})
    built = list(bench.trained_rows(rows, argparse.Namespace(out=tmp_path), "jsb", missing))
    assert len(built) == 1 and [r["row"] for r in missing] == ["jsb-rnn"]  # listed, not drawn
    assert bench.fig3_name("jsb", missing) == "fig3_samples_jsb.partial.png"
    assert bench.fig3_name("jsb", []) == "fig3_samples_jsb.png"
    gmm = [{"row": "fsdd-vrnn-gmm", "label": "VRNN-GMM"}]
    assert bench.fig2_name("fsdd-vrnn-gauss", gmm) == "fig2_kl_delta.partial.png"
    assert bench.fig2_name("fsdd-vrnn-gauss", []) == "fig2_kl_delta.png"  # no GMM row at all
    assert bench.fig2_name("fsdd-vrnn-gmm", []) == "fig2_kl_delta.png"
    _, m, g = built[0]
    assert not m.training and not g.training
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), model.parameters()))


def test_a_row_resumed_with_another_lr_says_so_beside_its_command():
    """Its command alone would retrain at the new lr from the start."""
    changes = [{"step": 300, "setting": "lr", "from": 0.001, "to": 0.0003},
               {"step": 300, "setting": "clip_norm", "from": None, "to": 10.0}]
    assert bench.resumed_note({"resume_changes": changes}) == (
        " (resumed at step 300 with lr 0.0003 (was 0.001); resumed at step 300 with clip_norm "
        "10.0 (was None))")
    assert bench.resumed_note({"resume_changes": []}) == ""
    assert bench.resumed_note({}) == ""  # rows stored before resumes could change settings
