"""A griffe extension for the API reference: Sphinx roles in hubwire's docstrings become Markdown code.

The docstrings are written for reading in the source and in ``help()``, with reST roles such as
``:class:`~hubwire.auth.JwtBearerAuthenticator``` and ``:meth:`query_param```. mkdocstrings renders
docstrings as Markdown, where a role would show as the literal ``:class:`` followed by code; this turns
each into plain code (the last dotted part when the target starts with ``~``, as Sphinx shows it).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):`(~?)([^`]+)`")


def strip_roles(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```; ``:func:`a.b``` -> ```a.b```."""

    def code(match: re.Match[str]) -> str:
        target = match.group(2)
        return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"

    return _ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    """Rewrites every loaded object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
