"""Run folders written before the training loop was split into parts still resume, after an
explicit, trusted conversion to the safe checkpoint format.

``tests/fixtures/run_a3fd1e6/`` was written by main at a3fd1e6 (``make_run_a3fd1e6.py``): a run
of 23 steps interrupted at step 13, its last checkpoint at step 10, with the flat
``train_config.json`` and the pickled numpy RNG state of that time. A safe load refuses it with
an error that says how to convert it; ``convert_checkpoint(..., trust=True)`` converts it; then
today's ``train(resume=True)`` finishes it with the losses, validation losses and parameters that
the uninterrupted run had then, bit for bit.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

from pyro_seqlatent.infer.checkpoint import (
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint,
)

HERE = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(HERE))

import make_run_a3fd1e6  # noqa: E402


@pytest.fixture
def old_run(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(HERE / "run_a3fd1e6", folder)
    return folder


def test_an_old_format_checkpoint_is_refused_with_the_way_to_convert_it(old_run):
    with pytest.raises(UnsafeCheckpointError, match=r"convert-run .*--trust") as info:
        load_checkpoint(old_run / "checkpoint.pt")
    assert str(old_run / "checkpoint.pt") in str(info.value)
    with pytest.raises(UnsafeCheckpointError):  # resume goes through the same safe load
        make_run_a3fd1e6.run(old_run, resume=True)
    with pytest.raises(ValueError, match="trust=True"):
        convert_checkpoint(old_run / "checkpoint.pt")  # never without saying so


def test_a_converted_old_run_folder_resumes_bit_for_bit(old_run):
    expected = json.loads((HERE / "run_a3fd1e6_expected.json").read_text())
    convert_checkpoint(old_run / "checkpoint.pt", trust=True)
    assert load_checkpoint(old_run / "checkpoint.pt")["state"]["step"] == 10
    result, model, guide = make_run_a3fd1e6.run(old_run, resume=True)
    assert result.step == 23 and result.stopped == "completed"
    assert [r["loss"] for r in result.history] == expected["loss"]
    assert [r.get("valid_loss") for r in result.history] == expected["valid_loss"]
    for module, saved in ((model, expected["model"]), (guide, expected["guide"])):
        assert {k: v.tolist() for k, v in module.state_dict().items()} == saved


def test_the_command_line_converts_only_with_trust(old_run, capsys):
    from pyro_seqlatent.cli import main

    assert main(["convert-run", str(old_run)]) == 2
    assert "--trust" in capsys.readouterr().out
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(old_run / "checkpoint.pt")  # untouched
    assert main(["convert-run", str(old_run), "--trust"]) == 0
    assert load_checkpoint(old_run / "checkpoint.pt")["format"] == 2
    assert main(["export", str(old_run)]) == 0
    assert (old_run / "weights.safetensors").exists()
