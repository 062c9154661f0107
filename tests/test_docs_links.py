"""Every file that docs/*.md and README.md point to is in git, not only on someone's disk.

Checked: relative Markdown links ``[text](path)`` and images, and file paths written as inline
code: a figure (``curve_jsb-vrnn.png``), a table or log with a folder (``periodic/results.md``)
and any file under one of our top folders (``benchmarks/vrnn.py``). A path is resolved against
the document's folder, the repository root, and then as the tail of a tracked file under
``benchmarks/results/`` (the docs name run-folder figures relative to their table); ``<name>``
and ``*`` are wildcards, ``{a,b}`` alternatives. Bare names of file kinds (``results.json``,
``metrics.jsonl``) are not links and are skipped. The benchmark results policy (root
``.gitignore``, benchmarks/README.md) keeps the linked files tracked; this test fails when it
does not. Outside a git checkout, files on disk count.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
IMAGE = re.compile(r"\.(png|jpg|svg|gif)$")
OUTPUT = re.compile(r"\.(md|json|jsonl|csv)$")  # tables, and names of run-folder files
FILE = re.compile(r"\.\w+$")
# a code path is checked when it starts in one of ours (`lib/likelihood_eval.py` is the
# reference implementation's)
REPO_DIRS = {"benchmarks", "docs", "examples", "pyro_seqlatent", "tests", ".."}
SKIP = ("/", "~", "$", "-", "runs/", "...", "http:", "https:", "mailto:")


def tracked() -> set[str] | None:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an sdist, a copied tree): files on disk count
    files = {f for f in out.decode().split("\0") if f}
    return files or None


def references(text: str) -> list[tuple[str, bool]]:
    """``(path, is_link)`` for each Markdown link and each path-like word in inline code,
    outside fenced code blocks."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    out = [(m.group(1), True) for m in re.finditer(r"\]\(([^)\s]+)\)", text)]
    for span in re.findall(r"`([^`\n]+)`", text):
        for word in span.split():
            word = word.strip("'\",;:()")
            if IMAGE.search(word) or (OUTPUT.search(word) and "/" in word) or (
                    FILE.search(word) and word.split("/")[0] in REPO_DIRS):
                out.append((word, False))
    return out


def expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [re.sub(r"<[^<>]*>", "*", path)]
    return [p for alt in m.group(1).split(",")
            for p in expand(path[:m.start()] + alt + path[m.end():])]


def resolves(path: str, doc: Path, files: set[str] | None) -> bool:
    for pattern in expand(path):
        candidates = [(doc.parent / pattern).resolve(), (ROOT / pattern).resolve()]
        wanted = [str(c.relative_to(ROOT)) for c in candidates if c.is_relative_to(ROOT)]
        if files is None:
            if not any(Path(ROOT / w).is_file() for w in wanted):
                return False
            continue
        under = [f for f in files if f.startswith("benchmarks/results/")]
        if not (any(fnmatch.fnmatchcase(f, w) for w in wanted for f in files)
                or any(fnmatch.fnmatchcase(f, "*/" + pattern) for f in under)):
            return False
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_file_a_doc_points_to_is_tracked(doc):
    files = tracked()
    broken = []
    for path, is_link in references(doc.read_text()):
        path = path.split("#")[0]
        if not path or path.startswith(SKIP) or (is_link and "://" in path):
            continue
        if not resolves(path, doc, files):
            broken.append(path)
    assert not broken, (f"{doc.relative_to(ROOT)} points to files that are not tracked by git: "
                        f"{broken} (benchmark outputs: see benchmarks/README.md for which are "
                        "kept; a linked run-folder figure needs a '!' line in .gitignore)")


def test_the_check_catches_an_untracked_figure(tmp_path):
    doc = tmp_path / "doc.md"
    assert references("see ![a](../x/a.png) and `periodic-interp-0.5-latent_ode/row.json`, "
                      "`metrics.jsonl`, `b.png`\n```\n`c.png`\n```\n") == [
        ("../x/a.png", True), ("periodic-interp-0.5-latent_ode/row.json", False),
        ("b.png", False)]
    files = {"benchmarks/results/latent_ode/periodic/periodic-interp-0.5-latent_ode/"
             "trajectories.png", "docs/vae.md"}
    assert resolves("periodic-interp-0.5-latent_ode/trajectories.png", ROOT / "docs/x.md", files)
    assert resolves("periodic-interp-0.5-latent_ode/<figure>.png", ROOT / "docs/x.md", files)
    assert resolves("vae.md", ROOT / "docs/x.md", files)
    assert not resolves("periodic-interp-0.5-latent_ode/row.json", ROOT / "docs/x.md", files)
    assert not resolves("{periodic,hopper}-interp-0.5-latent_ode/trajectories.png",
                        ROOT / "docs/x.md", files)
    assert not resolves("../docs/none.md", doc, files)
