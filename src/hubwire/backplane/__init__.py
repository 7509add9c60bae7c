"""Backplanes: how hubs on several instances reach each other's clients (Redis pub/sub)."""

from .bus import BusStats, RedisBus
from .redis import RedisBackplane, RedisHubLifetimeManager

__all__ = ["BusStats", "RedisBackplane", "RedisBus", "RedisHubLifetimeManager"]
