"""Logging: secrets never reach the log, and records can be written as JSON lines.

Connection tokens travel in the ``id`` query parameter of every transport
request (and JWTs in ``access_token`` for WebSockets and SSE), so a server's
access log would record them. :func:`install_redaction` (done by
``HubServer.startup``) adds a filter to the access and error loggers of
uvicorn, hypercorn and gunicorn (under their default names) that replaces
those values with ``[redacted]``; a server logging under other names needs the
filter (:class:`RedactSecrets`) added to them. hubwire's own log records name connections by
their public id only, and carry it as ``record.connection_id`` (with
``record.event``) for structured logging; :class:`JsonFormatter` writes them
as one JSON object per line (``hubwire run --log-format json``).

Note: with negotiate version 0 (the Python clients) the connection id *is*
the token, as in ASP.NET Core; only negotiate v1 clients get a separate
secret token.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

__all__ = ["JsonFormatter", "RedactSecrets", "install_redaction", "redact"]

_SECRET_PARAMS = re.compile(r"((?:^|[?&;\s])(?:id|access_token)=)[^&\s\"']+", re.IGNORECASE)
#: the access and error loggers of the ASGI servers hubwire runs under (their default names)
_LOGGERS = (
    "uvicorn.access",
    "uvicorn.error",
    "uvicorn",
    "hypercorn.access",
    "hypercorn.error",
    "gunicorn.access",
    "gunicorn.error",
)


def redact(text: str) -> str:
    """``text`` with the values of ``id=`` and ``access_token=`` query parameters replaced."""
    if "=" not in text:
        return text
    return _SECRET_PARAMS.sub(r"\1[redacted]", text)


#: uvicorn messages about a client's bad input that it logs with a traceback; they say nothing about
#: the server, and a traceback per hostile client would flood the log: logged as a one-line warning
_CLIENT_ERRORS = frozenset({"Invalid UTF-8 sequence received from client."})


class RedactSecrets(logging.Filter):
    """Rewrites a record's message arguments (and message) so no token is logged.

    Also turns uvicorn's tracebacks for a client's invalid input (``_CLIENT_ERRORS``)
    into one-line warnings.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in _CLIENT_ERRORS and record.exc_info:
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args.items()}
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


_filter = RedactSecrets()


def install_redaction() -> None:
    """Add the redaction filter to uvicorn's loggers (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, connection id and event if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ("connection_id", "event"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
