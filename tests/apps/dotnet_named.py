"""The scale-out hub under a .NET-style full type name, as when sharing one Redis with ASP.NET Core.

``add_hub(..., name="BlogApp.Hubs.ChatHub")``: the backplane channels are named after it
(``{prefix}BlogApp.Hubs.ChatHub:all`` ...), exactly as a .NET server names those of its
``BlogApp.Hubs.ChatHub``. Run: ``hubwire run tests.apps.dotnet_named:app --redis URL --channel-prefix X``.
"""

from __future__ import annotations

from hubwire import HubServer
from tests.apps.scaleout import ScaleHub, authenticate

NAME = "BlogApp.Hubs.ChatHub"

server = HubServer(authenticator=authenticate)
server.add_hub("/hub", ScaleHub, name=NAME)
app = server
