"""Decode and validate Kafka record values into events: the envelope every event must have.

A value that is not a UTF-8 JSON object with a string `event_id`, a string
`event_type` and an integer `ts` (epoch ms) makes the record malformed: the
`Work` comes back with status `malformed` and a reason, never an exception.
Reasons quote the input only through `featureplane.errors.quote` (bounded,
whatever the depth or size).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from featureplane.errors import MalformedError, quote
from featureplane.keys import MAX_TS
from featureplane.operators.records import Event, Work

__all__ = ["decode_event", "decode_works"]


def decode_event(value: bytes | None) -> Event:
    """Bytes -> Event, or raise `MalformedError` saying what is wrong."""
    if value is None:
        raise MalformedError("empty record value")
    try:
        body: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        # orjson refuses nesting deeper than 1,024 here ("depth limit exceeded"), so no
        # later step meets a deeper value; its messages name a position, never the input.
        raise MalformedError(f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise MalformedError(f"not a JSON object but {type(body).__name__}")
    event_id, event_type, ts = body.get("event_id"), body.get("event_type"), body.get("ts")
    # The common case in one test (`type(...) is` excludes bools and subclasses); the
    # checks below say what is wrong otherwise.
    if type(event_id) is str and type(event_type) is str and type(ts) is int:
        if event_id and event_type and 0 <= ts <= MAX_TS:
            return Event(event_id, event_type, ts, body)
    event_id = _text("event_id", event_id)
    event_type = _text("event_type", event_type)
    if ts is None:
        raise MalformedError("missing field ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_TS:
        raise MalformedError(f"ts must be an integer of epoch milliseconds, got {quote(ts)}")
    return Event(event_id, event_type, ts, body)


def _text(name: str, val: Any) -> str:
    if val is None:
        raise MalformedError(f"missing field {name}")
    if not isinstance(val, str) or not val:
        raise MalformedError(f"{name} must be a non-empty string, got {quote(val)}")
    return val


def decode_works(works: Iterable[Work]) -> list[Work]:
    """Decode each pending work's message; malformed ones get status and reason."""
    out: list[Work] = []
    for work in works:
        try:
            out.append(work.with_event(decode_event(work.message.value)))
        except MalformedError as exc:
            out.append(work.with_status("malformed", str(exc)))
    return out
