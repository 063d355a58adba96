"""How feature items sit in Redis: keys, members and script arguments, as pure functions.

Every key is UTF-8 and carries `{#id}` as its Redis Cluster hash tag, so the
value key and negative marker of a (group, id), and the keys of every group
of that id, share one slot:

    value       `prefix + group + "{#" + id + "}"`
    negative    the value key + `":neg"`

One slot for an id: a request for several groups of one id (a user's recent
clicks, keywords, stats) is one script call on one node under Redis Cluster,
not one a group (a read of 32 ids x 3 groups took 3.3-4.2 ms of client CPU
against 6.9-7.6 ms with a tag per (group, id)). One slot for a pair: a read
or write of a (group, id) names both of its keys in one script call, which a
cluster accepts only within a slot.

The marker *extends* the value key: Redis hashes what lies between a key's
first `{` and the first `}` after it, and both sit in the part the keys
share, so they stay in one slot whatever braces the id or the prefix hold
(an id with `}` shortens the tag for all its keys alike); the `#` keeps the
tag from being empty. A prefix that leaves a `{` open makes the group part
of every tag (pairs keep their slot, an id's groups spread); the one prefix
refused is one whose first `{` is followed at once by `}`, an empty tag,
which makes Redis hash each key whole. Group names hold no braces, value keys
end in `}` and markers in `:neg`, so no two (group, id) share a key. The
layout is the same for a standalone Redis and a cluster, so data moved from
one to the other is read as written.

The kinds of value:

    timeseries  a sorted set; every score is 0 and every member is
                `version (26 bytes) + value`, so lexicographic order is time
                order (`keys.version` is fixed-width). Newest first is
                ZREVRANGEBYLEX; `since`/`until` are the lex bounds of
                `keys.version_bounds`.
    latest      a string `version (26 bytes) + value`, replaced only as
                `keys.replaces` says.
    negative    an empty string: "the store has nothing for this (group, id)"
                (the cache tier only).

The store (`stores.redis.RedisStore`) and the cache tier
(`stores.redis_cache.RedisCache`) share this layout and the default prefix,
so either can read what the other wrote. Nothing here does I/O, so the
layout is tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from featureplane.codec import Item, Record
from featureplane.errors import ValidationError
from featureplane.keys import version_bounds
from featureplane.stores import _redis_lua as lua

__all__ = [
    "NEGATIVE_SUFFIX",
    "THROUGH_KEYS",
    "VERSION_LEN",
    "Call",
    "ThroughEntry",
    "by_slot",
    "check_prefix",
    "key_of",
    "lex_range",
    "member_of",
    "negative_key_of",
    "record_of",
    "records_of",
    "stored_of",
    "through_call",
    "through_chunks",
    "timeseries_members",
]

VERSION_LEN = 26
"""Bytes of `keys.version`: 13 digits of ts, `#`, 12 hex digits."""

THROUGH_KEYS = 512
"""Most (group, id) pairs per write-through script call: one call costs redis-py about as
much CPU as one single-key call, and this bounds how long one call holds Redis."""

Call = tuple[str, list[bytes], list[bytes | int | str]]
"""One script call: sha, KEYS, ARGV."""

ThroughEntry = tuple[bytes | None, bytes | None, list[bytes | int | str]]
"""One (group, id) of a write-through: value key (None: only clear the marker), negative
marker key to delete (None: none), the value key's ARGV in `lua.CACHE_THROUGH_LUA`."""


def check_prefix(prefix: str) -> str:
    """`prefix`, or `ValidationError` when its hash tag would be empty (see the docstring)."""
    first = prefix.find("{")
    if first >= 0 and prefix[first + 1 : first + 2] == "}":
        raise ValidationError(
            f"redis key prefix {prefix!r}: an empty hash tag {{}} would spread one id's keys"
            " over several Redis Cluster slots"
        )
    return prefix


def key_of(prefix: str, group: str, entity_id: str) -> bytes:
    """The Redis key of one (group, id)."""
    try:
        return f"{prefix}{group}{{#{entity_id}}}".encode()
    except UnicodeEncodeError:
        raise ValidationError(f"id {entity_id!r} is not valid unicode text") from None


NEGATIVE_SUFFIX = b":neg"
"""What a negative marker's key adds to its value key."""


def negative_key_of(prefix: str, group: str, entity_id: str) -> bytes:
    """The key of the negative marker of one (group, id): its value key + `NEGATIVE_SUFFIX`."""
    return key_of(prefix, group, entity_id) + NEGATIVE_SUFFIX


def member_of(item: Item) -> bytes:
    """The stored bytes of one item: its version, then its value."""
    ver = item.version.encode("ascii")
    if len(ver) != VERSION_LEN:
        raise ValidationError(f"version {item.version!r} is not {VERSION_LEN} characters")
    return ver + item.value


def stored_of(record: Record) -> bytes:
    """The stored bytes of a record read from another tier."""
    return record.version.encode("ascii") + record.value


def record_of(stored: bytes) -> Record:
    """Stored bytes (a set member or a latest value) -> Record."""
    ver = stored[:VERSION_LEN].decode("ascii")
    return Record(int(ver[:13]), ver, stored[VERSION_LEN:])


def records_of(reply: bytes | list[bytes] | None) -> list[Record]:
    """A GET (one value or None) or range reply (members) -> newest-first records."""
    if reply is None:
        return []
    if isinstance(reply, bytes):
        return [record_of(reply)]
    # `record_of` inlined: a 30-item read spent a third of its time in the calls.
    n = VERSION_LEN
    return [Record(int(m[:13]), m[:n].decode("ascii"), m[n:]) for m in reply]


def lex_range(since: int | None, until: int | None) -> tuple[bytes, bytes]:
    """(max, min) inclusive ZREVRANGEBYLEX bounds for since <= ts <= until."""
    low, high = version_bounds(since, until)
    return b"[" + high.encode("ascii"), b"[" + low.encode("ascii")


def timeseries_members(items: Sequence[Item], max_items: int, cutoff: int | None) -> list[bytes]:
    """The members one batch adds to a key, oldest first.

    One per version (the last in the batch wins), none older than `cutoff`, and at most
    `max_items`: older ones could not survive the cap whatever the key already holds.
    """
    if len(items) == 1:  # the common case: one event of a key in a batch
        only = items[0]
        return [member_of(only)] if (cutoff is None or only.ts >= cutoff) and max_items else []
    by_version = {i.version: i for i in items if cutoff is None or i.ts >= cutoff}
    newest = sorted(by_version)[-max_items:]
    return [member_of(by_version[v]) for v in newest]


def through_call(entries: Sequence[ThroughEntry]) -> Call:
    """One `lua.CACHE_THROUGH_LUA` call writing `entries`: value keys, then markers."""
    written = [e for e in entries if e[0] is not None]
    keys: list[bytes] = [k for k, _, _ in written if k is not None]
    keys.extend(neg for _, neg, _ in entries if neg is not None)
    args: list[bytes | int | str] = [len(written)]
    for _, _, a in written:
        args.extend(a)
    return lua.CACHE_THROUGH_SHA, keys, args


def by_slot(keys: Sequence[bytes], slot_of: Callable[[bytes], int]) -> list[list[int]]:
    """Indexes of `keys` grouped by hash slot, each group in order, groups by first key."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(slot_of(key), []).append(i)
    return list(groups.values())


def through_chunks(
    entries: Sequence[ThroughEntry], size: int, slot_of: Callable[[bytes], int] | None
) -> list[list[ThroughEntry]]:
    """Runs of at most `size` entries; with `slot_of` (a cluster), one slot per run (an
    entry's value key and marker share their slot)."""
    if slot_of is None:
        return [list(entries[i : i + size]) for i in range(0, len(entries), size)]
    runs: dict[int, list[ThroughEntry]] = {}
    for entry in entries:
        key = entry[0] if entry[0] is not None else entry[1]
        if key is None:
            raise ValueError("a write-through entry without a key")
        runs.setdefault(slot_of(key), []).append(entry)
    return [run[i : i + size] for run in runs.values() for i in range(0, len(run), size)]
