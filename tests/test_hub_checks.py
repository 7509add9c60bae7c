"""Hub definition mistakes surface at ``add_hub``, naming the hub, the method and the parameter.

Unsupported or unresolvable hints are refused (every call would fail, or a value would pass
unconverted); public sync methods and unhinted parameters are logged as warnings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from hubwire import Hub, HubServer

if TYPE_CHECKING:
    from decimal import Context  # deliberately unavailable at run time


class Plain:
    """A class msgspec has no conversion for."""

    def __init__(self, x: int) -> None:
        self.x = x


@dataclass
class Point:
    x: int
    y: int


class Item(msgspec.Struct):
    name: str
    tags: list[str]


class PlainParamHub(Hub):
    async def place(self, where: Plain) -> None: ...


class NestedPlainHub(Hub):
    async def place(self, where: list[Plain | None]) -> None: ...


class UploadPlainHub(Hub):
    async def upload(self, items: AsyncIterator[Plain]) -> None: ...


class UnresolvedHub(Hub):
    async def tune(self, ctx: Context) -> None: ...


class PlainResultHub(Hub):
    async def make(self) -> Plain:
        return Plain(1)


class PlainStreamHub(Hub):
    async def counter(self) -> AsyncIterator[Plain]:
        yield Plain(1)


class GoodHub(Hub):
    """Every kind of hint the README promises, none of which may be refused or warned about."""

    async def send(self, user: str, count: int, ratio: float | None = None) -> dict[str, Any]:
        return {}

    async def move(self, to: Point, items: list[Item], raw: Any, anything: object) -> Point:
        return to

    async def counter(self, n: int) -> AsyncIterator[int]:
        yield n

    async def upload(self, values: AsyncIterator[Point]) -> list[int]:
        return []

    def _helper(self) -> int:
        return 1


class SloppyHub(Hub):
    def send(self, text: str) -> None: ...

    async def echo(self, value, count: int):  # type: ignore[no-untyped-def]
        return value


@pytest.mark.parametrize(
    ("hub", "expected"),
    [
        (
            PlainParamHub,
            "hub PlainParamHub, method place, parameter 'where': hubwire cannot convert arguments to Plain",
        ),
        (
            NestedPlainHub,
            "hub NestedPlainHub, method place, parameter 'where': hubwire cannot convert arguments to Plain",
        ),
        (
            UploadPlainHub,
            "hub UploadPlainHub, method upload, parameter 'items': hubwire cannot convert arguments to Plain",
        ),
        (
            UnresolvedHub,
            "hub UnresolvedHub, method tune, parameter 'ctx': the hint 'Context' cannot be resolved",
        ),
        (PlainResultHub, "hub PlainResultHub, method make, return type: hubwire cannot serialize Plain"),
        (PlainStreamHub, "hub PlainStreamHub, method counter, return type: hubwire cannot serialize Plain"),
    ],
)
def test_add_hub_refuses_hints_msgspec_cannot_use(hub: type[Hub], expected: str) -> None:
    with pytest.raises(TypeError) as info:
        HubServer().add_hub("/hub", hub)
    assert str(info.value).startswith(expected), info.value


def test_an_enc_hook_allows_custom_result_types_not_parameters() -> None:
    def enc_hook(obj: Any) -> Any:
        return obj.x

    server = HubServer(enc_hook=enc_hook)
    server.add_hub("/result", PlainResultHub)
    server.add_hub("/stream", PlainStreamHub)
    with pytest.raises(TypeError, match="parameter 'where'"):
        server.add_hub("/param", PlainParamHub)


def test_supported_hints_pass_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hubwire.hub")
    endpoint = HubServer().add_hub("/hub", GoodHub)
    assert {"send", "move", "counter", "upload"} <= set(endpoint.methods)
    assert "_helper" not in endpoint.methods
    assert caplog.records == []


def test_sync_methods_and_unhinted_parameters_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hubwire.hub")
    endpoint = HubServer().add_hub("/hub", SloppyHub)
    assert "send" not in endpoint.methods  # still not callable: it is only reported
    assert "echo" in endpoint.methods
    messages = [r.getMessage() for r in caplog.records]
    assert any("hub SloppyHub: method send is not 'async def'" in m for m in messages), messages
    assert any("hub SloppyHub, method echo: parameter 'value' has no type hint" in m for m in messages), (
        messages
    )
    assert not any("'count'" in m for m in messages), messages
