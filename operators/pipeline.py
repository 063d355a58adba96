"""The ingestion steps over batches, as plain functions a dataflow engine calls.

    to_batch -> decode -> dispatch -> aggregate -> write -> route -> ack
                `prepare`: the three in one pass; `write_behind`: write, overlapped

Each step takes and returns one batch (a list of `Work`). The steps build no
clients: a worker thread's I/O (an asyncio loop, a `Writer`, a `Delivery` to
the retry and DLQ topics) is a `Worker` made by the factory the flow passes
in, on the thread's first batch that needs one (Bytewax runs each worker in a
thread of its own), and closed by `close()`. Metrics go to the
`IngestMetrics` passed in.

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
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from featureplane.errors import MalformedError, quote
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.commit import OffsetTracker
from featureplane.operators.decode import decode_event, decode_works
from featureplane.operators.dispatch import Dispatcher
from featureplane.operators.handoff import Delivery, HandOff, abandon
from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.records import Message, Status, Work
from featureplane.operators.route import Abandon, Outgoing, route_of
from featureplane.operators.write import Writer
from featureplane.spec import Catalog
from featureplane.stores.base import wall_clock_ms

__all__ = ["Pipeline", "PipelineConfig", "Worker"]

log = logging.getLogger(__name__)

Batch = list[Work]
T = TypeVar("T")


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


class _LoopThread:
    """A thread running an event loop forever, started on first use and stopped by `stop`."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def submit(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self.thread is None:
            self.thread = threading.Thread(target=loop.run_forever, name="fp-writes", daemon=True)
            self.thread.start()
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self.thread.join()
            self.thread = None


@dataclass(frozen=True, slots=True)
class Worker:
    """One worker thread's I/O, made by the flow: its loop runs the writer's calls.

    `run` runs a call on the caller's thread; `submit` hands a batch's write to a thread
    that runs the loop from then on, so the store's and Redis's work on one batch goes on
    while the dataflow thread prepares the next (`Pipeline.write_behind`).
    """

    loop: asyncio.AbstractEventLoop
    writer: Writer
    delivery: Delivery
    background: _LoopThread = field(default_factory=_LoopThread, compare=False, repr=False)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.background.thread is None:
            return self.loop.run_until_complete(coro)
        return self.background.submit(self.loop, coro).result()

    def submit(self, works: Sequence[Work]) -> Future[list[Work]]:
        """The writer's `write(works)`, under way on the loop's thread."""
        return self.background.submit(self.loop, self.writer.write(works))

    def close(self) -> None:
        try:
            self.delivery.close()
        finally:
            try:
                self.run(self.writer.aclose())
            finally:
                self.background.stop(self.loop)
                self.loop.close()


@dataclass(slots=True)
class _Thread:
    worker: Worker
    handoff: HandOff
    in_flight: tuple[Batch, Future[Batch]] | None = None
    """The batch being written by `write_behind`, and its outcome to come."""


class Pipeline:
    """The steps of the ingest and retry dataflows."""

    def __init__(
        self,
        catalog: Catalog,
        config: PipelineConfig,
        metrics: IngestMetrics,
        open_worker: Callable[[], Worker],
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.metrics = metrics
        self.open_worker = open_worker
        """Makes the calling thread's `Worker`; called once a thread."""
        self.clock = clock
        self.dispatcher = Dispatcher.from_catalog(catalog)
        self.aggregator = Aggregator(catalog)
        self._local = threading.local()
        self._all: list[Worker] = []
        self._lock = threading.Lock()

    def _thread(self) -> _Thread:
        held: _Thread | None = getattr(self._local, "held", None)
        if held is None:
            worker = self.open_worker()
            with self._lock:
                self._all.append(worker)
            handoff = HandOff(
                worker.delivery,
                self.metrics,
                flow=self.config.flow,
                delivery_timeout_s=self.config.delivery_timeout_s,
                redeliver_every_ms=self.config.redeliver_every_ms,
            )
            held = self._local.held = _Thread(worker, handoff)
        return held

    def start(self) -> None:
        """Open this thread's clients now (fail fast on a bad store or Redis URL)."""
        self._thread()

    def close(self) -> None:
        """Close every thread's clients."""
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            try:
                worker.close()
            except Exception:
                log.exception("closing clients failed")

    # ---------------------------------------------------------------- steps

    def to_batch(self, messages: Sequence[Message]) -> list[Batch]:
        """Bytewax `flat_map_batch`: a source batch -> one batch of works."""
        return [[Work(m) for m in messages]] if messages else []

    def prepare(self, batch: Batch) -> Batch:
        """decode, dispatch and aggregate in one pass, one new `Work` a record, not three.

        Should the pass raise (a bug: bad records are statuses, not exceptions), the batch
        goes through the three steps one by one, which decide the culprit alone."""
        try:
            return self._prepare(batch)
        except Exception:
            log.exception("step prepare failed on a batch of %d; rerun step by step", len(batch))
        return self.aggregate(self.dispatch(self.decode(batch)))

    def _prepare(self, batch: Batch) -> Batch:
        match, build = self.dispatcher.match, self.aggregator.items
        out: Batch = []
        for w in batch:
            if w.status != "pending" or w.event is not None:
                out.append(w)
                continue
            m = w.message
            try:
                event = decode_event(m.value)
            except MalformedError as exc:
                out.append(w.with_status("malformed", str(exc)))
                continue
            rules = match(m.topic, event.event_type, event.body)
            if not rules:
                out.append(Work(m, event, rules, (), "done"))
                continue
            items, reason = build(rules, event)
            if reason is None:
                out.append(Work(m, event, rules, items))
            else:
                out.append(Work(m, event, rules, (), "malformed", reason))
        return out

    def decode(self, batch: Batch) -> Batch:
        return self._guarded("decode", batch, decode_works, "malformed")

    def dispatch(self, batch: Batch) -> Batch:
        return self._guarded("dispatch", batch, self.dispatcher.dispatch, "malformed")

    def aggregate(self, batch: Batch) -> Batch:
        return self._guarded("aggregate", batch, self.aggregator.aggregate, "malformed")

    def write(self, batch: Batch) -> Batch:
        """Write the batch's pending records and wait for the outcome."""
        if not any(w.status == "pending" for w in batch):
            return batch
        return self._guarded("write", batch, self._write_now, "transient")

    def _write_now(self, works: Batch) -> Batch:
        worker = self._thread().worker
        return worker.run(worker.writer.write(works))

    def write_behind(self, batch: Batch) -> Batch:
        """The dataflows' write step: start writing `batch`, then return the batch started
        before it, written (on the first call, an empty batch).

        The store's and Redis's work on one batch (SQLite commits on its own thread, Redis
        runs its scripts) then overlaps with the next batch's reading and preparing on
        this thread, where before this thread waited. Nothing changes for at-least-once:
        a record is acknowledged only once its outcome is known, after this step as
        before; the source calls `flush` when it has nothing new, so the last batch
        never waits for another. At most two batches are written at a time.
        """
        if not any(w.status == "pending" for w in batch):
            return batch
        previous: tuple[Batch, Future[Batch]] | None = None
        try:
            held = self._thread()
            previous, held.in_flight = held.in_flight, None
            held.in_flight = (batch, held.worker.submit(batch))
        except Exception:  # the clients cannot be made or used: decided now, record by record
            log.exception("%s: cannot start a batch's write", self.config.flow)
            done = self.write(batch)
            return done if previous is None else self._finish(*previous) + done
        return [] if previous is None else self._finish(*previous)

    def flush(self) -> None:
        """Finish, route and acknowledge the batch `write_behind` is writing on this thread,
        if any: the source calls this when it reads nothing new."""
        held: _Thread | None = getattr(self._local, "held", None)
        if held is None or held.in_flight is None:
            return
        writing, held.in_flight = held.in_flight, None
        try:
            self.ack(self.route(self._finish(*writing)))
        except Exception:  # never stop the dataflow: the records are read again after a restart
            log.exception("%s: finishing a batch's write failed", self.config.flow)

    def _finish(self, batch: Batch, outcome: Future[Batch]) -> Batch:
        try:
            return outcome.result()
        except Exception:
            log.exception("step write failed on a batch of %d; rerun per record", len(batch))
        return self._one_by_one("write", batch, self._write_now, "transient")

    def route(self, batch: Batch) -> Batch:
        """Hand malformed and failed records to the DLQ / retry topic, confirmed."""
        now = self.clock()
        held: _Thread | None = getattr(self._local, "held", None)
        if held is not None:
            held.handoff.redeliver_due(now)
        result = list(batch)
        routes: list[tuple[int, Outgoing]] = []
        for i, w in enumerate(batch):
            out = route_of(w, self.config.retry_budget_ms, now)
            if isinstance(out, Abandon):
                result[i] = abandon(w, out, self.config.flow, self.metrics)
            elif out is not None:
                routes.append((i, out))
        if not routes:
            return result
        for i, w in self._thread().handoff.send(batch, routes, now).items():
            result[i] = w
        return result

    def ack(self, batch: Batch) -> None:
        """Acknowledge every record that is written or handed over."""
        done: dict[OffsetTracker, list[int]] = {}
        for w in batch:
            if w.status == "done" or w.status == "routed":
                m = w.message
                if m.tracker is not None:
                    offsets = done.get(m.tracker)
                    if offsets is None:
                        offsets = done[m.tracker] = []
                    offsets.append(m.offset)
        for tracker, offsets in done.items():  # one lock a partition, not one a record
            tracker.ack_many(offsets)

    def _guarded(
        self, step: str, batch: Batch, fn: Callable[[Batch], Batch], failed: Status
    ) -> Batch:
        """`fn(batch)`; if it raises, `fn` per record, and a record it still raises on
        gets status `failed` with a bounded reason: only that record is affected."""
        try:
            return fn(batch)
        except Exception:
            log.exception("step %s failed on a batch of %d; rerun per record", step, len(batch))
        return self._one_by_one(step, batch, fn, failed)

    def _one_by_one(
        self, step: str, batch: Batch, fn: Callable[[Batch], Batch], failed: Status
    ) -> Batch:
        out: Batch = []
        for w in batch:
            if w.status != "pending":
                out.append(w)
                continue
            try:
                out.extend(fn([w]))
            except Exception as exc:
                self.metrics.internal_errors.labels(self.config.flow, step).inc()
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


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, bounded (its message may quote the input)."""
    try:
        text = str(exc)
    except Exception:  # a __str__ that raises
        text = quote(exc)
    return f"{type(exc).__name__}: {text[:300]}"
