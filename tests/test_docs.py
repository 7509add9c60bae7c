"""The documentation site builds with ``mkdocs build --strict`` and documents every public name.

Strict mode turns every warning into a failure: a broken link or anchor, a page missing from the nav,
a snippet (``--8<--``) naming a file that does not exist, an API reference entry that does not resolve.
The reference pages are generated from the docstrings (mkdocstrings), so a public name is documented
when the built reference has its anchor and its docstring is not empty. The FastAPI recipe page includes
``examples/fastapi_recipe/app.py`` itself (tests/test_fastapi_recipe.py runs it), so it cannot drift.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import griffe
import pytest

from .conftest import ROOT

#: the public modules and their public names: what the API reference must cover
PUBLIC_MODULES = ("hubwire", "hubwire.auth", "hubwire.emitter")
REFERENCE = {
    "hubwire": "reference/hubwire",
    "hubwire.auth": "reference/auth",
    "hubwire.emitter": "reference/emitter",
}


def public_names(module: str) -> list[str]:
    names = importlib.import_module(module).__all__
    assert names, module
    return list(names)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The site as ``mkdocs build --strict`` writes it (built once for the module)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # the theme's banner about MkDocs 2.0, not a warning
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    yield out


def test_the_site_builds_strict_with_every_page(site: Path) -> None:
    for page in ("getting-started", "fastapi", "operations", "interop", "performance", *REFERENCE.values()):
        assert (site / page / "index.html").is_file(), page


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(site: Path, module: str) -> None:
    html = (site / REFERENCE[module] / "index.html").read_text()
    missing = [name for name in public_names(module) if f'id="{module}.{name}"' not in html]
    assert not missing, f"add these to docs/{REFERENCE[module]}.md: {missing}"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_the_reference_shows_no_raw_sphinx_roles(site: Path, module: str) -> None:
    """docs/hooks/sphinx_roles.py turns ``:class:`X``` into code; a role it missed would show as text."""
    html = (site / REFERENCE[module] / "index.html").read_text()
    leaked = re.findall(r":(?:class|func|meth|data|attr|mod|exc|obj):<code>", html)
    assert not leaked, leaked


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module: str) -> None:
    """Read as mkdocstrings reads them (griffe, from the source: attribute docstrings count)."""
    package = griffe.load(module, search_paths=[str(ROOT / "src")])
    undocumented = [
        name
        for name in public_names(module)
        if package[name].docstring is None or not package[name].docstring.value.strip()
    ]
    assert not undocumented, f"{module}: no docstring on {undocumented}"


def test_the_fastapi_recipe_page_shows_the_tested_app(site: Path) -> None:
    html = (site / "fastapi" / "index.html").read_text()
    source = (ROOT / "examples" / "fastapi_recipe" / "app.py").read_text()
    assert "def current_user" in source
    # highlighted code is split into spans: compare the page's text with the source's identifiers
    for needle in ("current_user", "issue_token", "HubServer", "require_role", "has_role"):
        assert needle in html, needle
    assert "RECIPE_JWT_SECRET" in html  # a line only the included file has


def test_the_clients_page_has_the_js_return_value_tip(site: Path) -> None:
    html = (site / "clients" / "index.html").read_text()
    assert "server is not expecting a result" in html
