"""The aiohttp application: the HTTP API's routes, auth, errors and lifecycle.

`create_app` takes unstarted tiers; the app starts them in its cleanup context and
closes them at shutdown, so one object owns each client's life. `drain` marks it
stopping: /readyz turns 503 while requests are still answered.

Errors: every refusal is an `ApiError` (status, code, message) answered as JSON. The
errors of the layers below get their status here, in `_api_error`, and nowhere else: an
on-demand function failing is 503, an unknown group 400, a tier failure 503. Anything
else is a bug: 500, logged with its traceback at most once a minute per route.

No aiohttp middleware: each handler is wrapped once, at start-up (`_endpoint`: the token,
the errors, the latency metric, the `Server` header), where a middleware costs a wrapper
chain and a context switch of the current app on every request. So that no answer escapes
the wrappers, every path has a route: each resource answers its other methods 405 (with
`Allow`), and a catch-all route answers 404.

Answers are spliced from each result's JSON bytes; a result answered from the local tier
is rendered once per request shape (features, limit, since, until) and kept with the
entry it came from (`LocalCache.keep_rendered`), so a warm hit copies bytes.
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
from featureplane.serving.api import (
    ApiError,
    FeatureRequest,
    parse_body,
    parse_query,
    render_json,
)
from featureplane.serving.catalog import CatalogPages, CatalogParts
from featureplane.serving.config import ServeConfig
from featureplane.serving.figures import Endpoints, Prometheus, Source
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
_UNMATCHED = "unmatched"  # the route label of answers no route was made for (404, 405)


def _json(doc: object, status: int = 200) -> web.Response:
    return _body(orjson.dumps(doc), status)


def _body(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON)


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

    def check_token(self, request: web.Request) -> None:
        """401 unless the request carries the configured token (when there is one)."""
        if self.auth is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, self.auth):
                raise ApiError(401, "unauthorized", "missing or wrong Authorization: Bearer token")

    async def results(self, reqs: list[FeatureRequest]) -> list[bytes]:
        """Each (group, id)'s result object as JSON, in request order."""
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
            got = await self.reader.answers(queries) if queries else []
        except BaseException:
            for coro in computed:  # never started: closed, not left to warn "never awaited"
                coro.close()
            raise
        on_demand = list(await asyncio.gather(*computed)) if computed else []
        out: list[bytes] = []
        found, computed_rows = iter(got), iter(on_demand)
        local = self.reader.local
        for req in reqs:
            if req.group.name in self.functions:
                rows = next(computed_rows)
                out.extend(render_json(req, i, rows[n]) for n, i in enumerate(req.ids))
                continue
            shape = (req.features, req.limit, req.since, req.until)
            for entity_id in req.ids:
                w = next(found)
                records, entry = w.records, w.entry
                if records is None:
                    raise ApiError(
                        503,
                        "unavailable",
                        f"no tier can answer {req.group.name!r} for id {quote(entity_id)} now",
                    )
                if entry is None or local is None:
                    out.append(render_json(req, entity_id, records))
                    continue
                # The shape holds the request's own since: the records answered for it can
                # only lose their oldest ones as retention moves on, so an answer rendered
                # for as many records is this one.
                done = entry.rendered.get(shape)
                if done is None or done[0] != len(records):
                    done = (len(records), render_json(req, entity_id, records))
                    local.keep_rendered(w.key, entry, shape, done)
                out.append(done[1])
        return out


_SERVICE = web.AppKey("service", _Service)


def _api_error(
    svc: _Service, metrics: Metrics, route: str, exc: OnDemandError | UnknownGroupError | StoreError
) -> ApiError:
    """The answer to an error raised below the HTTP layer."""
    if isinstance(exc, OnDemandError):
        metrics.on_demand_errors.labels(exc.group).inc()
        return ApiError(503, "on_demand_failed", exc.message)
    if isinstance(exc, UnknownGroupError):
        return ApiError(400, "unknown_group", f"unknown feature group {quote(exc.group)}")
    # The reader absorbs tier failures (timeouts, breakers); one that reaches here still
    # means no tier can answer now, which the API answers 503, never 500.
    svc.events.event(f"tier error {route}", f"tier error on {route}: {quote(str(exc), 200)}")
    return ApiError(503, "unavailable", "no tier can answer now")


def _endpoint(
    svc: _Service, metrics: Metrics, handler: Handler, route: str, token: bool
) -> Handler:
    """`handler` answering every error as JSON, the token checked first when `token`, its
    latency observed under `route` (a bounded label: the route's pattern, never the path
    the client sent), and the `Server` header set."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        try:
            if token:
                svc.check_token(request)
            resp = await handler(request)
        except ApiError as exc:
            resp = _error(exc)
        except (OnDemandError, UnknownGroupError, StoreError) as exc:
            resp = _error(_api_error(svc, metrics, route, exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "error")
            resp = _error(ApiError(exc.status, code, exc.reason))
            if (allow := exc.headers.get("Allow")) is not None:  # 405 must say what is allowed
                resp.headers["Allow"] = allow
        except Exception as exc:  # a bug: answer JSON, log it (not once a request), never leak it
            svc.events.event(
                f"bug {route}", f"unhandled error on {quote(request.method, 20)} {route}", exc
            )
            resp = _error(ApiError(500, "internal", "internal error"))
        metrics.observe(route, resp.status, time.perf_counter() - start)
        resp.headers["Server"] = SERVER
        return resp

    return endpoint


def _not_allowed(allowed: set[str]) -> Handler:
    async def not_allowed(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return not_allowed


class _Anywhere(web.PlainResource):
    """Every path, whatever it holds (a pattern misses a newline, or a path without `/`):
    looked at last, it answers what no other route does, so nothing escapes `_endpoint`."""

    def _match(self, path: str) -> dict[str, str] | None:
        return {}


def _not_found(svc: _Service) -> Handler:
    async def not_found(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/v1/"):  # the API's paths are the token's, known or not
            svc.check_token(request)
        raise web.HTTPNotFound()

    return not_found


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
    return _body(b'{"results":[' + b",".join(await svc.results(reqs)) + b"]}")


async def _get_feature(request: web.Request) -> web.Response:
    svc = request.app[_SERVICE]
    req = parse_query(
        svc.reader.catalog, request.match_info["group"], request.match_info["id"], request.query
    )
    return _body((await svc.results([req]))[0])


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
    catalog_parts: CatalogParts | None = None,
) -> web.Application:
    """The server over these (unstarted) tiers; on-demand functions are imported here.
    `catalog_parts`: what the catalog reads from beyond serving (`CatalogParts`)."""
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
    app = web.Application(client_max_size=MAX_BODY)
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

    source: Source = (
        Prometheus(config.catalog_prometheus)
        if config.catalog_prometheus
        else Endpoints(config.catalog_metrics_urls, local=metrics.render)
    )
    served = (
        {"store"}
        | ({"redis"} if redis is not None else set())
        | ({"local"} if local is not None else set())
    )
    parts = catalog_parts or CatalogParts()
    pages = CatalogPages(
        catalog,
        source,
        token_required=token is not None,
        runs=parts.batch_runs,
        dead_letters=parts.dead_letters,
        tiers=frozenset(served),
    )

    async def close_pages(app: web.Application) -> None:
        await pages.aclose()

    app.cleanup_ctx.append(lifecycle)
    app.on_cleanup.append(close_pages)
    spec = orjson.dumps(openapi(catalog))

    async def _openapi(request: web.Request) -> web.Response:
        return web.Response(body=spec, content_type=_JSON)

    # (method, path, handler, needs the token)
    routes: list[tuple[str, str, Handler, bool]] = [
        ("POST", "/v1/features", _post_features, True),
        ("GET", "/v1/features/{group}/{id:.+}", _get_feature, True),
        ("GET", "/v1/groups", _groups, True),
        ("GET", "/healthz", _healthz, False),
        ("GET", "/readyz", _readyz, False),
        ("GET", "/metrics", _metrics, False),
        ("GET", "/openapi.json", _openapi, False),
        *pages.routes(),
    ]
    for method, path, handler, api in routes:
        resource = app.router.add_resource(path)
        wrapped = _endpoint(svc, metrics, handler, resource.canonical, api)
        resource.add_route(method, wrapped)
        if method == "GET":
            resource.add_route("HEAD", wrapped)
        allowed = {route.method for route in resource}
        refuse = _endpoint(svc, metrics, _not_allowed(allowed), _UNMATCHED, api)
        resource.add_route("*", refuse)
    last = _Anywhere("/")
    app.router.register_resource(last)
    last.add_route("*", _endpoint(svc, metrics, _not_found(svc), _UNMATCHED, False))
    return app


def drain(app: web.Application) -> None:
    """Mark the server stopping: /readyz answers 503 from now on; requests still are."""
    app[_SERVICE].phase = "draining"
