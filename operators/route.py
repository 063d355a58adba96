"""Routing of failed records to `<topic>.retry` and `<topic>.dlq` (errors are data).

Headers (UTF-8 strings) on both: `reason`, and the original `topic`,
`partition`, `offset`; on retry records also `attempt` (1 for the first
retry) and `first_failure_ms`. A transient failure on attempt n goes back to
the retry topic as attempt n+1 until `max_attempts` is exceeded, then to
the DLQ. Malformed records go to the DLQ at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from operators.records import Message, Origin, Work

__all__ = [
    "DLQ_SUFFIX",
    "RETRY_SUFFIX",
    "Outgoing",
    "dlq_topic",
    "parse_retry_headers",
    "retry_topic",
    "route_of",
]

RETRY_SUFFIX = ".retry"
DLQ_SUFFIX = ".dlq"


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


def route_of(work: Work, max_attempts: int, now_ms: int) -> Outgoing | None:
    """Where a failed work goes, or None when it needs no routing."""
    msg = work.message
    reason = work.reason or "unknown"
    if work.status == "malformed":
        extra: dict[str, object] = {"attempt": msg.attempt}
        if msg.first_failure_ms is not None:
            extra["first_failure_ms"] = msg.first_failure_ms
        return Outgoing(
            "dlq", dlq_topic(msg.topic), msg.key, msg.value, _headers(msg, reason, extra)
        )
    if work.status != "transient":
        return None
    first = msg.first_failure_ms if msg.first_failure_ms is not None else now_ms
    attempt = msg.attempt + 1
    if attempt > max_attempts:
        reason = f"gave up after {msg.attempt} retries: {reason}"
        extra = {"attempt": msg.attempt, "first_failure_ms": first}
        return Outgoing(
            "dlq", dlq_topic(msg.topic), msg.key, msg.value, _headers(msg, reason, extra)
        )
    extra = {"attempt": attempt, "first_failure_ms": first}
    return Outgoing(
        "retry", retry_topic(msg.topic), msg.key, msg.value, _headers(msg, reason, extra)
    )


def parse_retry_headers(
    headers: Sequence[tuple[str, bytes | None]] | None, read_topic: str, partition: int, offset: int
) -> tuple[str, Origin, int, int | None]:
    """(event topic, origin, attempt, first_failure_ms) of a record read from a retry topic.

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
    return topic, origin, attempt, (_int(first, 0) if first is not None else None)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
