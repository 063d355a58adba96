"""The ingestion steps over batches, as plain functions a dataflow engine calls.

    to_batch -> decode -> dispatch -> aggregate -> write -> route -> ack

Each step takes and returns one batch (a list of `Work`). I/O clients (the
store, the Redis tier, the producer, an asyncio loop) are per worker thread,
created on first use, and closed by `close()`. No step lets an exception
escape: an unexpected one marks the batch's unfinished works as transient
failures, which go to the retry topic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from featureplane.codec import Item
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_redis, open_store
from featureplane.stores.base import Store, wall_clock_ms
from operators import metrics
from operators.aggregate import Aggregator
from operators.decode import decode_works
from operators.dispatch import Dispatcher
from operators.kafka import Deliverer
from operators.records import Message, Work
from operators.route import Outgoing, route_of
from operators.write import Writer

if TYPE_CHECKING:
    from featureplane.stores.redis import RedisStore

__all__ = ["Pipeline", "PipelineConfig"]

log = logging.getLogger(__name__)

Batch = list[Work]


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Tuning of the steps; the defaults suit one ingest process."""

    flow: Literal["ingest", "retry"] = "ingest"
    max_attempts: int = 8
    """Retries of a transient failure before the record goes to the DLQ."""
    chunk_items: int = 10_000
    """Items per concurrent store write."""
    write_timeout_s: float = 10.0
    """A write slower than this is a transient failure."""
    delivery_timeout_s: float = 30.0
    """How long to wait for the broker to confirm a retry/DLQ record."""


class _Resources:
    """One worker thread's clients."""

    def __init__(self, settings: Settings, catalog: Catalog, config: PipelineConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.store: Store = open_store(settings, catalog)
        redis = open_redis(settings, catalog)
        self.cache = _Cache(cast("RedisStore", redis)) if redis is not None else None
        self.loop.run_until_complete(self.store.start())
        self.writer = Writer(
            catalog,
            self.store,
            self.cache,
            flow=config.flow,
            chunk_items=config.chunk_items,
            timeout_s=config.write_timeout_s,
        )
        assert settings.kafka_bootstrap is not None
        self.deliverer = Deliverer(settings.kafka_bootstrap)

    def close(self) -> None:
        self.deliverer.close()
        self.loop.run_until_complete(self.store.aclose())
        if self.cache is not None:
            self.loop.run_until_complete(self.cache.aclose())
        self.loop.close()


class _Cache:
    """The Redis tier, started on first use (so Redis being down at start-up is a
    transient write failure like any other) and written with `write_through`."""

    def __init__(self, redis: RedisStore) -> None:
        self.redis = redis
        self.started = False
        self._starting = asyncio.Lock()

    async def write_through(self, items: Sequence[Item]) -> None:
        if not self.started:
            async with self._starting:  # concurrent chunks must not race a failing start
                if not self.started:
                    await self.redis.start()
                    self.started = True
        await self.redis.write_through(items)

    async def aclose(self) -> None:
        if self.started:
            await self.redis.aclose()


class Pipeline:
    """The steps of the ingest and retry dataflows."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        config: PipelineConfig,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.config = config
        self.clock = clock
        self.dispatcher = Dispatcher.from_catalog(catalog)
        self.aggregator = Aggregator(catalog)
        self._local = threading.local()
        self._all: list[_Resources] = []
        self._lock = threading.Lock()

    def _res(self) -> _Resources:
        res: _Resources | None = getattr(self._local, "res", None)
        if res is None:
            res = _Resources(self.settings, self.catalog, self.config)
            self._local.res = res
            with self._lock:
                self._all.append(res)
        return res

    def start(self) -> None:
        """Open this thread's clients now (fail fast on a bad store or Redis URL)."""
        self._res()

    def close(self) -> None:
        with self._lock:
            all_res, self._all = self._all, []
        for res in all_res:
            try:
                res.close()
            except Exception:
                log.exception("closing clients failed")

    # ---------------------------------------------------------------- steps

    def to_batch(self, messages: Sequence[Message]) -> list[Batch]:
        """Bytewax `flat_map_batch`: a source batch -> one batch of works."""
        return [[Work(m) for m in messages]] if messages else []

    def decode(self, batch: Batch) -> Batch:
        return _guarded("decode", batch, decode_works)

    def dispatch(self, batch: Batch) -> Batch:
        return _guarded("dispatch", batch, self.dispatcher.dispatch)

    def aggregate(self, batch: Batch) -> Batch:
        return _guarded("aggregate", batch, self.aggregator.aggregate)

    def write(self, batch: Batch) -> Batch:
        if not any(w.status == "pending" for w in batch):
            return batch

        def run(works: Batch) -> Batch:
            res = self._res()
            return res.loop.run_until_complete(res.writer.write(works))

        return _guarded("write", batch, run)

    def route(self, batch: Batch) -> Batch:
        """Hand malformed and failed records to the DLQ / retry topic, confirmed."""
        now = self.clock()
        routes: list[tuple[int, Outgoing]] = []
        for i, w in enumerate(batch):
            out = route_of(w, self.config.max_attempts, now)
            if out is not None:
                routes.append((i, out))
        if not routes:
            return batch
        flow = self.config.flow
        try:
            errors = self._res().deliverer.deliver(
                [o for _, o in routes], self.config.delivery_timeout_s
            )
        except Exception as exc:  # never let it stop the dataflow
            log.exception("delivery to retry/DLQ topics failed")
            errors = [str(exc)] * len(routes)
        result = list(batch)
        for (i, out), err in zip(routes, errors, strict=True):
            w = batch[i]
            if err is None:
                result[i] = w.with_status("routed")
                counter = metrics.DLQ if out.kind == "dlq" else metrics.RETRIES
                counter.labels(flow, w.message.topic).inc()
                if w.status == "malformed":
                    metrics.FAILURES.labels(flow, "malformed").inc()
            else:
                result[i] = w.with_status("stuck", err)
                metrics.FAILURES.labels(flow, "delivery").inc()
                log.error(
                    "%s: cannot deliver %s[%d]@%d to %s (%s); its offset stays uncommitted "
                    "and it is read again after a restart",
                    flow,
                    w.message.topic,
                    w.message.partition,
                    w.message.offset,
                    out.topic,
                    err,
                )
        n_dlq = sum(1 for _, o in routes if o.kind == "dlq")
        log.debug("%s: routed %d to retry, %d to dlq", flow, len(routes) - n_dlq, n_dlq)
        return result

    def ack(self, batch: Batch) -> None:
        """Acknowledge every record that is written or handed over."""
        for w in batch:
            if w.status in ("done", "routed"):
                w.message.ack()


def _guarded(step: str, batch: Batch, fn: Callable[[Batch], Batch]) -> Batch:
    try:
        return fn(batch)
    except Exception as exc:
        log.exception("step %s failed on a batch of %d; sending it to retry", step, len(batch))
        reason = f"internal error in {step}: {type(exc).__name__}: {exc}"[:500]
        return [
            w.with_status("transient", reason) if w.status == "pending" else w
            for w in batch
        ]
