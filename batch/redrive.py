"""`featureplane redrive TOPIC.dlq`: send dead-lettered records back through ingestion.

The DLQ is read from its first records to its end when the run starts, with no
consumer group joined and nothing committed (as a backfill reads). Each record
chosen goes through decode, dispatch and aggregate with the catalog as it is
now, as if read from the source topic (the name before `.dlq`), and its items
are written through the batch `Sink` to the tiers ingestion writes. A record
that fails again goes back to the DLQ with its new reason, its original's
headers, and two more: `redrive_of` (the DLQ partition:offset it was read at)
and `redrive_spec` (`spec_hash` of the catalog it failed under), delivered by
an idempotent producer with acks=all.

Running it twice duplicates nothing. Items are written by event id, so a
record re-ingested again overwrites itself. In the DLQ a record is skipped
when a later record names it in `redrive_of` (its successor carries it on), or
when its own `redrive_spec` is the current catalog's (it failed under this
very catalog and would fail the same way). The DLQ is read twice for that:
first to its end for the `redrive_of` headers, then to the same offsets to
process. A record cut to fit the DLQ (`truncated: true`) cannot be
re-ingested: it fails again, pointing at its original, and is never
dead-lettered again.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Literal

import orjson
from confluent_kafka import KafkaException

from featureplane.batch.dlq import REDRIVE_OF, REDRIVE_SPEC, DeadLetter, Dlq, Ranges, partitions
from featureplane.batch.progress import Progress
from featureplane.batch.sink import Sink
from featureplane.errors import FeatureplaneError, ValidationError
from featureplane.lifecycle import broker_error, check_kafka_reachable
from featureplane.operators.aggregate import Aggregator
from featureplane.operators.decode import decode_works
from featureplane.operators.dispatch import Dispatcher
from featureplane.operators.handoff import SMALL_MESSAGE, Delivery
from featureplane.operators.kafka import Deliverer
from featureplane.operators.kafka_cluster import KafkaCluster, max_message_bytes
from featureplane.operators.records import Work
from featureplane.operators.route import DLQ_SUFFIX, Outgoing, dead_letter, fit
from featureplane.settings import Settings
from featureplane.spec import Catalog
from featureplane.stores import open_cache, open_store

__all__ = [
    "RedriveJob",
    "Tally",
    "choose",
    "redrive",
    "run",
    "source_topic",
    "spec_hash",
    "summary",
]


@dataclass(frozen=True, slots=True)
class RedriveJob:
    """Which dead-lettered records to send back, as the command line gives them."""

    topic: str
    """The dead-letter topic, `<source topic>.dlq`."""
    reason: str | None = None
    """Only records whose `reason` header contains this text (any case)."""
    start: int | None = None
    """Only records dead-lettered at or after this time (the DLQ record's timestamp), ms."""
    end: int | None = None
    """Only records dead-lettered at or before this time, ms."""
    dry_run: bool = False
    """Decode, dispatch and aggregate only: write nothing, produce nothing."""


Choice = Literal["filtered", "redriven", "same spec", "truncated", "try"]


def choose(rec: DeadLetter, job: RedriveJob, redriven: set[str], spec: str) -> Choice:
    """What to do with one DLQ record: outside the filters, skip it (a successor carries
    it on, or it failed under this very spec), count a truncated copy, or try it."""
    if job.start is not None and rec.timestamp < job.start:
        return "filtered"
    if job.end is not None and rec.timestamp > job.end:
        return "filtered"
    if job.reason and job.reason.casefold() not in rec.headers.get("reason", "").casefold():
        return "filtered"
    if rec.position in redriven:
        return "redriven"
    if rec.headers.get(REDRIVE_SPEC) == spec:
        return "same spec"
    if rec.headers.get("truncated") == "true":
        return "truncated"
    return "try"


def source_topic(dlq: str) -> str:
    """`user-actions.dlq` -> `user-actions`; anything else is a clear error."""
    if not dlq.endswith(DLQ_SUFFIX) or len(dlq) == len(DLQ_SUFFIX):
        raise FeatureplaneError(
            f"redrive reads a dead-letter topic, TOPIC{DLQ_SUFFIX}; got {dlq!r}"
            f" (try {dlq.removesuffix('.retry')}{DLQ_SUFFIX})"
        )
    return dlq.removesuffix(DLQ_SUFFIX)


def spec_hash(catalog: Catalog, topic: str) -> str:
    """A stable hash of what decides a record of `topic`: the rules reading it and the
    groups they feed (other topics' rules and the batch jobs do not change its fate)."""
    rules = sorted((r for r in catalog.rules if r.topic == topic), key=lambda r: r.name)
    groups = sorted({r.group for r in rules})
    doc = {
        "rules": [r.model_dump(mode="json") for r in rules],
        "groups": [catalog.groups[g].model_dump(mode="json") for g in groups],
    }
    return blake2b(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


@dataclass
class Tally:
    """What a redrive did so far (printed at the end, or when it stops)."""

    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    """Why records failed again, and how many each."""


async def redrive(settings: Settings, catalog: Catalog, job: RedriveJob, tally: Tally) -> None:
    """Send the job's records back through ingestion, counting into `tally`.

    Raises `FeatureplaneError` (nothing half-done that a rerun would not finish)
    when the topic is unknown, Kafka fails, a write fails past its retries, or
    the DLQ does not confirm a record sent back.
    """
    source = source_topic(job.topic)
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        raise FeatureplaneError("no Kafka broker: set FEATUREPLANE_KAFKA_BOOTSTRAP or --bootstrap")
    if job.start is not None and job.end is not None and job.end < job.start:
        raise FeatureplaneError("--to is before --from")
    rules = [r for r in catalog.rules if r.topic == source]
    if not rules:
        raise FeatureplaneError(
            f"no ingestion rule reads topic {source!r}: nothing to redrive into"
        )
    spec = spec_hash(catalog, source)
    check_kafka_reachable(bootstrap)
    kafka = KafkaCluster(bootstrap, settings.kafka_config)
    try:
        dlq = Dlq(kafka, job.topic, partitions(kafka, job.topic))
        ranges, redriven = _first_read(dlq, tally)
        if job.dry_run:
            await _pass(catalog, job, source, spec, redriven, dlq, ranges, tally, None, None)
            return
        delivery = Deliverer(
            kafka,
            {"enable.idempotence": True},  # a retried produce is never written twice
            max_message_bytes=max_message_bytes(kafka, [job.topic]),
        )
        try:
            async with Sink(open_store(settings, catalog), open_cache(settings, catalog)) as sink:
                await _pass(
                    catalog, job, source, spec, redriven, dlq, ranges, tally, sink, delivery
                )
        finally:
            delivery.close()
    except KafkaException as exc:
        raise broker_error(str(kafka), f"redrive {job.topic!r}", exc) from None


def _first_read(dlq: Dlq, tally: Tally) -> tuple[dict[int, tuple[int, int]], set[str]]:
    """The offsets the run covers, and the records that a later one names in `redrive_of`."""
    ranges: dict[int, tuple[int, int]] = {}
    refs: set[str] = set()
    for batch in dlq.scan():
        tally.counts["read"] += len(batch)
        for rec in batch:
            first, end = ranges.get(rec.partition, (rec.offset, rec.offset + 1))
            ranges[rec.partition] = (min(first, rec.offset), max(end, rec.offset + 1))
            ref = rec.headers.get(REDRIVE_OF)
            if ref:
                refs.add(ref)
    return ranges, refs


async def _pass(
    catalog: Catalog,
    job: RedriveJob,
    source: str,
    spec: str,
    redriven: set[str],
    dlq: Dlq,
    ranges: Ranges,
    tally: Tally,
    sink: Sink | None,
    delivery: Delivery | None,
) -> None:
    """The second read: choose, re-ingest and send back (sink/delivery None: a dry run)."""
    dispatcher, aggregator = Dispatcher.from_catalog(catalog), Aggregator(catalog)
    counts, reasons = tally.counts, tally.reasons
    progress = Progress(f"redrive {job.topic}")
    for batch in dlq.scan(ranges):
        tried: list[DeadLetter] = []
        failed = 0
        for rec in batch:
            choice = choose(rec, job, redriven, spec)
            if choice == "filtered":
                continue
            if choice in ("redriven", "same spec"):
                counts[f"skipped {choice}"] += 1
                continue
            counts["selected"] += 1
            if choice == "truncated":
                o = rec.origin(source)
                reasons[
                    f"truncated in the DLQ: the original is at {source}[{o.partition}]@{o.offset}"
                ] += 1
                counts["truncated"] += 1
                failed += 1
            else:
                tried.append(rec)
        works = aggregator.aggregate(
            dispatcher.dispatch(decode_works(Work(r.message(source)) for r in tried))
        )
        if sink is not None:
            works = await _write(sink, works)
        back: list[tuple[DeadLetter, Work]] = []
        for rec, w in zip(tried, works, strict=True):
            if w.status == "malformed":
                back.append((rec, w))
                reasons[w.reason or "unknown"] += 1
            else:
                counts["no rule" if not w.rules else "re-ingested"] += 1
        if delivery is not None:
            _send_back(delivery, job.topic, spec, back)
            counts["sent back"] += len(back)
        failed += len(back)
        counts["failed again"] += failed
        progress.advance(done=len(tried) - len(back), rejected=failed)
    progress.finish()


async def _write(sink: Sink, works: list[Work]) -> list[Work]:
    """Write the items of the pending works; a record the store refuses as invalid fails
    again (as ingestion dead-letters it), anything else past its retries stops the run."""
    try:
        return await sink.writer.write(works)
    except ValidationError:
        pass
    out: list[Work] = []
    for w in works:  # one at a time, to find the ones refused
        try:
            out.extend(await sink.writer.write([w]))
        except ValidationError as exc:
            out.append(w.with_status("malformed", f"write: {type(exc).__name__}: {exc}"[:500]))
    return out


def _send_back(
    delivery: Delivery, dlq: str, spec: str, back: Sequence[tuple[DeadLetter, Work]]
) -> None:
    """Dead-letter the records that failed again, with the redrive headers, confirmed."""
    records: list[Outgoing] = []
    for rec, w in back:
        out = dead_letter(w, w.reason or "unknown")
        heads = (*out.headers, (REDRIVE_OF, rec.position.encode()), (REDRIVE_SPEC, spec.encode()))
        records.append(Outgoing("dlq", out.topic, out.key, out.value, heads))
    # Cut to the topic's limit; a copy refused as too large after all is cut to a size
    # any broker takes (the limit read may have been Kafka's default, not the real one).
    for limit in (delivery.max_message_bytes, SMALL_MESSAGE):
        sized = [fit(r, limit) or r for r in records]
        errors = delivery.deliver(sized)
        failed = [(r, e) for r, e in zip(sized, errors, strict=True) if e is not None]
        if not failed:
            return
        if not all("TOO_LARGE" in e for _, e in failed) or limit == SMALL_MESSAGE:
            raise FeatureplaneError(
                f"cannot send {len(failed)} record(s) back to {dlq}: {failed[0][1]} "
                "(the originals stay in the DLQ; run the redrive again)"
            )
        records = [r for r, _ in failed]


def run(settings: Settings, catalog: Catalog, job: RedriveJob) -> int:
    """Redrive and print what was done, with the top reasons of what failed again.

    Exit status 0 when the run finished, whether or not some records failed again:
    those are back in the DLQ with their new reason (a truncated copy stays where it
    is, pointing at its original), so a scheduled redrive does not fail for what it
    handled. The run stops with status 1 (via `FeatureplaneError`) when it could not
    finish: an unknown topic, Kafka failing, a store write failing past its retries,
    or the DLQ not confirming a record sent back; running it again is safe.
    """
    tally = Tally()
    try:
        asyncio.run(redrive(settings, catalog, job, tally))
    except FeatureplaneError:
        if tally.counts["selected"]:
            print(f"{summary(job, tally)} before it stopped", file=sys.stderr)
        raise
    print(summary(job, tally), file=sys.stderr)
    if tally.reasons:
        what = "would fail again" if job.dry_run else "failed again"
        print(f"{what}, by reason (the most frequent first):", file=sys.stderr)
    for reason, n in tally.reasons.most_common(5):
        print(f"  {n:>6,}  {reason[:300]}", file=sys.stderr)
    if len(tally.reasons) > 5:
        print(f"  ... and {len(tally.reasons) - 5:,} more reasons", file=sys.stderr)
    return 0


def summary(job: RedriveJob, tally: Tally) -> str:
    """`redrive T.dlq: 120 read, 100 selected, 90 re-ingested, 10 failed again (...), ...`"""
    c = tally.counts
    would = "would be " if job.dry_run else ""
    parts = [f"{c['read']:,} read", f"{c['selected']:,} selected"]
    done = f"{c['re-ingested'] + c['no rule']:,} {would}re-ingested"
    if c["no rule"]:
        done += f" ({c['no rule']:,} matched no rule now: nothing to write)"
    parts.append(done)
    again = f"{c['failed again']:,} {'would fail' if job.dry_run else 'failed'} again"
    sent, kept = c["sent back"], c["truncated"]
    if not job.dry_run and sent:
        again += f" ({sent:,} sent back to {job.topic}"
        again += f", {kept:,} truncated, left where they are)" if kept else ")"
    elif kept:
        again += f" ({kept:,} truncated: the originals are in the source topic)"
    parts.append(again)
    skipped = c["skipped redriven"] + c["skipped same spec"]
    if skipped:
        why = []
        if c["skipped redriven"]:
            why.append(f"{c['skipped redriven']:,} already redriven")
        if c["skipped same spec"]:
            why.append(f"{c['skipped same spec']:,} failed under this same spec")
        parts.append(f"{skipped:,} skipped ({', '.join(why)})")
    head = f"redrive {job.topic}" + (" (dry run: nothing written)" if job.dry_run else "")
    return f"{head}: {', '.join(parts)}"
