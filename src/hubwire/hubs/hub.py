"""The ``Hub`` base class and how its methods are found and bound.

A hub is a class whose public ``async def`` methods clients call by name. A
new instance serves each call (as in SignalR), so keep per-connection state in
``self.context.items`` and shared state outside the hub.

Method names match case-insensitively, and a Python name in snake_case also
answers to its PascalCase/camelCase spelling: ``send_message`` is reached by
``SendMessage`` and ``sendMessage``. Arguments are converted and validated from
the type hints (msgspec): ``str``, ``int``, ``list[int]``, dataclasses,
``datetime``, ``bytes`` (base64 in JSON) and so on. A parameter hinted
``AsyncIterator[T]`` receives a client upload stream; an ``async def`` that
``yield``\\ s is a server-to-client stream.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from ..connections.application import Policy, check_policies
from .clients import HubCallerClients, HubClients
from .lifetime import check_group_name
from .presence import Presence

if TYPE_CHECKING:
    from .context import HubCallerContext
    from .lifetime import HubLifetimeManager

__all__ = ["GroupManager", "Hub", "HubContext", "HubMethod", "authorize", "check_policies", "hub_method"]

F = TypeVar("F", bound=Callable[..., Any])


_RESERVED = {"on_connected", "on_disconnected"}

log = logging.getLogger("hubwire.hub")


class GroupManager:
    """``self.groups``: add or remove any connection (local or remote) to or from a group."""

    __slots__ = ("_manager", "_max_name")

    def __init__(self, manager: HubLifetimeManager, max_name_length: int = 1024) -> None:
        self._manager = manager
        self._max_name = max_name_length

    async def add(self, connection_id: str, group: str) -> None:
        """Add a connection to a group; :class:`HubException` past the group limits."""
        check_group_name(group, self._max_name)
        await self._manager.add_to_group(connection_id, group)

    async def remove(self, connection_id: str, group: str) -> None:
        await self._manager.remove_from_group(connection_id, group)


class HubContext:
    """Send to a hub's clients from outside hub methods (HTTP handlers, background tasks).

    Get it with ``server.hub_context(ChatHub)``; it is valid for the process
    lifetime and works the same with or without a backplane. ``presence`` asks
    which connections a group or user has on every live instance.
    """

    __slots__ = ("clients", "groups", "manager", "presence")

    def __init__(self, manager: HubLifetimeManager, max_group_name_length: int = 1024) -> None:
        self.manager = manager
        self.clients = HubClients(manager)
        self.groups = GroupManager(manager, max_group_name_length)
        self.presence = Presence(manager)


class Hub:
    """Base class for hubs. Subclass it and add ``async def`` methods.

    Inside a method: ``self.context`` (caller, user, request, items),
    ``self.clients`` (targets to send to) and ``self.groups`` (membership).
    """

    context: HubCallerContext
    clients: HubCallerClients
    groups: GroupManager

    #: set by :func:`authorize` on the class: every connection must pass these
    __hub_authorization__: tuple[Policy, ...] | None = None

    #: what this hub calls on its clients, declared as a class (a ``typing.Protocol``) whose
    #: methods are named like hub methods (``post_published`` is sent as ``PostPublished``) and
    #: hinted like them; the result hint of one the server ``invoke``\ s is the client's result.
    #: ``hubwire typescript`` generates typed handlers from it; sends are not checked against it.
    client_methods: ClassVar[type | None] = None

    async def on_connected(self) -> None:
        """Called once per connection after the handshake (rejoin groups here after a reconnect)."""

    async def on_disconnected(self, exception: BaseException | None) -> None:
        """Called once when the connection ends; ``exception`` is set when it ended by an error."""


def hub_method(name: str | None = None) -> Callable[[F], F]:
    """Expose a method under an explicit client-visible ``name`` (still case-insensitive)."""

    def decorate(func: F) -> F:
        func.__hub_method_name__ = name  # type: ignore[attr-defined]
        return func

    return decorate


def authorize(*policies: Policy) -> Callable[[Any], Any]:
    """Require an authenticated user on a hub class or one method, plus optional policies.

    On a hub, unauthenticated negotiate and transport requests get ``401``.
    On a method, the caller gets ``Failed to invoke '<Target>' because user is
    unauthorized``. Each policy is ``(principal) -> bool`` (sync or async),
    e.g. ``lambda user: user is not None and user.has_role("admin")``.
    """

    def decorate(target: Any) -> Any:
        target.__hub_authorization__ = tuple(policies)
        return target

    return decorate


@dataclass(slots=True)
class Param:
    """One hub-method parameter: how to convert what the client sent into it."""

    name: str
    convert: Callable[[Any], Any] | None
    is_stream: bool
    has_default: bool
    #: the hint as logs and detailed errors name it
    type_name: str = "Any"


@dataclass(slots=True)
class HubMethod:
    """A hub method as dispatch sees it."""

    name: str
    func: Callable[..., Any]
    params: list[Param]
    is_streaming: bool
    policies: tuple[Policy, ...] | None

    @property
    def arg_params(self) -> list[Param]:
        return [p for p in self.params if not p.is_stream]

    @property
    def stream_params(self) -> list[Param]:
        return [p for p in self.params if p.is_stream]


def _converter(hint: Any) -> Callable[[Any], Any] | None:
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return None

    def convert(value: Any) -> Any:
        return msgspec.convert(value, hint)

    return convert


_STREAM_ORIGINS = {
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
}


def _stream_item_hint(hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint) or hint
    if origin in _STREAM_ORIGINS:
        args = typing.get_args(hint)
        return True, args[0] if args else Any
    return False, None


def discover_methods(hub_cls: type[Hub], *, custom_results: bool = False) -> dict[str, HubMethod]:
    """Map lower-cased client names to methods, checking for clashes and for hints msgspec cannot use.

    A mistake in a hub's definition would otherwise surface only when a client calls (every call
    failing with a generic binding error) or never (a sync method silently not callable), so it is
    refused or logged here, at ``add_hub``. ``custom_results``: an ``enc_hook`` may encode results
    of types msgspec does not know, so only parameters are held to msgspec's types.
    """
    table: dict[str, HubMethod] = {}
    seen: set[str] = set()
    hub_name = hub_cls.__name__
    for klass in hub_cls.__mro__:
        if klass is Hub or klass is object:
            continue
        for attr, func in vars(klass).items():
            if attr.startswith("_") or attr in _RESERVED or attr in seen:
                continue
            if not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)):
                if inspect.isfunction(func):
                    log.warning(
                        "hub %s: method %s is not 'async def', so clients cannot call it "
                        "(make it async to expose it, or name it _%s to keep it private)",
                        hub_name,
                        attr,
                        attr,
                    )
                continue
            seen.add(attr)
            method = _describe(getattr(hub_cls, attr), attr, f"hub {hub_name}, method {attr}", custom_results)
            explicit = getattr(func, "__hub_method_name__", None)
            keys = {explicit.lower()} if explicit else {attr.lower(), attr.replace("_", "").lower()}
            for key in keys:
                if key in table and table[key].func is not method.func:
                    raise TypeError(f"{hub_name}: hub methods {table[key].name!r} and {attr!r} clash")
                table[key] = method
    return table


def _type_name(hint: Any) -> str:
    if hint is inspect.Parameter.empty:
        return "Any"
    if typing.get_origin(hint) is None and isinstance(hint, type):
        return hint.__qualname__
    return repr(hint).replace("typing.", "").replace("collections.abc.", "")


def _what(name: str) -> str:
    return "return type" if name == "return" else f"parameter {name!r}"


def _hints(func: Callable[..., Any], where: str) -> dict[str, Any]:
    """The resolved hints of ``func``, or TypeError naming the one that does not resolve.

    A hint imported only under ``TYPE_CHECKING`` (or a class defined after the hub, or inside a
    function with postponed annotations) cannot be resolved at run time; treating it as ``Any``
    would let any value through unconverted, so it is refused instead.
    """
    try:
        return typing.get_type_hints(func)
    except Exception:  # find which one, below
        pass
    globalns = getattr(inspect.unwrap(func), "__globals__", {})
    for name, annotation in getattr(func, "__annotations__", {}).items():
        try:
            typing.get_type_hints(types.SimpleNamespace(__annotations__={name: annotation}), globalns)
        except Exception as exc:
            raise TypeError(
                f"{where}, {_what(name)}: the hint {annotation!r} cannot be resolved ({exc}); "
                "import it at run time (not under TYPE_CHECKING) at module level"
            ) from None
    return typing.get_type_hints(func)  # pragma: no cover - one of them failed above


def _custom_type(hint: Any) -> str | None:
    """The name of a type inside ``hint`` that msgspec has no conversion for, if any."""
    try:
        info = msgspec.inspect.type_info(hint)
    except Exception as exc:
        return f"{hint!r} ({exc})"
    pending: list[Any] = [info]
    visited: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType):
            if node.cls is not object:
                return getattr(node.cls, "__qualname__", repr(node.cls))
        elif isinstance(node, tuple | list):
            pending.extend(node)
        elif isinstance(node, msgspec.Struct):  # msgspec.inspect's types and fields
            pending.extend(getattr(node, field) for field in node.__struct_fields__)
    return None


def _check_hint(hint: Any, name: str, where: str, custom_ok: bool) -> None:
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return
    custom = _custom_type(hint)
    if custom is None:
        return
    if name == "return":
        if custom_ok:
            return
        raise TypeError(
            f"{where}, return type: hubwire cannot serialize {custom}; return a dataclass, msgspec "
            "Struct, TypedDict or a JSON-like type, or pass enc_hook= to HubServer"
        )
    raise TypeError(
        f"{where}, {_what(name)}: hubwire cannot convert arguments to {custom}; hint a dataclass, "
        "msgspec Struct, TypedDict or a JSON-like type (str, int, float, bool, list, dict, datetime, "
        "bytes, ...), or Any to take the value as decoded"
    )


def _describe(func: Callable[..., Any], attr: str, where: str, custom_results: bool) -> HubMethod:
    hints = _hints(func, where)
    sig = inspect.signature(func)
    params: list[Param] = []
    for p in list(sig.parameters.values())[1:]:  # skip self
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"{where}: only positional parameters are supported ({p.name})")
        hint = hints.get(p.name, inspect.Parameter.empty)
        if hint is inspect.Parameter.empty:
            log.warning(
                "%s: parameter %r has no type hint, so clients may send any value (hint Any to say so)",
                where,
                p.name,
            )
        is_stream, item_hint = _stream_item_hint(hint)
        _check_hint(item_hint if is_stream else hint, p.name, where, custom_ok=False)
        params.append(
            Param(
                p.name,
                _converter(item_hint if is_stream else hint),
                is_stream,
                p.default is not inspect.Parameter.empty,
                _type_name(item_hint if is_stream else hint),
            )
        )
    ret = hints.get("return", inspect.Parameter.empty)
    returns_stream, ret_item = _stream_item_hint(ret)
    streaming = inspect.isasyncgenfunction(func) or returns_stream
    if returns_stream or not streaming:  # an async generator's hint is checked only in its usual forms
        _check_hint(ret_item if returns_stream else ret, "return", where, custom_results)
    name = getattr(func, "__hub_method_name__", None) or attr
    return HubMethod(name, func, params, streaming, getattr(func, "__hub_authorization__", None))
