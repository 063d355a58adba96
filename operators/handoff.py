"""The route step's I/O: hand failed records to `<topic>.retry` / `<topic>.dlq`, confirmed.

`operators.route` decides where a record goes (pure); a `HandOff` per worker
thread delivers the copies through its `Delivery` (a producer that waits for
the broker's acknowledgement) and turns each outcome into a status:
`routed` once delivered, `stuck` when the delivery failed. A stuck record is
tried again with later batches, every `redeliver_every_ms`, and
acknowledged once delivered: its offset, and so the commit, waits for it.

A copy is cut to the broker's message size (`route.fit`) before it is sent;
a copy refused as too large after all (the broker's limit was unreadable and
is lower than assumed) is cut again to a size any broker takes. A
cache-only record whose budget is spent is abandoned (`abandon`): the store
has its items, the cache TTLs heal the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from featureplane.operators.metrics import IngestMetrics
from featureplane.operators.records import Work
from featureplane.operators.route import Abandon, Outgoing, dead_letter, fit

__all__ = ["SMALL_MESSAGE", "Delivery", "HandOff", "abandon"]

log = logging.getLogger(__name__)

SMALL_MESSAGE = 64 * 1024
"""A size every Kafka broker takes: the second try of a copy refused as too large."""


class Delivery(Protocol):
    """Produces records and waits for the broker (`operators.kafka.Deliverer`)."""

    max_message_bytes: int

    def deliver(
        self, records: Sequence[Outgoing], timeout_s: float = ..., rounds: int = ...
    ) -> list[str | None]:
        """One entry per record: None when delivered, else the error."""
        ...

    def close(self) -> None: ...


def abandon(w: Work, why: Abandon, flow: str, metrics: IngestMetrics) -> Work:
    """A spent cache-only retry: done, logged and counted."""
    metrics.cache_abandoned.labels(flow, w.message.topic).inc()
    log.warning(
        "%s: %s[%d]@%d: %s (the store has its items; cache TTLs heal the rest)",
        flow,
        w.message.origin.topic,
        w.message.origin.partition,
        w.message.origin.offset,
        why.reason,
    )
    return w.with_status("done", why.reason)


class HandOff:
    """One worker's deliveries to the retry and DLQ topics, and its stuck records."""

    def __init__(
        self,
        delivery: Delivery,
        metrics: IngestMetrics,
        *,
        flow: str,
        delivery_timeout_s: float = 30.0,
        redeliver_every_ms: int = 10_000,
    ) -> None:
        self.delivery = delivery
        self.metrics = metrics
        self.flow = flow
        self.delivery_timeout_s = delivery_timeout_s
        self.redeliver_every_ms = redeliver_every_ms
        self.stuck: list[tuple[Work, Outgoing]] = []
        """Records whose delivery failed, tried again every `redeliver_every_ms`."""
        self.redeliver_at = 0

    def send(
        self, batch: Sequence[Work], routes: list[tuple[int, Outgoing]], now: int
    ) -> dict[int, Work]:
        """The records of `batch` at `routes` (index, copy), delivered (routed), stuck or
        abandoned, by index."""
        result: dict[int, Work] = {}
        # A copy the broker's size refuses after all is cut again to a size any broker takes.
        for limit in (self.delivery.max_message_bytes, SMALL_MESSAGE):
            sized: list[tuple[int, Outgoing]] = []
            for i, out in routes:
                fitted = self._fit(batch[i], out, limit)
                if isinstance(fitted, Abandon):
                    result[i] = abandon(batch[i], fitted, self.flow, self.metrics)
                else:
                    sized.append((i, fitted))
            errors = self._deliver([o for _, o in sized])
            routes = []
            for (i, out), err in zip(sized, errors, strict=True):
                if err is not None and _too_large(err) and limit != SMALL_MESSAGE:
                    routes.append((i, out))
                    continue
                result[i] = self._delivered(batch[i], out, err)
                if err is not None:
                    self.stuck.append((batch[i], out))
                    self.redeliver_at = now + self.redeliver_every_ms
            if not routes:
                break
        return result

    def redeliver_due(self, now: int) -> None:
        """Try the stuck records again, briefly, when due; acknowledge the ones delivered."""
        if not self.stuck or now < self.redeliver_at:
            return
        stuck, self.stuck = self.stuck, []
        errors = self._deliver([o for _, o in stuck], timeout_s=5.0, rounds=1)
        for (w, out), err in zip(stuck, errors, strict=True):
            if err is None:
                self._delivered(w, out, None)
                w.message.ack()
                log.info(
                    "%s: delivered %s[%d]@%d to %s at last",
                    self.flow,
                    w.message.topic,
                    w.message.partition,
                    w.message.offset,
                    out.topic,
                )
            else:
                self.stuck.append((w, out))
        self.redeliver_at = now + self.redeliver_every_ms

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

    def _deliver(
        self, records: list[Outgoing], timeout_s: float | None = None, rounds: int = 3
    ) -> list[str | None]:
        if not records:
            return []
        try:
            return self.delivery.deliver(records, timeout_s or self.delivery_timeout_s, rounds)
        except Exception as exc:  # never let it stop the dataflow
            log.exception("delivery to retry/DLQ topics failed")
            return [str(exc)[:500]] * len(records)

    def _delivered(self, w: Work, out: Outgoing, err: str | None) -> Work:
        flow, m = self.flow, self.metrics
        if err is None:
            counter = m.dlq if out.kind == "dlq" else m.retries
            counter.labels(flow, w.message.topic).inc()
            if any(k == "truncated" for k, _ in out.headers):
                m.dlq_truncated.labels(flow, w.message.topic).inc()
            if w.status == "malformed":
                m.failures.labels(flow, "malformed").inc()
            return w.with_status("routed")
        m.failures.labels(flow, "delivery").inc()
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


def _too_large(err: str) -> bool:
    return "MSG_SIZE_TOO_LARGE" in err or "RECORD_LIST_TOO_LARGE" in err
