"""One Redis connection as the store and the cache tier use it.

It owns the client (or borrows one passed in), loads the Lua scripts of
`_redis_lua`, runs script calls with the one NOSCRIPT reload-and-retry, and
translates redis-py and socket errors into `StoreError` /
`TransientStoreError`. Used before `start()` or after `aclose()` it raises
`NotStartedError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.stores import _redis_lua as lua
from featureplane.stores.redis_layout import Call

__all__ = ["RedisConnection", "c_packing", "first_error", "translated"]

_TRANSIENT: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (a replica still loading its data)
    rx.TimeoutError,
    rx.TryAgainError,
    rx.MasterDownError,
    rx.ReadOnlyError,  # writing to a replica mid-failover
    OSError,  # sockets and builtin TimeoutError, should one slip past redis-py
)
_PERMANENT: tuple[type[BaseException], ...] = (
    rx.AuthenticationError,  # subclasses of ConnectionError that retrying will not fix
    rx.AuthorizationError,
)

Markers = Sequence[tuple[bytes, int]]
"""Negative markers to SET with a time to live: (key, ttl ms)."""


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Redis and socket errors -> StoreError / TransientStoreError."""
    try:
        yield
    except _PERMANENT as exc:
        raise StoreError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
    except _TRANSIENT as exc:
        raise TransientStoreError(f"redis {what} failed, may succeed if retried: {exc}") from exc
    except rx.RedisError as exc:
        raise StoreError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


def first_error(results: Sequence[Any], what: str) -> None:
    """Raise the first exception among pipeline `results`, translated."""
    for res in results:
        if isinstance(res, Exception):
            with translated(what):
                raise res


def c_packing(
    cls: type[aioredis.connection.AbstractConnection], kwargs: Mapping[str, Any]
) -> type[aioredis.connection.AbstractConnection]:
    """`cls` packing commands with hiredis's C packer, when text is UTF-8.

    redis-py's asyncio connections pack in Python, re-joining a growing buffer per
    argument (~2 us an argument); a write-through call has thousands of arguments, and
    packing was about half of `write_through`'s CPU. hiredis packs the same bytes (checked
    by tests/unit/test_redis_layout.py); anything it refuses goes the Python way.
    """
    encoding = str(kwargs.get("encoding", "utf-8")).lower().replace("_", "-")
    if encoding not in ("utf-8", "utf8") or kwargs.get("encoding_errors", "strict") != "strict":
        return cls
    packer: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command

    class Packed(cls):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif b" " in first:
                args = (*first.split(), *args[1:])
            try:
                return [packer(args)]
            except TypeError:  # a type hiredis does not pack: redis-py's error
                return list(super().pack_command(*args))

    Packed.__name__ = Packed.__qualname__ = f"CPacked{cls.__name__}"
    return Packed


class RedisConnection:
    """A started-or-not redis-py client with the featureplane scripts loaded."""

    def __init__(
        self, url: str, client: aioredis.Redis | None = None, owner: str = "Redis"
    ) -> None:
        """`client`: use this one (it stays open on `aclose`) instead of connecting to `url`;
        `owner` names the user in errors."""
        self.url = url
        self.owner = owner
        self._given = client
        self._client: aioredis.Redis | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The client; `NotStartedError` before `start()` or after `aclose()`."""
        if self._client is None:
            raise NotStartedError(self.owner)
        return self._client

    async def start(self) -> None:
        if self._client is not None:
            return
        # Querystring options in `url` (socket_timeout=...) win over these defaults.
        if self._given is not None:
            self._client = self._given
        else:
            pool = aioredis.ConnectionPool.from_url(
                self.url, decode_responses=False, socket_timeout=5.0, socket_connect_timeout=5.0
            )
            pool.connection_class = c_packing(pool.connection_class, pool.connection_kwargs)
            self._client = aioredis.Redis(connection_pool=pool)
        try:
            if self._client.connection_pool.connection_kwargs.get("decode_responses"):
                raise StoreError(f"{self.owner} needs a client with decode_responses=False")
            await self.load_scripts()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the client if this connection created it; a client passed in stays open."""
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            await client.aclose()

    async def ping(self) -> None:
        client = self.client
        try:
            await client.ping()
        except (rx.RedisError, OSError) as exc:
            raise TransientStoreError(f"redis at {self.where()} does not answer: {exc}") from exc

    def where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    def slot_of(self) -> Callable[[bytes], int] | None:
        """Hash slot of a key when the client is a cluster client, else None."""
        return key_slot if isinstance(self.client, RedisCluster) else None

    async def load_scripts(self) -> None:
        client = self.client
        with translated("script load"):
            for script, sha in lua.SCRIPTS:
                if str(await client.script_load(script)) != sha:
                    raise StoreError("redis returned an unexpected SHA1 for a loaded script")

    async def run(self, calls: Sequence[Call], what: str, markers: Markers = ()) -> list[Any]:
        """Run script `calls` (and SET `markers`) in one round trip; the calls' replies.

        NOSCRIPT (after a restart or SCRIPT FLUSH) reloads the scripts and reruns only
        those calls, which is safe because every script call is idempotent.
        """
        if not calls and not markers:
            return []
        client = self.client
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            with translated(what):
                got = await _send(client, [calls[i] for i in pending], markers)
            first_error([r for r in got if not isinstance(r, rx.NoScriptError)], what)
            missing = []
            for i, reply in zip(pending, got, strict=False):
                replies[i] = reply
                if isinstance(reply, rx.NoScriptError):
                    missing.append(i)
            if not missing:
                return replies
            if attempt == 0:
                await self.load_scripts()
                pending, markers = missing, ()
        raise StoreError(f"redis {what} failed: scripts missing after reloading them")


async def _send(client: aioredis.Redis, calls: Sequence[Call], markers: Markers) -> list[Any]:
    """One round trip: a lone script call directly (a pipeline costs more CPU), else one
    non-transactional pipeline. NOSCRIPT comes back as a reply, other errors raise."""
    if len(calls) == 1 and not markers:
        sha, keys, args = calls[0]
        try:
            return [await client.evalsha(sha, len(keys), *keys, *args)]
        except rx.NoScriptError as exc:
            return [exc]
    pipe = client.pipeline(transaction=False)
    for sha, keys, args in calls:
        pipe.evalsha(sha, len(keys), *keys, *args)
    for key, ttl in markers:
        pipe.set(key, b"", px=max(1, ttl))
    return list(await pipe.execute(raise_on_error=False))
