"""Transports: move a connection's bytes over WebSockets (SSE and long polling to come)."""
