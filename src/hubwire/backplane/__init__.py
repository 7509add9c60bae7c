"""Backplanes: how hubs on several instances reach each other's clients (Redis pub/sub)."""

from .base import Backplane, InMemoryBackplane
from .bus import BusStats, RedisBus
from .redis import RedisBackplane, RedisHubLifetimeManager

__all__ = [
    "Backplane",
    "BusStats",
    "InMemoryBackplane",
    "RedisBackplane",
    "RedisBus",
    "RedisHubLifetimeManager",
]
