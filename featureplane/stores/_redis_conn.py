"""One Redis connection as the store and the cache tier use it.

It owns the client (or borrows one passed in), loads the Lua scripts of
`_redis_lua`, runs script calls with the one NOSCRIPT reload-and-retry, and
translates redis-py and socket errors into `StoreError` /
`TransientStoreError`. Used before `start()` or after `aclose()` it raises
`NotStartedError`.

With `cluster=True` the client is redis-py's `RedisCluster`, which finds the
nodes from the URL's node (CLUSTER SLOTS), routes each command (a script call
by its first key) to the primary of its slot, sends a pipeline to every node
at once, follows MOVED/ASK, waits out TRYAGAIN, and on a lost node or
CLUSTERDOWN reloads the slot map and retries (`CLUSTER_RETRIES` times) before
raising; whatever it raises is a `TransientStoreError` here. SCRIPT LOAD goes
to every primary, so the NOSCRIPT reload also covers a replica promoted by a
failover.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot

from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.stores import _redis_lua as lua
from featureplane.stores.redis_layout import Call

__all__ = ["CLUSTER_RETRIES", "Client", "RedisConnection", "c_packing", "first_error", "translated"]

Client = aioredis.Redis | RedisCluster
"""A standalone or a cluster client (both have the commands and `pipeline` used here)."""

CLUSTER_RETRIES = 3
"""Times the cluster client reloads the slot map and retries after a lost node, a timeout
or CLUSTERDOWN. Each retry of a pipeline sleeps 0.25 s (redis-py's fixed pause): with a
master down a call gave up in 0.85 s here (tests/integration/test_redis_cluster.py), where
redis-py's default (10) would hold every ingestion batch ~3 s."""

_TRANSIENT: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (a replica still loading its data)
    rx.TimeoutError,
    rx.TryAgainError,
    rx.ClusterError,  # CLUSTERDOWN, MASTERDOWN, redirections exhausted
    rx.AskError,  # and MOVED: a redirection redis-py could not follow
    rx.RedisClusterException,  # no node reachable, slots not covered, the map in flux
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
        if isinstance(exc.__cause__, _PERMANENT):  # the cluster client wraps a refused AUTH
            raise StoreError(f"redis {what} failed: {exc}") from exc
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
        self, url: str, client: Client | None = None, owner: str = "Redis", cluster: bool = False
    ) -> None:
        """`client`: use this one (it stays open on `aclose`) instead of connecting to `url`;
        `owner` names the user in errors; `cluster`: `url` is a node of a Redis Cluster."""
        self.url = url
        self.owner = owner
        self.cluster = cluster or isinstance(client, RedisCluster)
        self._given = client
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The client; `NotStartedError` before `start()` or after `aclose()`."""
        if self._client is None:
            raise NotStartedError(self.owner)
        return self._client

    async def start(self) -> None:
        if self._client is not None:
            return
        if self._given is not None:
            self._client = self._given
        elif self.cluster:
            self._client = _cluster_client(self.url, self.owner)
        else:
            self._client = _standalone_client(self.url)
        try:
            if _kwargs(self._client).get("decode_responses"):
                raise StoreError(f"{self.owner} needs a client with decode_responses=False")
            if isinstance(self._client, RedisCluster):
                with translated("connect"):
                    await self._client.initialize()
            else:
                await self._refuse_a_cluster_node(self._client)
            await self.load_scripts()
        except BaseException:
            await self.aclose()
            raise

    async def _refuse_a_cluster_node(self, client: aioredis.Redis) -> None:
        """A standalone client on a cluster node would get MOVED for most keys: say so now."""
        with translated("connect"):
            try:
                info = await client.info("cluster")
            except rx.ResponseError:  # INFO renamed or denied: nothing to learn from it
                return
        if str(info.get("cluster_enabled", 0)) == "1":
            raise StoreError(
                f"redis at {self.where()} is a Redis Cluster node: set "
                "FEATUREPLANE_REDIS_CLUSTER=true (ElastiCache: the configuration endpoint)"
            )

    async def aclose(self) -> None:
        """Close the client if this connection created it; a client passed in stays open."""
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            await client.aclose()

    async def ping(self) -> None:
        """PING the server; under a cluster every primary, so a lost master shows."""
        client = self.client
        try:
            if isinstance(client, RedisCluster):
                await client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await client.ping()
        except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
            raise TransientStoreError(f"redis at {self.where()} does not answer: {exc}") from exc

    def where(self) -> str:
        client = self.client
        if isinstance(client, RedisCluster):
            nodes = sorted(node.name for node in client.get_primaries())
            return "cluster " + (",".join(nodes) or _host_port(_kwargs(client)))
        return _host_port(_kwargs(client))

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


def _kwargs(client: Client) -> Mapping[str, Any]:
    """The keyword arguments the client builds its connections with."""
    if isinstance(client, RedisCluster):
        return client.get_connection_kwargs()
    return client.connection_pool.connection_kwargs


def _host_port(kw: Mapping[str, Any]) -> str:
    return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"


# Querystring options in the URL (socket_timeout=...) win over the defaults below.


def _standalone_client(url: str) -> aioredis.Redis:
    pool = aioredis.ConnectionPool.from_url(
        url, decode_responses=False, socket_timeout=5.0, socket_connect_timeout=5.0
    )
    pool.connection_class = c_packing(pool.connection_class, pool.connection_kwargs)
    return aioredis.Redis(connection_pool=pool)


def _cluster_client(url: str, owner: str) -> RedisCluster:
    """A `RedisCluster` from a node's URL (rediss:// = TLS, user and password = AUTH), with
    the standalone pool's timeouts and C packer, not yet connected."""
    try:
        client = RedisCluster.from_url(
            url,
            decode_responses=False,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            # Per node; redis-py's default (100) raises MaxConnectionsError past it, which a
            # pipeline takes for a lost node (it drops every connection). The standalone
            # pool has no bound either.
            max_connections=2**31,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), CLUSTER_RETRIES),
        )
    except (rx.RedisClusterException, ValueError, TypeError) as exc:  # TypeError: an unknown option
        raise StoreError(f"{owner}: bad Redis Cluster URL: {exc}") from exc
    # Every node's connections are built from these kwargs (the client hands the same dict
    # to the nodes it discovers), so the C packer set here reaches them all.
    kwargs = client.get_connection_kwargs()
    base: type[aioredis.connection.AbstractConnection] = kwargs["connection_class"]  # type: ignore[assignment]
    kwargs["connection_class"] = c_packing(base, kwargs)
    return client


async def _send(client: Client, calls: Sequence[Call], markers: Markers) -> list[Any]:
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
        # Queued as a raw command: redis-py's cluster pipeline refuses its `evalsha` method
        # (a block list kept from an older cluster client, lifted upstream since), while
        # its router sends EVALSHA to the primary of its first key's slot like any command.
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
    for key, ttl in markers:
        pipe.set(key, b"", px=max(1, ttl))
    return list(await pipe.execute(raise_on_error=False))
