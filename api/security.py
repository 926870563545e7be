"""Who is calling (API keys) and how often (rate limits), decided before a request's body is read.

A key arrives as `Authorization: Bearer <key>` or `X-API-Key: <key>`. `KeyGate`, an ASGI middleware in front of
the routes, authenticates it from the headers alone: a request that needs a key and has none, or has an invalid
one, gets its 401 without the body being read (a stranger's 100 MB upload is never parsed or spooled to disk).
Lookups are cached for a few seconds, so polling costs no database query per request; a revoked key stops
working within `key_cache_s`. Failed lookups are rate-limited per client address, so guessing keys costs the
guesser time and the database nothing. Things another owner may not see answer 404, exactly as if they did not
exist, so ids do not leak.
"""

from __future__ import annotations

import json
import re
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


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


class RateLimiter:
    """Token buckets per client, refilled at `rate` per second up to `burst`."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str, rate: float, burst: int, cost: float = 1.0) -> float:
        """0 when the request may go ahead (taking `cost` tokens), else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens < cost:
                self._buckets[client] = (tokens, now)
                return (cost - tokens) / rate
            if len(self._buckets) > 100000:
                self._buckets.clear()
            self._buckets[client] = (tokens - cost, now)
            return 0.0

    def wait(self, client: str, rate: float, burst: int) -> float:
        """Like take(), without taking: the seconds until one token is there."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate


limiter = RateLimiter()  # every request with a key (per key) or without (per address)
failures = RateLimiter()  # requests with a key that is not valid, per address

# Paths anyone may fetch without a key or a rate limit: the pages (their data comes from the API with the key),
# the health check and the API's own documentation.
_PUBLIC = re.compile(
    r"^/(?:health|leaderboard|leaderboard/jobs/[^/]+|static/(?:docs/)?[^/]+|docs|docs/oauth2-redirect|redoc"
    r"|openapi\.json)?/?$"
)
_READS = {"GET", "HEAD", "OPTIONS"}


class _Refusal(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


class KeyGate:
    """Authenticates and rate-limits from the headers, before the route (or anything) reads the body.

    Routes that change something (every method but GET/HEAD/OPTIONS) need a valid key; reads may be anonymous
    (public jobs, the public leaderboard) but a key that is sent must be valid. The outcome is left in the scope
    for the `caller`/`optional_caller` dependencies.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _PUBLIC.match(scope["path"]):
            return await self.app(scope, receive, send)
        try:
            who = await self._caller(scope)
        except _Refusal as r:
            return await _refuse(scope, send, r)
        scope.setdefault("state", {})["caller"] = who
        await self.app(scope, receive, send)

    async def _caller(self, scope) -> Caller:
        s = get_settings()
        headers = dict(scope.get("headers") or [])
        address = "addr:" + (scope["client"][0] if scope.get("client") else "unknown")
        key = presented_key(headers)
        if key is None:
            if scope["method"] not in _READS:
                raise _Refusal(
                    401,
                    "an API key is required: send `Authorization: Bearer <key>` (keys come from "
                    "`bitsearch-admin create-key OWNER`)",
                    {"WWW-Authenticate": "Bearer"},
                )
            who = Caller(None, address)
        else:
            owner = _cached_owner(key)
            if owner is _UNKNOWN or owner is None:
                # Checked before the lookup: an address that keeps sending bad keys costs no query at all.
                wait = failures.wait(address, s.auth_failures_per_s, s.auth_failures_burst)
                if wait > 0:
                    raise _Refusal(
                        429,
                        f"too many requests with an invalid API key from this address; retry in {wait:.0f} s",
                        {"Retry-After": str(max(1, round(wait + 0.5)))},
                    )
                if owner is _UNKNOWN:
                    owner = await run_in_threadpool(_lookup, key)
            if owner is None:
                failures.take(address, s.auth_failures_per_s, s.auth_failures_burst)
                raise _Refusal(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
            who = Caller(owner, "key:" + hash_key(key))
        wait = limiter.take(who.client, s.rate_limit_per_s, s.rate_limit_burst)
        if wait > 0:
            raise _Refusal(
                429,
                f"rate limit exceeded: {s.rate_limit_per_s:g} requests/s (burst "
                f"{s.rate_limit_burst}) per API key; retry in {wait:.2f} s",
                {"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        return who


async def _refuse(scope, send, r: _Refusal) -> None:
    body = json.dumps({"detail": r.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in r.headers.items()]
    request_headers = dict(scope.get("headers") or [])
    if request_headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in request_headers:
        # The body is left unread; closing the connection after the answer stops the client sending the rest.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": r.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def optional_caller(request: Request) -> Caller:
    who = request.scope.get("state", {}).get("caller")
    if who is None:  # a route KeyGate treats as public asked for a caller: it gets an anonymous one
        return Caller(None, "addr:" + (request.client.host if request.client else "unknown"))
    return who


async def caller(c: Caller = Depends(optional_caller)) -> Caller:
    if c.owner is None:
        raise HTTPException(
            401,
            "an API key is required: send `Authorization: Bearer <key>` "
            "(keys come from `bitsearch-admin create-key OWNER`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return c
