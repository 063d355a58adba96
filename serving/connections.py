"""Connection-level defences: a cap on open connections, a deadline for request heads,
aiohttp's own protocol errors answered in the contract's JSON shape, and one summary log
line per kind of hostile event instead of one line (and traceback) per event.

aiohttp (3.14) has no header-read timeout of its own. Its one connection timer is the
keep-alive timer: armed when a connection opens and again after each answer, it closes
the connection if it fires while the connection still waits for a complete request head
(`RequestHandler._process_keepalive`). So `keepalive_timeout` *is* the head deadline: a
client has `header_timeout` from opening, or from its previous answer, to send its
headers, and an idle keep-alive connection is closed after the same time. Bodies are read
within `body_timeout` where they are read (`serving.app`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, cast

import orjson
from aiohttp import web

from featureplane.errors import quote
from featureplane.serving.api import ApiError
from featureplane.serving.app import SERVER
from featureplane.serving.config import ServeConfig
from featureplane.serving.logs import RateLimitedLog
from featureplane.serving.metrics import Metrics

__all__ = ["ConnectionGuard", "fit_to_fd_limit"]

log = logging.getLogger(__name__)

# After an early answer (413, 408) aiohttp reads and drops the rest of the body for up to
# this long, so a client still sending reads our answer instead of a reset; 2 s is ample
# for the rest of a 1 MiB body on any live link, and short for one that trickles.
_LINGER = 2.0
# File descriptors kept for everything but client connections: the store's files, Redis
# and DynamoDB pools, the listening socket, logs.
_FD_RESERVE = 256
_REFUSED_BODY = orjson.dumps(
    {"error": {"code": "too_many_connections", "message": "server at its connection limit; retry"}}
)
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\nServer: %s\r\n\r\n%s"
    % (len(_REFUSED_BODY), SERVER.encode(), _REFUSED_BODY)
)


def fit_to_fd_limit(wanted: int, reserve: int = _FD_RESERVE) -> int:
    """The connection cap the process can hold: raise the soft RLIMIT_NOFILE towards the
    hard one if needed, and lower the cap below it, so accept() never fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + reserve
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    cap = wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - reserve))
    if cap < wanted:
        log.warning(
            "max connections lowered from %d to %d to fit the file descriptor limit "
            "(%d); raise `ulimit -n` to allow more",
            wanted,
            cap,
            soft,
        )
    return cap


class _Refused(asyncio.Protocol):
    """A connection over the cap: a canned 503, then closed; nothing is read or parsed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports derive from no asyncio class.
        transport = cast(asyncio.WriteTransport, transport)
        transport.write(_REFUSED)
        transport.close()


class _Handler(web.RequestHandler):
    """aiohttp's request handler, counted, with its protocol errors answered as JSON."""

    __slots__ = ("_guard",)

    def __init__(self, guard: ConnectionGuard, server: web.Server, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._guard = guard

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.open -= 1
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After the app answered 400 to a body that failed to decode (bad gzip, broken
        # chunks), aiohttp drains the rest of it, meets the same error again and logs it
        # as an unhandled exception with a traceback: a client's fault, counted instead.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            self._guard.metrics.protocol_errors.inc()
            self._guard.events.event(
                "payload_error",
                f"dropped the rest of a malformed body: {quote(str(kw['exc_info']), 200)}",
            )
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp calls this for requests its parser refused (400 with `message`) and for
        # errors outside the app's middleware; its own version answers text/plain naming
        # its version and logs each one with a traceback at ERROR.
        if request.writer.output_size > 0:  # as aiohttp: the answer is already under way
            raise ConnectionError("answer already started, cannot send an error")
        if status >= 500:
            log.error("unhandled error outside the app", exc_info=exc)
            error = ApiError(status, "internal", "internal error")
        else:
            self._guard.metrics.protocol_errors.inc()
            detail = quote(message or str(exc or ""), 200)
            self._guard.events.event(
                "protocol_error",
                f"refused a malformed HTTP request from {request.remote}: {detail}",
            )
            error = ApiError(status, "bad_request", f"malformed HTTP request: {detail}")
        resp = web.Response(
            status=status,
            body=error.body(),
            content_type="application/json",
            headers={"Server": SERVER},
        )
        resp.force_close()
        return resp


class ConnectionGuard:
    """The protocol factory given to `loop.create_server`: one counted aiohttp handler a
    connection while fewer than `cap` are open, a canned 503 beyond."""

    def __init__(
        self,
        server: web.Server,
        config: ServeConfig,
        metrics: Metrics,
        cap: int,
        events: RateLimitedLog | None = None,
    ) -> None:
        self.metrics, self.cap, self.open = metrics, cap, 0
        self.events = events or RateLimitedLog(log)
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._kwargs: dict[str, Any] = {
            "keepalive_timeout": config.header_timeout,
            "lingering_time": _LINGER,
            "access_log": None,
        }
        metrics.connections.set_function(lambda: self.open)

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.cap:
            self.metrics.refused.inc()
            self.events.event(
                "refused",
                f"refused a connection: {self.open} open, at the limit (--max-connections)",
            )
            return _Refused()
        # Counted here, not in connection_made: asyncio accepts a backlog's worth of
        # connections before the first connection_made runs, which would overshoot the cap.
        self.open += 1
        return _Handler(self, self._server, loop=self._loop, **self._kwargs)
