"""The shared verdict cache on Redis (``[scan] cache_backend = "redis"``).

Several gateways (and the ``[serve] workers`` of each) share the verdicts they computed: a
mass mailing of one attachment spread over ten gateways reaches the engines once. In each
process the in-memory :class:`~avgate.scan.VerdictCache` stays in front (no round trip for an
object seen here) together with its in-process single flight; :class:`RedisVerdictCache` is
asked only by the one scan of a key in flight in the process.

- Key: ``avgate:verdict:v1:<sha256>:<digest of the engine DB versions and the scan
  settings>`` — a signature update changes the versions, so old verdicts are simply never
  asked for again, and gateways whose ``[scan] mode`` or ``[limits]`` differ never share a
  verdict; every entry has a TTL (``cache_ttl``), and the server's ``maxmemory`` with an
  LRU/LFU eviction policy bounds the size.
- Only ``clean`` and ``infected`` verdicts are shared: ``error`` says nothing about the bytes,
  and ``skipped``/``unknown`` depend on the limits of the gateway that scanned (another may
  have higher ones).
- Single flight across gateways: the first to miss takes a lock key (``SET NX`` with an
  expiry of the scan timeout, through redis-py's :class:`~redis.asyncio.lock.Lock`), scans and
  stores the verdict before it releases the lock; the others poll the verdict and the lock
  (one ``MGET`` per poll) until the verdict appears, the lock goes without a verdict (the
  owner's scan failed), or ``cache_wait`` passes — then they scan themselves.
- Redis unreachable, slow or answering garbage: the object is scanned here as if there were no
  shared cache (the local cache still works), one warning goes to stderr, and Redis is left
  alone for ``RETRY_AFTER`` seconds before it is tried again (a recovery is said too). A
  message never fails because of the cache.

Whoever can write to this Redis can make the gateways believe a file is clean: give it the
trust of the gateways themselves (a private network, ``requirepass``/ACLs, ``rediss://``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .result import EngineInfo, Finding, LimitKind, ScanResult, ScanStatus

SHARED = frozenset({ScanStatus.CLEAN, ScanStatus.INFECTED})  # what other gateways may reuse
KEY_PREFIX = "avgate:verdict:v1:"
POLL_INTERVAL = 0.02  # seconds between a waiter's looks at the verdict and the lock
RETRY_AFTER = 5.0  # seconds Redis is left alone after a failure
SOCKET_TIMEOUT = 1.0  # seconds for one Redis command (a slow Redis costs at most this)


class BadEntry(ValueError):
    """A cached value that is not a verdict this version wrote."""


def encode(result: ScanResult) -> bytes:
    """A verdict as stored in Redis (JSON; times and the cached flag left out)."""
    return json.dumps({
        "status": result.status.value,
        "findings": [f.to_dict() for f in result.findings],
        "reason": result.reason,
        "sha256": result.sha256,
        "size": result.size,
        "engines": [e.to_dict() for e in result.engines],
        "limit": result.limit.value if result.limit else None,
    }, separators=(",", ":")).encode()


def decode(raw: bytes) -> ScanResult:
    """The verdict :func:`encode` wrote; BadEntry for anything else (a shared store may hold
    junk: it is a miss, never a verdict)."""
    try:
        d = json.loads(raw)
        status = ScanStatus(d["status"])
        if status not in SHARED:
            raise BadEntry(f"status {status.value} is never shared")
        findings = tuple(Finding(_s(f["name"]), _s(f["engine"]), _s(f["part"]))
                         for f in _list(d["findings"]))
        if (status is ScanStatus.INFECTED) != bool(findings):
            raise BadEntry("findings do not match the status")
        engines = tuple(EngineInfo(_s(e["name"]), _s(e["version"]))
                        for e in _list(d["engines"]))
        size = d["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadEntry("bad size")
        limit = LimitKind(d["limit"]) if d["limit"] is not None else None
        return ScanResult(status, findings=findings, reason=_s(d["reason"]),
                          sha256=_s(d["sha256"]), size=size, engines=engines, limit=limit)
    except BadEntry:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BadEntry(f"not a verdict: {exc}") from exc


def _s(value: Any) -> str:
    if not isinstance(value, str):
        raise BadEntry(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise BadEntry(f"expected a list, got {type(value).__name__}")
    return value


def redis_key(key: tuple[str, str], namespace: str = "") -> str:
    """The Redis key of a (sha256, DB versions) cache key, for gateways scanning with the
    settings ``namespace`` describes."""
    sha256, versions = key
    scope = hashlib.sha256(f"{namespace}\0{versions}".encode()).hexdigest()[:32]
    return KEY_PREFIX + sha256 + ":" + scope


class RedisVerdictCache:
    """Verdicts shared through Redis, with single flight across gateways (module doc)."""

    def __init__(self, url: str, *, ttl: float = 86400.0, wait: float = 30.0,
                 lock_timeout: float = 130.0, namespace: str = "", client: Any = None
                 ) -> None:
        import redis.asyncio

        self.url = url
        self.ttl = ttl
        self.wait = wait
        self.lock_timeout = lock_timeout
        self.namespace = namespace  # the scan settings verdicts depend on (redis_key)
        self._client: Any = client if client is not None else redis.asyncio.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
            retry_on_timeout=False)
        self._down_until = 0.0
        self._warned = False
        #: counters (tests, metrics): verdicts found, scans done here, waits on another
        self.hits = 0
        self.scans = 0
        self.waits = 0
        self.failures = 0

    async def close(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass

    # -- health ---------------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + RETRY_AFTER
        if not self._warned:
            self._warned = True
            _warn(f"shared verdict cache {_safe_url(self.url)} unavailable ({exc!r}): "
                  "scanning with the local cache only; retrying every "
                  f"{RETRY_AFTER:g} s")

    def _ok(self) -> None:
        if self._warned:
            self._warned = False
            _warn(f"shared verdict cache {_safe_url(self.url)} is back")

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    # -- the one entry point --------------------------------------------------------------
    async def scan_once(self, key: tuple[str, str],
                        scan: Callable[[], Awaitable[ScanResult]]) -> ScanResult:
        """The verdict for ``key``: from Redis, from another gateway's scan in flight, or
        from ``scan()`` here (stored for the others when it is clean or infected)."""
        from redis.exceptions import LockError, RedisError

        if not self.available:
            return await self._scan_here(scan)
        name = redis_key(key, self.namespace)
        lock_name = name + ":lock"
        try:
            hit = await self._client.get(name)
            if hit is not None and (result := self._decode(hit)) is not None:
                self._ok()
                self.hits += 1
                return result.with_(cached=True)
            lock = self._client.lock(lock_name, timeout=self.lock_timeout, blocking=False)
            owner = await lock.acquire()
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return await self._scan_here(scan)
        if owner:
            try:
                result = await self._scan_here(scan)
                if result.status in SHARED:
                    try:
                        await self._client.set(name, encode(result), ex=max(1, int(self.ttl)))
                    except (RedisError, OSError) as exc:
                        self._failed(exc)
                return result
            finally:
                try:
                    await asyncio.shield(lock.release())
                except (LockError, RedisError, OSError):
                    pass  # expired (a very long scan) or Redis gone: it expires by itself
        return await self._wait_for(name, lock_name, scan)

    async def _wait_for(self, name: str, lock_name: str,
                        scan: Callable[[], Awaitable[ScanResult]]) -> ScanResult:
        """Another gateway is scanning ``name``: poll until its verdict or the end of its
        lock, at most ``wait`` seconds, then scan here."""
        from redis.exceptions import RedisError

        self.waits += 1
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                verdict, locked = await self._client.mget(name, lock_name)
            except (RedisError, OSError) as exc:
                self._failed(exc)
                break
            if verdict is not None and (result := self._decode(verdict)) is not None:
                self.hits += 1
                return result.with_(cached=True)
            if locked is None:
                break  # the owner finished without a shareable verdict, or died
        return await self._scan_here(scan)

    async def _scan_here(self, scan: Callable[[], Awaitable[ScanResult]]) -> ScanResult:
        self.scans += 1
        return await scan()

    def _decode(self, raw: bytes) -> ScanResult | None:
        try:
            return decode(raw)
        except BadEntry as exc:
            _warn(f"shared verdict cache: ignoring a bad entry ({exc})")
            return None


def _safe_url(url: str) -> str:
    """The URL without its password (for messages)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _warn(text: str) -> None:
    print(f"avgate: cache: WARNING: {text}", file=sys.stderr, flush=True)


__all__ = ["SHARED", "BadEntry", "RedisVerdictCache", "decode", "encode", "redis_key"]
