"""The ingestion steps over batches, as plain functions a dataflow engine calls.

    to_batch -> decode -> dispatch -> aggregate -> write -> route -> ack

Each step takes and returns one batch (a list of `Work`). I/O clients (the
store, the Redis tier, the producer, an asyncio loop) are per worker thread,
created on first use, and closed by `close()`.

No step lets an exception escape, and one record's failure never touches
the rest of its batch: when a step raises on a batch, it is run again record
by record. A record it still raises on is decided at once: in decode,
dispatch and aggregate (pure and deterministic, so a retry would fail the
same way) it goes to the DLQ; in write it goes to the retry topic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from featureplane.codec import Item
from featureplane.errors import quote
from featureplane.operators import metrics
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.decode import decode_works
from featureplane.operators.dispatch import Dispatcher
from featureplane.operators.kafka import Deliverer, max_message_bytes
from featureplane.operators.records import Message, Status, Work
from featureplane.operators.route import (
    Abandon,
    Outgoing,
    dead_letter,
    dlq_topic,
    fit,
    retry_topic,
    route_of,
)
from featureplane.operators.write import Writer
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_redis, open_store
from featureplane.stores.base import Store, wall_clock_ms

if TYPE_CHECKING:
    from featureplane.stores.redis import RedisStore

__all__ = ["Pipeline", "PipelineConfig"]

log = logging.getLogger(__name__)

Batch = list[Work]


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Tuning of the steps; the defaults suit one ingest process."""

    flow: Literal["ingest", "retry"] = "ingest"
    retry_budget_ms: int = 3_600_000
    """How long after its first failure a record is still retried before the DLQ."""
    chunk_items: int = 10_000
    """Items per concurrent store write."""
    write_timeout_s: float = 10.0
    """A write slower than this is a transient failure."""
    delivery_timeout_s: float = 30.0
    """How long to wait for the broker to confirm a retry/DLQ record."""
    redeliver_every_ms: int = 10_000
    """How often a record whose retry/DLQ delivery failed is tried again (with later
    batches): its offset, and so the commit, waits for it."""


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
        outgoing = [f(t) for t in catalog.topics for f in (retry_topic, dlq_topic)]
        self.deliverer = Deliverer(
            settings.kafka_bootstrap,
            max_message_bytes=max_message_bytes(settings.kafka_bootstrap, outgoing),
        )
        self.stuck: list[tuple[Work, Outgoing]] = []
        """Records whose delivery failed, tried again every `redeliver_every_ms`."""
        self.redeliver_at = 0

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
        return self._guarded("decode", batch, decode_works, "malformed")

    def dispatch(self, batch: Batch) -> Batch:
        return self._guarded("dispatch", batch, self.dispatcher.dispatch, "malformed")

    def aggregate(self, batch: Batch) -> Batch:
        return self._guarded("aggregate", batch, self.aggregator.aggregate, "malformed")

    def write(self, batch: Batch) -> Batch:
        if not any(w.status == "pending" for w in batch):
            return batch

        def run(works: Batch) -> Batch:
            res = self._res()
            return res.loop.run_until_complete(res.writer.write(works))

        return self._guarded("write", batch, run, "transient")

    def route(self, batch: Batch) -> Batch:
        """Hand malformed and failed records to the DLQ / retry topic, confirmed."""
        now = self.clock()
        held: _Resources | None = getattr(self._local, "res", None)
        if held is not None and held.stuck and now >= held.redeliver_at:
            self._redeliver(held, now)
        result = list(batch)
        routes: list[tuple[int, Outgoing]] = []
        for i, w in enumerate(batch):
            out = route_of(w, self.config.retry_budget_ms, now)
            if isinstance(out, Abandon):
                result[i] = self._abandon(w, out)
            elif out is not None:
                routes.append((i, out))
        if not routes:
            return result
        res = self._res()
        deliverer = res.deliverer
        # A copy the broker's size refuses after all (its limit was unreadable and is
        # lower than assumed) is cut again to a size any broker takes.
        for limit in (deliverer.max_message_bytes, _SMALL_MESSAGE):
            sized: list[tuple[int, Outgoing]] = []
            for i, out in routes:
                fitted = self._fit(batch[i], out, limit)
                if isinstance(fitted, Abandon):
                    result[i] = self._abandon(batch[i], fitted)
                else:
                    sized.append((i, fitted))
            errors = self._deliver(deliverer, [o for _, o in sized])
            routes = []
            for (i, out), err in zip(sized, errors, strict=True):
                if err is not None and _too_large(err) and limit != _SMALL_MESSAGE:
                    routes.append((i, out))
                    continue
                result[i] = self._delivered(batch[i], out, err)
                if err is not None:
                    res.stuck.append((batch[i], out))
                    res.redeliver_at = now + self.config.redeliver_every_ms
            if not routes:
                break
        return result

    def _fit(self, w: Work, out: Outgoing, limit: int) -> Outgoing | Abandon:
        fitted = fit(out, limit)
        if fitted is None:  # a retry copy larger than the retry topic takes
            size = len(w.message.value or b"")
            reason = f"{size} bytes, too large for the retry topic: {w.reason or 'unknown'}"
            if w.cache_only:
                return Abandon(f"cache write abandoned: {reason}")
            fitted = fit(dead_letter(w, reason), limit)
            assert fitted is not None  # a DLQ copy is always cut to fit
        return fitted

    def _redeliver(self, res: _Resources, now: int) -> None:
        """Try the stuck records again, briefly; acknowledge the ones delivered now."""
        stuck, res.stuck = res.stuck, []
        errors = self._deliver(res.deliverer, [o for _, o in stuck], timeout_s=5.0, rounds=1)
        for (w, out), err in zip(stuck, errors, strict=True):
            if err is None:
                self._delivered(w, out, None)
                w.message.ack()
                log.info(
                    "%s: delivered %s[%d]@%d to %s at last",
                    self.config.flow,
                    w.message.topic,
                    w.message.partition,
                    w.message.offset,
                    out.topic,
                )
            else:
                res.stuck.append((w, out))
        res.redeliver_at = now + self.config.redeliver_every_ms

    def _deliver(
        self,
        deliverer: Deliverer,
        records: list[Outgoing],
        timeout_s: float | None = None,
        rounds: int = 3,
    ) -> list[str | None]:
        if not records:
            return []
        try:
            return deliverer.deliver(records, timeout_s or self.config.delivery_timeout_s, rounds)
        except Exception as exc:  # never let it stop the dataflow
            log.exception("delivery to retry/DLQ topics failed")
            return [str(exc)[:500]] * len(records)

    def _delivered(self, w: Work, out: Outgoing, err: str | None) -> Work:
        flow = self.config.flow
        if err is None:
            counter = metrics.DLQ if out.kind == "dlq" else metrics.RETRIES
            counter.labels(flow, w.message.topic).inc()
            if any(k == "truncated" for k, _ in out.headers):
                metrics.DLQ_TRUNCATED.labels(flow, w.message.topic).inc()
            if w.status == "malformed":
                metrics.FAILURES.labels(flow, "malformed").inc()
            return w.with_status("routed")
        metrics.FAILURES.labels(flow, "delivery").inc()
        log.error(
            "%s: cannot deliver %s[%d]@%d to %s (%s); it is tried again with later batches, "
            "and its offset (so the commit) waits for it",
            flow,
            w.message.topic,
            w.message.partition,
            w.message.offset,
            out.topic,
            err,
        )
        return w.with_status("stuck", err)

    def _abandon(self, w: Work, why: Abandon) -> Work:
        metrics.CACHE_ABANDONED.labels(self.config.flow, w.message.topic).inc()
        log.warning(
            "%s: %s[%d]@%d: %s (the store has its items; cache TTLs heal the rest)",
            self.config.flow,
            w.message.origin.topic,
            w.message.origin.partition,
            w.message.origin.offset,
            why.reason,
        )
        return w.with_status("done", why.reason)

    def ack(self, batch: Batch) -> None:
        """Acknowledge every record that is written or handed over."""
        for w in batch:
            if w.status in ("done", "routed"):
                w.message.ack()

    def _guarded(
        self, step: str, batch: Batch, fn: Callable[[Batch], Batch], failed: Status
    ) -> Batch:
        """`fn(batch)`; if it raises, `fn` per record, and a record it still raises on
        gets status `failed` with a bounded reason: only that record is affected."""
        try:
            return fn(batch)
        except Exception:
            log.exception("step %s failed on a batch of %d; rerun per record", step, len(batch))
        out: Batch = []
        for w in batch:
            if w.status != "pending":
                out.append(w)
                continue
            try:
                out.extend(fn([w]))
            except Exception as exc:
                metrics.INTERNAL_ERRORS.labels(self.config.flow, step).inc()
                reason = f"internal error in {step}: {_describe(exc)}"
                log.error(
                    "%s: %s[%d]@%d: %s",
                    self.config.flow,
                    w.message.topic,
                    w.message.partition,
                    w.message.offset,
                    reason,
                )
                out.append(w.with_status(failed, reason))
        return out


_SMALL_MESSAGE = 64 * 1024
"""A size every Kafka broker takes: the second try of a copy refused as too large."""


def _too_large(err: str) -> bool:
    return "MSG_SIZE_TOO_LARGE" in err or "RECORD_LIST_TOO_LARGE" in err


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, bounded (its message may quote the input)."""
    try:
        text = str(exc)
    except Exception:  # a __str__ that raises
        text = quote(exc)
    return f"{type(exc).__name__}: {text[:300]}"
