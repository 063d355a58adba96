"""Routing of failed records to `<topic>.retry` and `<topic>.dlq` (errors are data).

Headers (UTF-8 strings) on both: `reason`, and the original `topic`,
`partition`, `offset`; on retry records also `attempt` (1 for the first
retry) and `first_failure_ms`, and `tiers: redis` when the store write
succeeded and only the Redis tier is to be rewritten.

A transient failure goes back to the retry topic as attempt n+1 until the
retry budget (time since `first_failure_ms`) is spent, then to the DLQ. A
record whose only failure is the Redis tier never goes to the DLQ: when its
budget is spent, the cache write is abandoned (`Abandon`), since the store
holds its items and the cache TTLs heal the rest. Malformed records go to
the DLQ at once.

`fit` keeps a record within the broker's message size: a DLQ record too
large to copy whole is cut, with headers `truncated: true` and
`original_size` (bytes of the value as read), so delivery can never fail on
size and hold back a commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from featureplane.operators.records import Message, Origin, Work

__all__ = [
    "DLQ_SUFFIX",
    "RECORD_OVERHEAD",
    "RETRY_SUFFIX",
    "TIERS_HEADER",
    "Abandon",
    "Outgoing",
    "RetryHeaders",
    "dead_letter",
    "dlq_topic",
    "fit",
    "parse_retry_headers",
    "retry_topic",
    "route_of",
    "wire_size",
]

RETRY_SUFFIX = ".retry"
DLQ_SUFFIX = ".dlq"
TIERS_HEADER = "tiers"
"""On a retry record: `redis` = the store has the items; rewrite the Redis tier only."""
RECORD_OVERHEAD = 1024
"""Bytes kept free for Kafka's framing of one record: a v2 record batch header is 61
bytes and a record's varints a few dozen; the rest is margin."""
_KEEP_KEY = 1024
"""A key longer than this is cut too when a record must be truncated."""


def retry_topic(topic: str) -> str:
    return topic + RETRY_SUFFIX


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record to hand to the retry or dead-letter topic."""

    kind: Literal["retry", "dlq"]
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Abandon:
    """A cache-only retry whose budget is spent: acknowledged, logged and counted."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryHeaders:
    """What a record read from a retry topic says about itself."""

    topic: str
    origin: Origin
    attempt: int
    first_failure_ms: int | None
    cache_only: bool


def _headers(
    msg: Message, reason: str, extra: Mapping[str, object]
) -> tuple[tuple[str, bytes], ...]:
    base: dict[str, object] = {
        "reason": reason,
        "topic": msg.origin.topic,
        "partition": msg.origin.partition,
        "offset": msg.origin.offset,
        **extra,
    }
    return tuple((k, str(v).encode("utf-8")) for k, v in base.items())


def dead_letter(work: Work, reason: str, first_failure_ms: int | None = None) -> Outgoing:
    """The DLQ copy of a work's record (whole: `fit` cuts it if needed)."""
    msg = work.message
    extra: dict[str, object] = {"attempt": msg.attempt}
    first = msg.first_failure_ms if first_failure_ms is None else first_failure_ms
    if first is not None:
        extra["first_failure_ms"] = first
    return Outgoing("dlq", dlq_topic(msg.topic), msg.key, msg.value, _headers(msg, reason, extra))


def route_of(work: Work, budget_ms: int, now_ms: int) -> Outgoing | Abandon | None:
    """Where a failed work goes, or None when it needs no routing."""
    msg = work.message
    reason = work.reason or "unknown"
    if work.status == "malformed":
        return dead_letter(work, reason)
    if work.status != "transient":
        return None
    first = msg.first_failure_ms if msg.first_failure_ms is not None else now_ms
    if now_ms - first >= budget_ms:
        spent = f"{msg.attempt} retries over {(now_ms - first) / 1000:.0f}s"
        if work.cache_only:
            return Abandon(f"cache write abandoned after {spent}: {reason}")
        return dead_letter(work, f"gave up after {spent}: {reason}", first)
    extra: dict[str, object] = {"attempt": msg.attempt + 1, "first_failure_ms": first}
    if work.cache_only:
        extra[TIERS_HEADER] = "redis"
    return Outgoing(
        "retry", retry_topic(msg.topic), msg.key, msg.value, _headers(msg, reason, extra)
    )


def wire_size(out: Outgoing) -> int:
    """An upper bound of the bytes `out` takes in a produce request."""
    heads = sum(len(k) + len(v) for k, v in out.headers)
    return len(out.key or b"") + len(out.value or b"") + heads + RECORD_OVERHEAD


def fit(out: Outgoing, limit: int) -> Outgoing | None:
    """`out` if it fits in `limit` bytes; a DLQ record cut to fit (value first, then a
    long key), with `truncated` and `original_size` headers; None for a retry record
    that does not fit (a cut copy could not be retried)."""
    if wire_size(out) <= limit:
        return out
    if out.kind == "retry":
        return None
    key, value = out.key, out.value or b""
    extra: list[tuple[str, bytes]] = [
        ("truncated", b"true"),
        ("original_size", str(len(value)).encode()),
    ]
    if key is not None and len(key) > _KEEP_KEY:
        extra.append(("original_key_size", str(len(key)).encode()))
        key = key[:_KEEP_KEY]
    cut = Outgoing(out.kind, out.topic, key, b"", (*out.headers, *extra))
    room = max(0, limit - wire_size(cut))
    return Outgoing(cut.kind, cut.topic, key, value[:room], cut.headers)


def parse_retry_headers(
    headers: Sequence[tuple[str, bytes | None]] | None, read_topic: str, partition: int, offset: int
) -> RetryHeaders:
    """What a record read from a retry topic carries.

    Missing or unreadable headers fall back to the retry topic's own name and
    position and attempt 1, so a hand-made retry record is still processed.
    """
    h: dict[str, str] = {}
    for k, v in headers or ():
        if v is not None:
            h[k] = v.decode("utf-8", "replace")
    topic = h.get("topic") or read_topic.removesuffix(RETRY_SUFFIX)
    origin = Origin(topic, _int(h.get("partition"), partition), _int(h.get("offset"), offset))
    attempt = max(1, _int(h.get("attempt"), 1))
    first = h.get("first_failure_ms")
    return RetryHeaders(
        topic,
        origin,
        attempt,
        _int(first, 0) if first is not None else None,
        h.get(TIERS_HEADER) == "redis",
    )


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
