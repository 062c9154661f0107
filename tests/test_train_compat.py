"""Run folders written before the training loop was split into parts still resume.

``tests/fixtures/run_a3fd1e6/`` was written by main at a3fd1e6 (``make_run_a3fd1e6.py``): a run
of 23 steps interrupted at step 13, its last checkpoint at step 10, with the flat
``train_config.json`` of that time. Today's ``train(resume=True)`` must finish it with the losses,
validation losses and parameters that the uninterrupted run had then, bit for bit.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(HERE))

from make_run_a3fd1e6 import run  # noqa: E402


@pytest.fixture
def old_run(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(HERE / "run_a3fd1e6", folder)
    return folder


def test_a_run_folder_of_the_old_format_resumes_bit_for_bit(old_run, monkeypatch):
    expected = json.loads((HERE / "run_a3fd1e6_expected.json").read_text())
    import make_run_a3fd1e6

    monkeypatch.setattr(make_run_a3fd1e6, "train", _resuming(make_run_a3fd1e6.train))
    result, model, guide = run(old_run)
    assert result.step == 23 and result.stopped == "completed"
    assert [r["loss"] for r in result.history] == expected["loss"]
    assert [r.get("valid_loss") for r in result.history] == expected["valid_loss"]
    for module, saved in ((model, expected["model"]), (guide, expected["guide"])):
        assert {k: v.tolist() for k, v in module.state_dict().items()} == saved


def _resuming(train):
    def wrapped(*args, **kwargs):
        return train(*args, resume=True, **kwargs)

    return wrapped
