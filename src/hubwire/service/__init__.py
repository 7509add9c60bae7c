"""hubwire's connection service: service nodes hold the client connections, app servers run hubs.

:mod:`~hubwire.service.node` is the node's side of the app-server links and of the client
connections it holds; :mod:`~hubwire.service.applink` the app server's side (its links, the
connections they carry, a lifetime manager that sends through the service);
:mod:`~hubwire.service.tokens` the tokens both sides and the clients carry;
:mod:`~hubwire.service.rest` the serverless REST API (send and manage groups with no app
server). The frames are in :mod:`hubwire.protocol.service`.
"""
