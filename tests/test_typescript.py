"""``hubwire typescript``: typed clients generated from hubs' hints, checked by ``tsc`` and used live.

The interop and blog apps' hubs and ``tests/apps/typed.py``'s ``KitchenHub`` (every supported hint
form) are generated through the CLI, then ``tsc --strict`` (npm ``typescript``) checks them together
with ``tests/ts/checks.ts``, whose ``@ts-expect-error`` lines prove the types refuse wrong calls;
``tests/ts/live.ts``, compiled by ``tsc``, drives the generated ``TestHub`` client in Node against a
live ``hubwire run`` of the interop app. Hubs with a hint that has no TypeScript form are refused
with the hub, method and parameter named.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubwire.cli import main
from hubwire.hubs.hub import discover_methods
from hubwire.hubs.typescript import TypeScriptError, generate
from tests.apps import typed
from tests.conftest import PYTHON, ROOT, ServerProcess
from tests.requirements import NODE_CLIENT, requires

NODE = shutil.which("node") or "node"
TSC = ROOT / "node_modules" / "typescript" / "bin" / "tsc"
SOURCES = ROOT / "tests" / "ts"
TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "target": "ES2022",
        "module": "commonjs",
        "lib": ["ES2022", "DOM"],  # fetch and console without @types/node
        "types": [],
        "outDir": "out",
    },
    "files": ["interop.ts", "blog.ts", "kitchen.ts", "checks.ts", "live.ts"],
}
TYPESCRIPT = requires(*NODE_CLIENT, "typescript")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    return subprocess.run(
        [PYTHON, "-m", "hubwire.cli", "typescript", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A TypeScript project: the generated clients, the checks and the live script."""
    root = tmp_path_factory.mktemp("typescript")
    (root / "node_modules").symlink_to(ROOT / "node_modules")
    for source in SOURCES.glob("*.ts"):
        shutil.copy(source, root / source.name)
    for app, name in [
        ("examples.interop.app:app", "interop"),
        ("examples.blog.app:app", "blog"),
        ("tests.apps.typed:KitchenHub", "kitchen"),
    ]:
        result = _cli(app, "--out", str(root / f"{name}.ts"))
        assert result.returncode == 0, result.stderr
    (root / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    yield root


def _tsc(project: Path, *args: str) -> None:
    result = subprocess.run(
        [NODE, str(TSC), "-p", str(project), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@TYPESCRIPT
def test_generated_clients_pass_tsc_strict(project: Path) -> None:
    _tsc(project, "--strict", "--noEmit")


@TYPESCRIPT
def test_generated_client_against_a_live_server(project: Path, request: pytest.FixtureRequest) -> None:
    _tsc(project)
    server = ServerProcess("examples.interop.app:app")
    request.addfinalizer(server.close)
    result = subprocess.run(
        [NODE, str(project / "out" / "live.js"), server.url],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    assert got == {
        "echo": "héllo 🙂",
        "complex": {
            "String": "s",
            "IntArray": [1, 2, 3],
            "ByteArray": "AQID",
            "Guid": "00010203-0405-0607-0706-050403020100",
            "DateTime": "2000-01-01T00:00:00Z",
        },
        "missingHeader": None,
        "stream": ["a", "b", "c"],
        "concat": "ab",
        "message": "to the caller",  # a typed server-to-client message
        "custom": {"Name": "n", "Value": 7},
        "clientResult": "10",  # the typed receiver's client result
        "removedCalls": 0,  # a handler removed by its returned function is not called
    }


def test_every_generated_target_reaches_its_hub_method() -> None:
    """The wire names the clients call are names the server matches (PascalCase of snake_case)."""
    text = generate([(typed.KitchenHub, ["/kitchen"])])
    targets = re.findall(r'this\.connection\.(?:invoke|stream)<.*?>\("([^"]+)"', text)
    methods = discover_methods(typed.KitchenHub)
    assert len(targets) == len({id(m.func) for m in methods.values()})
    assert all(t.lower() in methods for t in targets)
    assert "saySomething(new_: string, function_: string): Promise<void>" in text  # hub_method + keywords
    assert "defaults(first: string, second?: number, third?: string | null)" in text
    assert 'static readonly paths: readonly string[] = ["/kitchen"];' in text
    assert text == generate([(typed.KitchenHub, ["/kitchen"])])  # deterministic


@pytest.mark.parametrize(
    ("hub", "message"),
    [
        # what add_hub refuses (hubs.hub.discover_methods) is refused with the server's words
        (
            typed.PlainParamHub,
            "hub PlainParamHub, method send_thing, parameter 'thing': "
            "hubwire cannot convert arguments to Plain",
        ),
        (
            typed.NestedPlainHub,
            "hub NestedPlainHub, method fetch_all, return type: hubwire cannot serialize Plain",
        ),
        (
            typed.UnresolvedHub,
            "hub UnresolvedHub, method compute, parameter 'ctx': the hint 'Context' cannot be resolved",
        ),
        (typed.BadClientHub, "BadClientHub.client_methods (BadClient).update: parameter 'when' (Plain)"),
        (typed.ClashHub, "ClashHub: client method Update and hub method OnUpdate are both 'onUpdate'"),
        (typed.KeywordHub, "hub KeywordHub, method search: only positional parameters are supported (text)"),
        (typed.DottedHub, "DottedHub.dotted: 'Explicit.Name' is not a name TypeScript can give a method"),
    ],
)
def test_a_hint_without_a_typescript_form_is_named(hub: type, message: str) -> None:
    with pytest.raises(TypeScriptError) as caught:
        generate([(hub, [])])
    assert message in str(caught.value)


def test_the_cli_names_the_method_and_parameter_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["typescript", "tests.apps.typed:PlainParamHub"])
    assert str(caught.value).startswith(
        "hubwire typescript: hub PlainParamHub, method send_thing, parameter 'thing'"
    )
    assert capsys.readouterr().out == ""


def test_the_cli_writes_only_the_hubs_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "hubs.ts"
    main(["typescript", "examples.interop.app:app", "--hub", "AuthorizedHub", "--out", str(out)])
    text = out.read_text()
    assert "export class AuthorizedHub" in text and "TestHub" not in text
    assert 'static readonly paths: readonly string[] = ["/authorizedhub"];' in text
    with pytest.raises(SystemExit, match="no hub"):
        main(["typescript", "examples.interop.app:app", "--hub", "Nope"])
