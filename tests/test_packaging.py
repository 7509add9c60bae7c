"""Packaging: what ``pip install hubwire`` gives someone on a clean machine.

* the wheel built from this tree holds every module, ``py.typed``, the dashboard's files, the
  LICENSE, one version (``hubwire.__version__``) and the declared metadata;
* every third-party module hubwire imports is declared (a dependency or an extra: ``otel`` for
  the tracing code), and every declared dependency has one lower bound;
* installed from that wheel into a clean venv (the dependencies' newest releases), the README quick
  start runs under ``hubwire run`` and answers a client; ``hubwire demo`` says what it needs (the
  blog demo lives in a source checkout, not in the wheel);
* installed with every declared minimum exactly (``pkg==min``: the runtime dependencies and the
  ``jwt``, ``metrics`` and ``otel`` extras), the quick start runs over Redis in both serving modes
  and ``hubwire typescript`` reads a hub with every kind of hint.

The venvs are made without pip (the test's own pip installs into them with ``--python``) and
installs go through pip's ordinary cache, so after the first run the whole file takes about 20 s
(the first run downloads the minimum releases from the package index).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from .conftest import ROOT, RedisServer, free_port, wait_port
from .rawhub import RawHub, open_ws, ws_url
from .requirements import requires

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SRC = ROOT / "src" / "hubwire"
#: the extras whose minimums are installed with the runtime dependencies (``demo`` and ``test`` are
#: tools around the library, not part of it)
RUNTIME_EXTRAS = ("jwt", "metrics", "otel", "service")
#: what building the wheel reads besides src/ (the demo image's Dockerfile copies the same)
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")
_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?>=([0-9][0-9.]*)$")
PIP_TIMEOUT = 300


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version() -> str:
    """``__version__`` as written in ``src/hubwire/__init__.py`` (the one source)."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise AssertionError("no __version__ in src/hubwire/__init__.py")


def _minimums() -> dict[str, str]:
    """Distribution -> declared minimum, for the runtime dependencies and the runtime extras."""
    specs = list(PROJECT["dependencies"])
    for extra in RUNTIME_EXTRAS:
        specs += PROJECT["optional-dependencies"][extra]
    found: dict[str, str] = {}
    for spec in specs:
        match = _SPEC.match(spec)
        assert match, f"{spec!r}: a runtime requirement is `name[extras]>=minimum`, nothing else"
        found[_norm(match[1])] = match[3]
    return found


def _pip(*args: str) -> None:
    """The test's own pip (``--python`` points it at a venv that has none)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """A command of a test venv, in the clean environment."""
    return subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _venv(where: Path) -> Path:
    """A clean venv without pip; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
    return where / "bin" / "python"


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH (the installed package must be the one imported) and no hubwire settings."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("HUBWIRE_")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree, built from a copy (the build leaves nothing in the repository)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "-q", "-w", str(out), str(tree))
    (built,) = out.glob("hubwire-*.whl")
    return built


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    """The README's "A hub in ten lines", verbatim, as ``quickstart.py`` in an empty folder."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A hub in ten lines", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    app = tmp_path / "app"
    app.mkdir()
    (app / "quickstart.py").write_text(code)
    return app


@contextlib.contextmanager
def _serving(python: Path, cwd: Path, *args: str) -> Iterator[str]:
    """``hubwire run quickstart:server`` of the venv on a free port; its URL."""
    port = free_port()
    hubwire = python.parent / "hubwire"
    log = cwd / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(hubwire), "run", "quickstart:server", "--port", str(port), *args],
            cwd=cwd,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            try:
                wait_port(port, proc=proc)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{log.read_text(errors='replace')}") from None
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text


async def _one_call(url: str) -> None:
    """A client calls SendMessage and hears the broadcast back; a WebSocket with an unknown
    connection id is refused with a well-formed 404."""
    with pytest.raises(InvalidStatus) as refused:
        await open_ws(ws_url(url, "/chat", "id=unknown"))
    assert refused.value.response.status_code == 404
    hub = await RawHub.open(url, "/chat")
    try:
        assert await hub.invoke("SendMessage", "ann", "hello") is None
        message = await hub.next_message()
        assert message["target"] == "ReceiveMessage" and message["arguments"] == ["ann", "hello"], message
    finally:
        await hub.close()


# -- the wheel and the metadata (no venv) --------------------------------------------------------


def test_the_wheel_holds_the_package_its_data_and_its_metadata(wheel: Path) -> None:
    version = _version()
    assert wheel.name.startswith(f"hubwire-{version}-py3-none-any"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"hubwire-{version}.dist-info/METADATA").decode()
    sources = {
        "hubwire/" + p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sources - names == set(), "files of src/hubwire missing from the wheel"
    assert "hubwire/py.typed" in names
    assert any(n.startswith("hubwire/server/dashboard_files/") for n in names)
    assert f"hubwire-{version}.dist-info/licenses/LICENSE" in names
    assert {n.split("/", 1)[0] for n in names} == {"hubwire", f"hubwire-{version}.dist-info"}
    headers = [line for line in meta.splitlines() if ": " in line]
    assert f"Version: {version}" in headers
    assert "License-Expression: MIT" in headers
    assert any(h.startswith("Project-URL: Changelog, ") for h in headers)
    assert any(h.startswith("Classifier: Typing :: Typed") for h in headers)
    for extra in RUNTIME_EXTRAS:
        assert f"Provides-Extra: {extra}" in headers


def test_every_imported_third_party_module_is_declared_with_a_minimum() -> None:
    """What src/hubwire imports (at any depth, optional imports too) maps to a distribution that is a
    dependency or in a runtime extra; the tracing code's ``opentelemetry`` is the ``otel`` extra."""
    declared = set(_minimums())
    owners = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.partition(".")[0]]
            else:
                continue
            for top in tops:
                if top != "hubwire" and top not in sys.stdlib_module_names:
                    imported.setdefault(top, set()).add(str(path.relative_to(SRC)))
    assert imported, "no third-party import found"
    for module, where in sorted(imported.items()):
        dists = {_norm(d) for d in owners.get(module, [])}
        assert dists & declared, f"{module} (imported by {sorted(where)}) comes from {dists}: not declared"
    tracing = {n for n, where in imported.items() if "hubs/tracing.py" in where}
    assert tracing == {"opentelemetry"}
    (otel,) = PROJECT["optional-dependencies"]["otel"]
    assert otel.startswith("opentelemetry-api>=")


def test_the_build_requirement_reads_the_license_expression() -> None:
    """``license = "MIT"`` (an SPDX expression) and ``license-files`` need setuptools 77 (PEP 639)."""
    (requirement,) = PYPROJECT["build-system"]["requires"]
    match = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", requirement)
    assert match and int(match[1]) >= 77, requirement
    assert PROJECT["license"] == "MIT" and PROJECT["dynamic"] == ["version"]
    assert "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hubwire.__version__"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "CHANGELOG.md").read_text().count(f"## {_version()}") == 1


def test_the_demo_image_copies_what_the_build_reads() -> None:
    """deploy/Dockerfile builds hubwire from a copy too: without LICENSE (``license-files``) it fails."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"COPY {' '.join(BUILD_FILES)} ./" in dockerfile
    assert "COPY src ./src" in dockerfile


# -- installed into clean venvs -------------------------------------------------------------------


async def test_from_the_wheel_the_quick_start_runs_and_demo_says_what_it_needs(
    wheel: Path, quickstart: Path, tmp_path: Path
) -> None:
    python = _venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "-q", str(wheel))
    with _serving(python, quickstart) as url:
        await _one_call(url)
    demo = _run([str(python.parent / "hubwire"), "demo", "--port", str(free_port())], quickstart, 30)
    assert demo.returncode != 0
    assert "Traceback" not in demo.stderr, demo.stderr
    assert "source checkout" in demo.stderr and "./run demo" in demo.stderr, demo.stderr


@requires("redis-server")
async def test_with_every_declared_minimum_the_quick_start_runs_over_redis(
    wheel: Path, quickstart: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    minimums = _minimums()
    constraints = tmp_path / "minimums.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in minimums.items()))
    python = _venv(tmp_path / "venv")
    target = f"hubwire[{','.join(RUNTIME_EXTRAS)}] @ {wheel.as_uri()}"
    _pip("--python", str(python), "install", "-q", "-c", str(constraints), target)
    probe = _run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, json, sys;"
            "import hubwire.auth, hubwire.server.metrics, hubwire.hubs.tracing as t;"
            "assert t._trace is not None, 'opentelemetry-api did not import';"
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))",
            *minimums,
        ],
        quickstart,
        60,
    )
    assert probe.returncode == 0, probe.stderr
    installed = json.loads(probe.stdout)
    # "0.18" is installed as 0.18.0: compare release numbers without trailing zeros
    strip = lambda v: re.sub(r"(\.0)+$", "", v)  # noqa: E731
    assert {n: strip(v) for n, v in installed.items()} == {n: strip(v) for n, v in minimums.items()}
    # the hint checks of add_hub and `hubwire typescript` read msgspec.inspect (what sets msgspec's
    # minimum): a hub with every supported kind of hint, mixed Literals included
    typescript = _run([str(python.parent / "hubwire"), "typescript", "tests.apps.typed:KitchenHub"], ROOT, 60)
    assert typescript.returncode == 0, typescript.stderr
    assert "export class KitchenHub {" in typescript.stdout, typescript.stdout[:2000]
    # native serving (the default), and ASGI serving, which hands hub WebSockets to uvicorn's
    # websockets-sansio protocol (what sets uvicorn's minimum: its refusals were malformed before)
    for serving in ("native", "asgi"):
        args = ("--serving", serving, "--redis", redis_server.url, "--channel-prefix", "Packaging:")
        with _serving(python, quickstart, *args) as url:
            await _one_call(url)
