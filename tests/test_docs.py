"""The documentation site builds with `mkdocs build --strict`, and documents every
public name with lineax-style docstrings."""

import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest
import tesseract_lx as tlx

from helpers import ROOT


PUBLIC = sorted(
    name
    for name in dir(tlx)
    if not name.startswith("_") and not inspect.ismodule(getattr(tlx, name))
)
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "WARNING" not in log, log
    return out


def test_the_site_builds_strictly(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for page in ("getting-started/", "concepts/batching/", "guides/lineax/", "api/"):
        assert any(p.startswith(page) for p in pages), sorted(pages)
    assert (site / "benchmarks" / "results_time.png").stat().st_size > 0


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_in_the_api_reference(site, name):
    directives = {
        m
        for page in API_PAGES
        for m in re.findall(r"^::: tesseract_lx\.(\w+)", page.read_text(), re.M)
    }
    assert name in directives, f"no `::: tesseract_lx.{name}` in docs/api/"
    html = "".join(p.read_text() for p in (site / "api").rglob("index.html"))
    assert f'id="tesseract_lx.{name}"' in html


def _documented_parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p not in ("self", "args", "kwargs")]


@pytest.mark.parametrize("name", PUBLIC)
def test_docstrings_say_arguments_and_returns(name):
    obj = getattr(tlx, name)
    if not callable(obj):
        return  # `__version__`-like constants
    doc = inspect.getdoc(obj) or ""
    assert doc, f"tesseract_lx.{name} has no docstring"
    if inspect.isclass(obj) and issubclass(obj, Exception):
        return  # raised by the library, not constructed: documented by attributes
    init_doc = inspect.getdoc(obj.__init__) if inspect.isclass(obj) else ""
    if _documented_parameters(obj):
        # A record the library hands back (`Decision`) says what its fields hold.
        record = inspect.isclass(obj) and dataclasses.is_dataclass(obj)
        said = doc + (init_doc or "")
        assert "**Arguments:**" in said or (record and "**Attributes:**" in said), name
    if inspect.isfunction(obj):
        returns = inspect.signature(obj).return_annotation
        if returns not in (None, inspect.Signature.empty):
            assert "**Returns:**" in doc, name


def test_every_example_is_run_by_a_test():
    tests = (ROOT / "tests" / "test_examples.py").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f'"{script.name}"' in tests, f"no test runs examples/{script.name}"
