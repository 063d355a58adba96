"""The embedded store across processes: kill -9 loses nothing acknowledged; readers run beside a writer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from featureplane.stores.base import Query
from featureplane.stores.embedded import EmbeddedStore
from tests.contract.conftest import CATALOG

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from featureplane.codec import make_item
    from featureplane.stores.embedded import EmbeddedStore
    from tests.contract.conftest import CATALOG

    async def main():
        g, p = CATALOG.group("clicks"), CATALOG.group("profile")
        async with EmbeddedStore(CATALOG, sys.argv[1]) as store:
            for b in range(100_000):
                items = [make_item(g, f"u{k}", 1_000 + b, f"e{b}-{k}", {"n": b}) for k in range(20)]
                items.append(make_item(p, "u0", 1_000 + b, f"p{b}", {"updated_by": str(b)}))
                await store.write(items)
                print(b, flush=True)

    asyncio.run(main())
    """
)

READER = textwrap.dedent(
    """
    import asyncio, sys
    from featureplane.stores.base import Query
    from featureplane.stores.embedded import EmbeddedStore
    from tests.contract.conftest import CATALOG

    async def main():
        seen, reads = -1, 0
        async with EmbeddedStore(CATALOG, sys.argv[1]) as store:
            while reads < 3000:
                got = await store.read([Query("profile", "u0"), Query("clicks", "u3", limit=50)])
                if got[0]:
                    ts = got[0][0].ts
                    assert ts >= seen, (ts, seen)  # never goes back in time
                    seen = ts
                reads += 1
        print("ok", reads, seen, flush=True)

    asyncio.run(main())
    """
)

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_kill_9_loses_nothing_acknowledged_and_readers_share_the_file(tmp_path: Path) -> None:
    writer = _python(WRITER, str(tmp_path))
    assert writer.stdout is not None
    first = writer.stdout.readline()  # the schema exists once a batch is acknowledged
    assert first.strip() == "0", writer.stderr.read() if writer.stderr else ""
    readers = [_python(READER, str(tmp_path)) for _ in range(2)]
    acked = 0
    deadline = time.monotonic() + 60
    while acked < 300 and time.monotonic() < deadline:
        acked = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0 and out.startswith("ok"), err

    async def check() -> None:
        async with EmbeddedStore(CATALOG, tmp_path) as store:
            got = await store.read([Query("clicks", f"u{k}", limit=50) for k in range(20)])
            latest = (await store.read([Query("profile", "u0")]))[0]
        for records in got:
            assert records[0].ts >= 1_000 + acked  # everything acknowledged is there
            assert len(records) == 50
        assert latest[0].ts >= 1_000 + acked

    assert acked >= 300
    asyncio.run(check())


TWO_WRITERS = textwrap.dedent(
    """
    import asyncio, sys
    from featureplane.codec import make_item
    from featureplane.stores.embedded import EmbeddedStore
    from tests.contract.conftest import CATALOG

    async def main():
        g, p, w = CATALOG.group("clicks"), CATALOG.group("profile"), sys.argv[2]
        async with EmbeddedStore(CATALOG, sys.argv[1]) as store:
            for b in range(100):
                items = [make_item(g, f"{w}-u{k}", 1_000 + b, f"{w}{b}-{k}", {"n": b})
                         for k in range(40)]
                # one key both write: the newest version wins whichever process wrote last
                items.append(make_item(p, "shared", 1_000 + 2 * b + (w == "b"), f"{w}{b}", {}))
                await store.write(items)
        print("ok", flush=True)

    asyncio.run(main())
    """
)


def test_two_writing_processes_share_one_store_and_lose_nothing(tmp_path: Path) -> None:
    """Two ingest processes on one machine write one embedded store: SQLite lets one write
    transaction in at a time and the other waits (busy timeout), never failing."""
    writers = [_python(TWO_WRITERS, str(tmp_path), w) for w in ("a", "b")]
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0 and out.strip() == "ok", err

    async def check() -> None:
        async with EmbeddedStore(CATALOG, tmp_path) as store:
            keys = [f"{w}-u{k}" for w in ("a", "b") for k in range(40)]
            got = await store.read([Query("clicks", k, limit=50) for k in keys])
            shared = (await store.read([Query("profile", "shared")]))[0]
        assert all(len(records) == 50 and records[0].ts == 1_099 for records in got)
        assert shared[0].ts == 1_000 + 2 * 99 + 1  # b's last, the newest of all

    asyncio.run(check())


async def test_a_read_of_several_queries_is_one_transaction_closed_even_when_one_fails(
    tmp_path: Path,
) -> None:
    """Several queries read one snapshot in one read transaction, which always ends: an open
    one would pin the WAL (no checkpoint could pass it) and hide later writes."""
    from featureplane.codec import make_item
    from featureplane.errors import UnknownGroupError

    async with EmbeddedStore(CATALOG, tmp_path) as store:
        g, p = CATALOG.group("clicks"), CATALOG.group("profile")
        await store.write([make_item(g, "u", 1_000 + k, f"e{k}", {"n": k}) for k in range(3)])
        queries = [Query("clicks", "u", limit=2), Query("profile", "u"), Query("clicks", "x")]
        got = await store.read(queries)
        assert [[r.ts for r in rs] for rs in got] == [[1_002, 1_001], [], []]
        assert got == [(await store.read([q]))[0] for q in queries]  # as one query at a time
        with pytest.raises(UnknownGroupError):
            await store.read([Query("clicks", "u"), Query("nope", "u")])
        assert store._reader is not None and not store._reader.in_transaction
        await store.write([make_item(p, "u", 5, "p", {"updated_by": "a"})])
        assert [r.ts for r in (await store.read(queries))[1]] == [5]  # a later write is seen


async def test_every_commit_is_synced_by_default_so_a_power_loss_loses_no_committed_offset(
    tmp_path: Path,
) -> None:
    """Ingest commits offsets after the write: the write must be on disk, not only in the
    page cache (synchronous FULL = 2 syncs the WAL at each commit; NORMAL = 1 does not)."""
    async with EmbeddedStore(CATALOG, tmp_path) as store:
        for db in (store._writer, store._reader):
            assert db is not None and db.execute("PRAGMA synchronous").fetchone() == (2,)
