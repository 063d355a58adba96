"""The aiohttp application: the HTTP API's routes, auth, errors and lifecycle.

`create_app` takes unstarted tiers; the app starts them in its cleanup context and
closes them at shutdown, so one object owns each client's life. `drain` marks it
stopping: /readyz turns 503 while requests are still answered.

Errors: every refusal is an `ApiError` (status, code, message) answered as JSON. The
errors of the layers below get their status here, in `_api_error`, and nowhere else: an
on-demand function failing is 503, an unknown group 400, a tier failure 503. Anything
else is a bug: 500, logged with its traceback at most once a minute per route.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web

from featureplane.cache import CacheTier
from featureplane.codec import Record
from featureplane.errors import StoreError, UnknownGroupError, quote
from featureplane.serving.api import ApiError, FeatureRequest, parse_body, parse_query, render
from featureplane.serving.config import ServeConfig
from featureplane.serving.invalidate import SUBSCRIBER, local_tier, subscriber_of
from featureplane.serving.logs import RateLimitedLog
from featureplane.serving.metrics import CONTENT_TYPE, Metrics
from featureplane.serving.ondemand import OnDemandError, OnDemandFn, compute, load_functions
from featureplane.serving.openapi import openapi
from featureplane.serving.tiers import ReaderConfig, TieredReader
from featureplane.spec import Catalog
from featureplane.stores.base import Clock, Query, Store, wall_clock_ms

__all__ = ["MAX_BODY", "METRICS", "READER", "SERVER", "create_app", "drain"]

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024
SERVER = "featureplane"
"""The `Server` header of every answer: no versions for a scanner to match."""

READER = web.AppKey("reader", TieredReader)
METRICS = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = "application/json"


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=_JSON)


def _error(exc: ApiError) -> web.Response:
    resp = web.Response(body=exc.body(), status=exc.status, content_type=_JSON)
    if exc.status == 408:  # a client too slow to send its body is disconnected
        resp.force_close()
    return resp


_HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}
_CLIENT_GONE = 499  # nginx's "client closed request": recorded, never sent, never a 5xx


class _Service:
    """What the handlers share: the catalog, the tiers and the on-demand functions."""

    def __init__(
        self,
        reader: TieredReader,
        functions: dict[str, OnDemandFn],
        clock: Clock,
        token: str | None,
        store: Store,
        redis: CacheTier | None,
        body_timeout: float,
    ) -> None:
        self.reader, self.functions, self.clock = reader, functions, clock
        self.auth = None if token is None else b"Bearer " + token.encode()
        self.store, self.redis = store, redis
        self.body_timeout = body_timeout
        self.phase = "starting"  # -> "serving" once the tiers started -> "draining"
        self.events = RateLimitedLog(log)

    async def results(self, reqs: list[FeatureRequest]) -> list[dict[str, Any]]:
        queries: list[Query] = []
        computed: list[Coroutine[Any, Any, list[list[Record]]]] = []
        for req in reqs:
            name = req.group.name
            fn = self.functions.get(name)
            if fn is not None:
                computed.append(compute(req.group, fn, req.ids, self.clock()))
                continue
            queries.extend(Query(name, i, req.limit, req.since, req.until) for i in req.ids)
        try:
            got = await self.reader.read(queries) if queries else []
        except BaseException:
            for coro in computed:  # never started: closed, not left to warn "never awaited"
                coro.close()
            raise
        on_demand = list(await asyncio.gather(*computed)) if computed else []
        out: list[dict[str, Any]] = []
        found, computed_rows = iter(got), iter(on_demand)
        for req in reqs:
            rows = next(computed_rows) if req.group.name in self.functions else None
            for n, entity_id in enumerate(req.ids):
                records = rows[n] if rows is not None else next(found)
                if records is None:
                    raise ApiError(
                        503,
                        "unavailable",
                        f"no tier can answer {req.group.name!r} for id {quote(entity_id)} now",
                    )
                out.append(render(req, entity_id, records))
        return out


_SERVICE = web.AppKey("service", _Service)


def _route_name(request: web.Request) -> str:
    """The route's pattern (bounded label and log text), never the path the client sent."""
    route = request.match_info.route.resource
    return route.canonical if route is not None else "unmatched"


def _api_error(
    request: web.Request, exc: OnDemandError | UnknownGroupError | StoreError
) -> ApiError:
    """The answer to an error raised below the HTTP layer."""
    if isinstance(exc, OnDemandError):
        request.app[METRICS].on_demand_errors.labels(exc.group).inc()
        return ApiError(503, "on_demand_failed", exc.message)
    if isinstance(exc, UnknownGroupError):
        return ApiError(400, "unknown_group", f"unknown feature group {quote(exc.group)}")
    # The reader absorbs tier failures (timeouts, breakers); one that reaches here still
    # means no tier can answer now, which the API answers 503, never 500.
    route = _route_name(request)
    request.app[_SERVICE].events.event(
        f"tier error {route}", f"tier error on {route}: {quote(str(exc), 200)}"
    )
    return ApiError(503, "unavailable", "no tier can answer now")


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    svc = request.app[_SERVICE]
    try:
        if svc.auth is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, svc.auth):
                raise ApiError(401, "unauthorized", "missing or wrong Authorization: Bearer token")
        resp = await handler(request)
    except ApiError as exc:
        resp = _error(exc)
    except (OnDemandError, UnknownGroupError, StoreError) as exc:
        resp = _error(_api_error(request, exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "error")
        resp = _error(ApiError(exc.status, code, exc.reason))
        if (allow := exc.headers.get("Allow")) is not None:  # 405 must say what is allowed
            resp.headers["Allow"] = allow
    except Exception as exc:  # a bug: answer JSON, log it (not once a request), never leak it
        route = _route_name(request)
        svc.events.event(
            f"bug {route}", f"unhandled error on {quote(request.method, 20)} {route}", exc
        )
        resp = _error(ApiError(500, "internal", "internal error"))
    request.app[METRICS].observe(_route_name(request), resp.status, time.perf_counter() - start)
    resp.headers["Server"] = SERVER
    return resp


async def _read_body(request: web.Request, timeout: float) -> bytes:
    """The body, read within `timeout` s; a client that vanishes mid-body is no error of ours."""
    try:
        if request.content.is_eof():  # all of it came with the head: no timer to arm
            return await request.read()
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        request.app[METRICS].slow_clients.inc()
        raise ApiError(
            408, "request_timeout", f"the body did not arrive within {timeout:g} s"
        ) from None
    except ConnectionError:
        raise ApiError(
            _CLIENT_GONE,
            "client_closed_request",
            "the client closed the connection before sending its body",
        ) from None
    except web.RequestPayloadError:
        raise ApiError(400, "bad_request", "malformed body (length or chunked encoding)") from None


async def _post_features(request: web.Request) -> web.Response:
    svc = request.app[_SERVICE]
    body = await _read_body(request, svc.body_timeout)
    reqs = parse_body(svc.reader.catalog, body)
    return _json({"results": await svc.results(reqs)})


async def _get_feature(request: web.Request) -> web.Response:
    svc = request.app[_SERVICE]
    req = parse_query(
        svc.reader.catalog, request.match_info["group"], request.match_info["id"], request.query
    )
    return _json((await svc.results([req]))[0])


async def _groups(request: web.Request) -> web.Response:
    catalog = request.app[_SERVICE].reader.catalog
    return _json({"groups": [g.model_dump(mode="json") for g in catalog.groups.values()]})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """200 whenever the durable store answers (a cache tier down is only "degraded");
    503 while starting, draining or with the store unreachable."""
    svc = request.app[_SERVICE]
    if svc.phase != "serving":
        return _json({"ready": False, "status": svc.phase}, 503)
    tiers: dict[str, Store | CacheTier] = {"store": svc.store}
    if svc.redis is not None:
        tiers["redis"] = svc.redis

    async def ping(tier: Store | CacheTier) -> str:
        try:
            async with asyncio.timeout(1.0):
                await tier.ping()
        except Exception:
            return "down"
        return "up"

    states = dict(zip(tiers, await asyncio.gather(*map(ping, tiers.values())), strict=True))
    if states["store"] != "up":
        return _json({"ready": False, "status": "unavailable", "tiers": states}, 503)
    status = "ok" if all(s == "up" for s in states.values()) else "degraded"
    return _json({"ready": True, "status": status, "tiers": states})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def create_app(
    catalog: Catalog,
    *,
    store: Store,
    redis: CacheTier | None = None,
    config: ServeConfig | None = None,
    token: str | None = None,
    clock: Clock = wall_clock_ms,
    rand: Callable[[], float] = random.random,
) -> web.Application:
    """The server over these (unstarted) tiers; on-demand functions are imported here."""
    config = config or ServeConfig()
    functions = load_functions(catalog)
    metrics = Metrics()
    local = local_tier(config, redis)
    reader = TieredReader(
        catalog=catalog,
        store=store,
        redis=redis,
        local=local,
        metrics=metrics,
        clock=clock,
        rand=rand,
        config=ReaderConfig(
            negative_ttl_ms=config.negative_ttl,
            redis_timeout_ms=config.redis_timeout,
            store_timeout_ms=config.store_timeout,
            breaker_failures=config.breaker_failures,
            breaker_cooldown_ms=config.breaker_cooldown,
            xfetch_beta=config.xfetch_beta,
        ),
    )
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY)
    app[METRICS] = metrics
    app[READER] = reader
    subscriber = subscriber_of(catalog, redis, local, metrics, config, clock, rand)
    if subscriber is not None:
        app[SUBSCRIBER] = subscriber
    svc = app[_SERVICE] = _Service(
        reader, functions, clock, token, store, redis, config.body_timeout
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        started: list[Store | CacheTier] = []
        try:
            tiers: tuple[Store | CacheTier | None, ...] = (store, redis)
            for tier in tiers:
                if tier is not None:
                    await tier.start()
                    started.append(tier)
            await reader.start()
            if subscriber is not None:  # after the Redis tier: it asks it for cluster nodes
                await subscriber.start()
            svc.phase = "serving"
            yield
        finally:
            if subscriber is not None:
                await subscriber.aclose()
            await reader.aclose()
            for tier in reversed(started):
                await tier.aclose()

    app.cleanup_ctx.append(lifecycle)
    spec = orjson.dumps(openapi(catalog))
    app.router.add_post("/v1/features", _post_features)
    app.router.add_get("/v1/features/{group}/{id:.+}", _get_feature)
    app.router.add_get("/v1/groups", _groups)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)

    async def _openapi(request: web.Request) -> web.Response:
        return web.Response(body=spec, content_type=_JSON)

    app.router.add_get("/openapi.json", _openapi)
    return app


def drain(app: web.Application) -> None:
    """Mark the server stopping: /readyz answers 503 from now on; requests still are."""
    app[_SERVICE].phase = "draining"
