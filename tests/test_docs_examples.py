"""The code examples of the per-flow docs pages run as written."""

import re
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).resolve().parent.parent / "docs" / "flows").glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_flow_page_example_runs(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no example"
    namespace: dict = {}
    for code in [blocks[-1], *blocks[:-1]]:  # the "Example" block (last) holds the imports
        exec(compile(code, str(page), "exec"), namespace)
    assert capsys.readouterr().out  # the examples print what they compute


def test_every_flow_has_a_page():
    assert {p.stem for p in PAGES} == {"nice", "real_nvp", "planar", "radial", "iaf"}
