"""`featureplane redrive TOPIC.dlq` against the real tansu broker and the embedded store.

The main test fills the DLQ with the real ingest dataflow (search events whose
`result_count` is not the int the spec wants), fixes the spec and redrives;
the others produce DLQ records whose headers are built by the code ingestion
uses (`operators.route.dead_letter`, `fit`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from featureplane.batch.redrive import spec_hash
from featureplane.cli import main
from featureplane.operators.records import Message, Origin, Work
from featureplane.operators.route import Outgoing, dead_letter, fit
from featureplane.spec import load_catalog
from featureplane.stores.base import Query
from tests.integration.ingest_env import PARTITIONS, Env, now_ms, wait_for

SEARCHES = "recent_user_searches"
INT_TYPE = "      - {name: result_count, type: int, description: Results the search returned.}\n"
STRING_TYPE = (
    "      - {name: result_count, type: string, description: Results the search returned.}\n"
)


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Env]:
    e = Env(tmp_path, kafka_bootstrap)
    yield e
    e.cleanup()


def search(i: int, ts: int, count: object) -> bytes:
    return json.dumps(
        {
            "event_id": f"search-{i}",
            "event_type": "search",
            "ts": ts,
            "user_id": f"u{i}",
            "query": f"bike {i}",
            "result_count": count,
        }
    ).encode()


def redrive(env: Env, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the command in this process; its status and what it printed on stderr."""
    dlq = env.topic("user-actions") + ".dlq"
    argv = ["redrive", dlq, "--spec", str(env.dir / "spec"), "--bootstrap", env.bootstrap]
    code = main([*argv, "--data-dir", str(env.data), *args])
    return code, capsys.readouterr().err


def fix_spec(env: Env) -> None:
    groups = env.dir / "spec" / "groups.yaml"
    text = groups.read_text()
    assert INT_TYPE in text
    groups.write_text(text.replace(INT_TYPE, STRING_TYPE))


def headers(m: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in m.headers() or ()}


@pytest.mark.slow  # the ingest dataflow fills the DLQ: ~20 s
def test_a_spec_fix_reingests_each_record_once_and_what_fails_again_goes_back(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    t = now_ms() - 60_000
    values = [search(i, t + i, i) for i in range(20)]
    values += [search(i, t + i, "many") for i in range(20, 30)]  # the spec wants an int
    values.append(b'{"event_id": "x", oops')
    env.produce("user-actions", values)
    proc = env.start()
    wait_for(env.all_committed, 90, env, "offsets committed to the end")
    assert env.stop(proc) == 0
    dlq = env.topic("user-actions") + ".dlq"
    assert len(env.read_topic(dlq, 11)) == 11
    assert env.rows(SEARCHES) == 20

    # Under the same spec every record fails again: back to the DLQ, marked as redriven.
    code, err = redrive(env, capsys)
    assert code == 0, err
    assert f"11 read, 11 selected, 0 re-ingested, 11 failed again (11 sent back to {dlq})" in err
    assert "result_count" in err and "not valid JSON" in err  # the top reasons
    spec_v1 = spec_hash(load_catalog(env.dir / "spec"), env.topic("user-actions"))
    records = env.read_topic(dlq, 22)
    assert len(records) == 22
    firsts = {f"{m.partition()}:{m.offset()}": m for m in records if "redrive_of" not in headers(m)}
    again = [m for m in records if "redrive_of" in headers(m)]
    assert len(firsts) == len(again) == 11
    for m in again:
        h, first = headers(m), firsts[headers(m)["redrive_of"]]
        assert h["redrive_spec"] == spec_v1
        assert m.value() == first.value() and m.key() == first.key()
        for name in ("topic", "partition", "offset", "attempt"):
            assert h[name] == headers(first)[name], name
        assert h["topic"] == env.topic("user-actions")
        assert h["reason"] == headers(first)["reason"]  # the same spec, the same failure

    # Again under the same spec: nothing is tried, nothing is sent back.
    code, err = redrive(env, capsys)
    assert code == 0, err
    assert "22 read, 0 selected, 0 re-ingested, 0 failed again, 22 skipped " in err
    assert "(11 already redriven, 11 failed under this same spec)" in err
    assert len(env.read_topic(dlq, 22)) == 22  # and nothing beyond

    # The fix: result_count is a string. The ten are re-ingested, the bad JSON fails again.
    fix_spec(env)
    spec_v2 = spec_hash(load_catalog(env.dir / "spec"), env.topic("user-actions"))
    assert spec_v2 != spec_v1
    code, err = redrive(env, capsys)
    assert code == 0, err
    assert f"22 read, 11 selected, 10 re-ingested, 1 failed again (1 sent back to {dlq})" in err
    assert "11 skipped (11 already redriven)" in err
    assert env.rows(SEARCHES) == 30
    env.catalog = load_catalog(env.dir / "spec")
    got = env.read([Query(SEARCHES, f"u{i}", limit=50) for i in range(20, 30)])
    assert all(len(items) == 1 and items[0]["result_count"] == "many" for items in got)
    records = env.read_topic(dlq, 23)
    assert len(records) == 23
    latest = [m for m in records if headers(m).get("redrive_spec") == spec_v2]
    assert len(latest) == 1 and latest[0].value() == values[-1]
    assert "not valid JSON" in headers(latest[0])["reason"]

    # Twice: the store is unchanged (written by event id) and the DLQ holds nothing new.
    before = env.snapshot()
    code, err = redrive(env, capsys)
    assert code == 0, err
    assert "23 read, 10 selected, 10 re-ingested, 0 failed again, 13 skipped " in err
    assert "(12 already redriven, 1 failed under this same spec)" in err
    assert env.snapshot() == before
    assert len(env.read_topic(dlq, 23)) == 23


# ---------------------------------------------------------------- DLQ records made here


def make_topic(env: Env, name: str, partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": env.bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, replication_factor=1)]).values():
        fut.result(30)


def dead_letters(env: Env, records: list[tuple[bytes, str, int, int]], limit: int = 0) -> None:
    """(value, reason, DLQ timestamp, original offset) each, as ingestion dead-letters them;
    `limit`: cut to this size (`truncated` headers), as `fit` does a record too large."""
    source = env.topic("user-actions")
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for i, (value, reason, ts, offset) in enumerate(records):
        origin = Origin(source, i % 2, offset)
        work = Work(Message(source, origin.partition, offset, f"k{i}".encode(), value, origin))
        out: Outgoing | None = dead_letter(work, reason)
        if limit:
            out = fit(out, limit)
        assert out is not None
        producer.produce(
            out.topic,
            out.value,
            out.key,
            partition=i % 2,
            headers=list(out.headers),
            timestamp=ts,
        )
    assert producer.flush(30) == 0


def test_filters_and_dry_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    dlq = env.topic("user-actions") + ".dlq"
    make_topic(env, dlq)
    t = now_ms() - 3_600_000
    gave_up = "gave up after 12 retries over 3600s: store: write timed out"
    bad = "rule searches_to_recent: result_count: expected int"
    dead_letters(
        env,
        [(search(i, t, i), gave_up if i >= 5 else bad, t + i * 1000, i) for i in range(10)],
    )

    code, err = redrive(env, capsys, "--dry-run")
    assert code == 0, err
    assert "(dry run: nothing written): 10 read, 10 selected, 10 would be re-ingested" in err
    assert not env.data.exists()  # no store opened
    assert len(env.read_topic(dlq, 10)) == 10  # nothing sent back

    window = ["--from", str(t + 2000), "--to", str(t + 6000)]
    code, err = redrive(env, capsys, "--reason", "GAVE UP", *window)
    assert code == 0, err
    assert "10 read, 2 selected, 2 re-ingested, 0 failed again" in err
    got = env.read([Query(SEARCHES, f"u{i}", limit=50) for i in range(10)])
    assert [len(items) for items in got] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]

    code, err = redrive(env, capsys, *window)
    assert code == 0, err
    assert "10 read, 5 selected, 5 re-ingested, 0 failed again" in err
    got = env.read([Query(SEARCHES, f"u{i}", limit=50) for i in range(10)])
    assert [len(items) for items in got] == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert env.rows(SEARCHES) == 5


def test_bad_input(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    source = env.topic("user-actions")
    dlq = source + ".dlq"
    base = ["--spec", str(env.dir / "spec"), "--bootstrap", env.bootstrap]
    base += ["--data-dir", str(env.data)]

    assert main(["redrive", source, *base]) == 1
    assert (
        f"redrive reads a dead-letter topic, TOPIC.dlq; got {source!r}" in capsys.readouterr().err
    )
    assert main(["redrive", "nobody-reads-this.dlq", *base]) == 1
    assert "no ingestion rule reads topic 'nobody-reads-this'" in capsys.readouterr().err
    assert main(["redrive", dlq, *base]) == 1
    assert f"topic {dlq!r} does not exist" in capsys.readouterr().err

    make_topic(env, dlq)
    code, err = redrive(env, capsys)
    assert code == 0, err
    assert f"redrive {dlq}: 0 read, 0 selected, 0 re-ingested, 0 failed again" in err

    t = now_ms() - 60_000
    dead_letters(env, [(b"{not json", "not valid JSON: unexpected character", t, 7)])
    big = [search(i, t, "x" * 5000) for i in range(2)]
    dead_letters(env, [(big[0], "too large", t, 3), (big[1], "too large", t, 8)], limit=2048)
    code, err = redrive(env, capsys)
    assert code == 0, err
    assert "3 read, 3 selected, 0 re-ingested, 3 failed again (1 sent back to " in err
    assert "2 truncated, left where they are)" in err
    assert f"truncated in the DLQ: the original is at {source}[0]@3" in err
    assert f"truncated in the DLQ: the original is at {source}[1]@8" in err
    records = env.read_topic(dlq, 4)
    assert len(records) == 4  # only the bad JSON went back
    (back,) = [m for m in records if "redrive_of" in headers(m)]
    assert back.value() == b"{not json" and "not valid JSON" in headers(back)["reason"]
    assert env.rows(SEARCHES) == 0
