"""docs/api.md lists every public name: each package's ``__all__``, every public module, and
every training setting (the table the command line's epilog points to)."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import pyro_seqlatent

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
#: the packages whose modules must each appear, by their dotted name
PACKAGES = ("models", "guides", "transforms", "nn", "infer", "em", "data", "experiments")


def _public_modules():
    for info in pkgutil.walk_packages(pyro_seqlatent.__path__, "pyro_seqlatent."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield info.name, info.ispkg


def test_every_public_module_has_its_section():
    text = API.read_text()
    missing = [name for name, _ in _public_modules()
               if name.split(".")[1] in PACKAGES or name.count(".") == 1
               if not re.search(rf"^\.\. automodule:: {re.escape(name)}$", text, re.M)]
    assert not missing, f"docs/api.md has no `.. automodule::` for {missing}"
    listed = re.findall(r"^\.\. automodule:: (\S+)$", text, re.M)
    twice = sorted({name for name in listed if listed.count(name) > 1})
    assert not twice, f"docs/api.md documents {twice} twice (Sphinx: duplicate object)"
    gone = []
    for name in listed:
        try:
            importlib.import_module(name)
        except ImportError:
            gone.append(name)
    assert not gone, f"docs/api.md documents modules that do not exist: {gone}"


@pytest.mark.parametrize("package", [name for name, ispkg in _public_modules() if ispkg])
def test_every_name_a_package_exports_is_in_the_api_reference(package):
    text = API.read_text()
    names = getattr(importlib.import_module(package), "__all__", [])
    missing = [n for n in names if not re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", text)]
    assert not missing, f"{package}.__all__ names missing from docs/api.md: {missing}"


def test_the_flows_and_sequence_models_are_documented():
    text = API.read_text()
    for name in ("pyro_seqlatent.models.vrnn", "pyro_seqlatent.models.latent_ode",
                 "pyro_seqlatent.nn", "FlowDensity", "DequantizedImages", "bits_per_dim",
                 "restore_modules"):
        assert name in text


def test_the_training_settings_table_matches_infer_config():
    from pyro_seqlatent.cli import settings_markdown

    table = settings_markdown()
    assert table in API.read_text(), (
        "docs/api.md's training settings table is out of date; replace it with the output of\n"
        "python -c 'from pyro_seqlatent.cli import settings_markdown; print(settings_markdown())'"
        f"\n\n{table}")
