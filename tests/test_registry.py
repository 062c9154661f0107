"""Every registered system is well formed: its demo entry splits into known options and train
settings, and it builds a model/guide pair of nn.Modules from its defaults and demo options."""

import pytest
from torch import nn

from pyro_seqlatent.experiments.report import split_demo
from pyro_seqlatent.registry import get_model, list_commands, list_models


@pytest.mark.parametrize("name", list_models())
def test_registered_system_builds(name):
    spec = get_model(name)
    assert set(spec.option_help) <= set(spec.defaults), "help for options that do not exist"
    options, settings, ev = split_demo(spec)
    for opts in (spec.options(), spec.options(**options)):
        model, guide = spec.build(opts)
        assert isinstance(model, nn.Module) and isinstance(guide, nn.Module)
    assert set(ev) <= {"num_samples", "max_points", "batch_size"}


def test_subcommands_registered():
    assert {"compare-estimators", "em-vs-svi"} <= set(list_commands())
