"""The documentation: every Python block of README.md and docs/*.md runs, the site builds strictly
with its math rendered, and the docs make no claim the repository cannot back.

Convention (docs/index.md, "Documentation conventions"): a block fenced ```` ```python ```` is a
self-contained program and runs here, in a fresh namespace, in a temporary directory. A block that
is deliberately not runnable (a signature, a listing of generated code) is fenced
```` ```{.python .fragment} ````; keep those rare. Blocks are extracted with mktestdocs.

Cheap mode: the docs compile with ``backend="spectral"``, whose inner compiler defaults to
inductor; here the default inner compiler is ``eager`` (the same rewritten graphs, run as they
are: no AOT tracing, no C++ build), so a block costs seconds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mktestdocs = pytest.importorskip("mktestdocs")

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = "python"
FRAGMENT = "{.python .fragment}"


def _blocks() -> list:
    params = []
    for path in DOC_FILES:
        for i, code in enumerate(mktestdocs.grab_code_blocks(path.read_text(encoding="utf-8"), lang=RUNNABLE)):
            rel = path.relative_to(ROOT).as_posix()
            params.append(pytest.param(rel, code, id=f"{rel}-{i}"))
    return params


@pytest.fixture
def _cheap_compile(monkeypatch):
    from fx_spectral.graph.backend import BackendConfig

    monkeypatch.setitem(BackendConfig.__init__.__kwdefaults__, "inner", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("path,code", _blocks())
def test_python_block_runs(path, code, tmp_path, monkeypatch, _cheap_compile):
    for needs in ("torchtitan", "transformers"):
        if re.search(rf"\b(import|from) {needs}\b", code) and importlib.util.find_spec(needs) is None:
            pytest.skip(f"{path}: the block needs {needs} (pip install -e \".[test,torchtitan]\")")
    monkeypatch.chdir(tmp_path)  # blocks may write files
    exec(compile(code, path, "exec"), {"__name__": "__main__"})


def test_every_python_fence_is_runnable_or_a_marked_fragment():
    """A misspelt info string would silently drop a block from the tests."""
    bad = []
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.match(r"\s*(`{3,}|~{3,})([^`]*)$", line)  # a fence's info string has no backtick
            info = (m.group(2) or "").strip() if m else ""
            if re.search(r"\bpy(thon)?\b|pycon", info) and info not in (RUNNABLE, FRAGMENT):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "Python fences must read ```python or ```{.python .fragment}:\n" + "\n".join(bad)


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".py", ".md", ".yml", ".yaml", ".toml", ".ini", ".cfg", ".txt", ".sh", ""}
    return [ROOT / f for f in out.splitlines() if Path(f).suffix in suffixes and (ROOT / f).is_file()]


def test_no_reference_to_documents_outside_the_repository():
    needle = "DESI" + "GN"  # split so that this file does not match itself
    hits = []
    for path in _tracked_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if needle in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "references to a design document that is not in the repository:\n" + "\n".join(hits)


def test_install_commands_work_from_a_clone():
    """The package is not on a package index: extras install from a clone, `pip install -e ".[x]"`."""
    hits = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"pip install\s+\"?fx_spectral", line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for mod in ("mkdocs", "material", "pymdownx"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install -e \".[docs]\")")
    out = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_site_builds_strictly_and_renders_math(site):
    """arithmatex wraps the math for KaTeX, and every page loads KaTeX and the script that renders it."""
    pages = {"index": "", "eager": "eager/"}
    for name, rel in pages.items():
        html = (site / rel / "index.html").read_text(encoding="utf-8")
        assert re.search(r'<div class="arithmatex">\s*\\\[', html), f"{name}: no display math for KaTeX"
        if name == "eager":
            assert '<span class="arithmatex">\\(' in html, f"{name}: no inline math for KaTeX"
        scripts = re.findall(r'<script src="([^"]+)"', html)
        assert any(re.search(r"katex(@[\d.]+)?/dist/katex(\.min)?\.js$", s) for s in scripts), scripts
        assert any(s.endswith("contrib/auto-render.min.js") for s in scripts), scripts
        assert any(s.endswith("javascripts/katex.js") for s in scripts), scripts
        assert re.search(r'<link rel="stylesheet" href="[^"]*katex(@[\d.]+)?/dist/katex(\.min)?\.css"', html)
    init = (site / "javascripts" / "katex.js").read_text(encoding="utf-8")
    assert "renderMathInElement" in init and "arithmatex" in init


def test_fragment_blocks_render_as_python(site):
    html = (site / "graph" / "index.html").read_text(encoding="utf-8")
    if "fragment" not in (ROOT / "docs" / "graph.md").read_text(encoding="utf-8"):
        pytest.skip("graph.md has no fragment block")
    assert re.search(r'class="[^"]*\bfragment\b[^"]*"', html), "the fragment fence did not render as a code block"
    assert '<span class="k">def</span>' in html or '<span class="kn">' in html  # highlighted as Python
