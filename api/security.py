"""Who is calling (API keys) and how often (rate limits).

A key arrives as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Lookups are cached for a few seconds,
so polling costs no database query per request; a revoked key stops working within `key_cache_s`.
Things another owner may not see answer 404, exactly as if they did not exist, so ids do not leak.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from store.auth import hash_key, owner_of
from store.db import session_scope
from store.settings import get_settings


@dataclass(frozen=True)
class Caller:
    owner: str | None  # None: anonymous (sees public things only)
    client: str  # the rate limiter's bucket: the key's hash, else the client address


_key_cache: dict[str, tuple[str | None, float]] = {}
_key_lock = threading.Lock()


_UNKNOWN = object()


def _cached_owner(key: str):
    with _key_lock:
        hit = _key_cache.get(hash_key(key))
    if hit is not None and time.monotonic() - hit[1] < get_settings().key_cache_s:
        return hit[0]
    return _UNKNOWN


def _lookup(key: str) -> str | None:
    settings = get_settings()
    digest = hash_key(key)
    now = time.monotonic()
    with session_scope(settings.resolved_database_url()) as db:
        owner = owner_of(db, key)
    with _key_lock:
        if len(_key_cache) > 10000:
            _key_cache.clear()
        _key_cache[digest] = (owner, now)
    return owner


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


class RateLimiter:
    """Token buckets per client, refilled at `rate` per second up to `burst`."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        s = get_settings()
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(s.rate_limit_burst), now))
            tokens = min(float(s.rate_limit_burst), tokens + (now - last) * s.rate_limit_per_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return (1.0 - tokens) / s.rate_limit_per_s
            if len(self._buckets) > 100000:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0


limiter = RateLimiter()


async def optional_caller(request: Request) -> Caller:
    # async, with the cached key as the fast path: a poll should not need a thread or a query to authenticate.
    key = _presented_key(request)
    if key:
        owner = _cached_owner(key)
        if owner is _UNKNOWN:
            owner = await run_in_threadpool(_lookup, key)
        if owner is None:
            raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        caller = Caller(owner, "key:" + hash_key(key))
    else:
        caller = Caller(None, "addr:" + (request.client.host if request.client else "unknown"))
    wait = limiter.take(caller.client)
    if wait > 0:
        s = get_settings()
        raise HTTPException(429, f"rate limit exceeded: {s.rate_limit_per_s:g} requests/s "
                                 f"(burst {s.rate_limit_burst}) per API key; retry in {wait:.2f} s",
                            headers={"Retry-After": str(max(1, round(wait + 0.5)))})
    return caller


async def caller(c: Caller = Depends(optional_caller)) -> Caller:
    if c.owner is None:
        raise HTTPException(401, "an API key is required: send `Authorization: Bearer <key>` "
                                 "(keys come from `bitsearch-admin create-key OWNER`)",
                            headers={"WWW-Authenticate": "Bearer"})
    return c
