"""Hubs of tests/test_typescript.py: every hint form ``hubwire typescript`` knows, and hubs it refuses.

``KitchenHub`` is only generated and type-checked (never served); the bad hubs each carry one
mistake the generator must name.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, Protocol, TypedDict

import msgspec

from hubwire import Hub, hub_method

if TYPE_CHECKING:
    from decimal import Context


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Tree:
    """A recursive dataclass: children refer to the interface being declared."""

    label: str
    children: list[Tree] = field(default_factory=list)


class Renamed(msgspec.Struct, rename="camel"):
    """``rename`` changes the wire names, so the interface uses them."""

    user_name: str
    created_at: datetime
    score: float | None = None


class Circle(msgspec.Struct, tag=True, tag_field="kind"):
    radius: float


class Square(msgspec.Struct, tag="sq", tag_field="kind"):
    side: float


class Point(msgspec.Struct, array_like=True):
    x: int
    y: int


class Options(TypedDict):
    verbose: bool
    name: NotRequired[str]
    # a field named like a TypeScript keyword, and one that is no identifier
    default: int


OddKeys = TypedDict("OddKeys", {"content-type": str, "class": str})


class KitchenClient(Protocol):
    async def notify(self, level: Level, text: str) -> None: ...

    async def ask_number(self, question: str) -> int:
        """A client result."""
        ...

    @hub_method("customName")
    async def renamed(self) -> None: ...


class KitchenHub(Hub):
    """Every supported hint form."""

    client_methods = KitchenClient

    async def scalars(self, s: str, i: int, f: float, b: bool, nothing: None) -> bool:
        return b

    async def containers(
        self,
        xs: list[int],
        pair: tuple[str, int],
        rest: tuple[float, ...],
        tags: set[str],
        m: dict[str, float],
    ) -> dict[int, list[str]]:
        return {}

    async def optional(self, maybe: str | None, choice: Literal["a", "b", 3]) -> int | str | None:
        return None

    async def times(self, when: datetime, day: date, span: timedelta, guid: uuid.UUID) -> Decimal:
        return Decimal(1)

    async def objects(self, tree: Tree, renamed: Renamed, shape: Circle | Square, point: Point) -> Options:
        return {"verbose": True, "default": 1}

    async def odd(self, keys: OddKeys, blob: bytes, anything: Any, untyped) -> Any:
        return None

    async def enums(self, color: Color, level: Level) -> list[Color]:
        return [color]

    async def constrained(self, n: Annotated[int, msgspec.Meta(ge=0)]) -> None:
        return None

    async def defaults(self, first: str, second: int = 2, third: str | None = None) -> str:
        return first

    async def upload(self, label: str, items: AsyncIterator[Point]) -> int:
        return len([i async for i in items])

    async def counter(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def generator(self) -> AsyncGenerator[Renamed, None]:
        return
        yield

    @hub_method("SaySomething")
    async def say(self, new: str, function: str) -> None:
        return None


class Plain:
    """Not a type the server can convert: a plain class."""

    def __init__(self, value: int) -> None:
        self.value = value


class PlainParamHub(Hub):
    async def send_thing(self, thing: Plain) -> None:
        return None


class NestedPlainHub(Hub):
    async def fetch_all(self) -> list[Plain]:
        return []


class UnresolvedHub(Hub):
    async def compute(self, ctx: Context) -> int:
        return 0


class BadClient(Protocol):
    async def update(self, when: Plain) -> None: ...


class BadClientHub(Hub):
    client_methods = BadClient


class KeywordHub(Hub):
    async def search(self, *, text: str) -> list[str]:
        return []


class DottedHub(Hub):
    @hub_method("Explicit.Name")
    async def dotted(self) -> None:
        return None


class ClashHub(Hub):
    async def on_update(self) -> None:
        return None

    class _Client(Protocol):
        async def update(self) -> None: ...

    client_methods = _Client
