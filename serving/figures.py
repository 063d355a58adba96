"""Live figures for the catalog pages, from the metrics the processes already export.

A `Source` gives a `Window`: how much each counter and histogram bucket grew over the last
few minutes, and each gauge's value. Two sources:

- `Prometheus` (`FEATUREPLANE_CATALOG_PROMETHEUS_URL`), when one scrapes the fleet: it asks
  for `increase(...[5m])` of the few families the pages use;
- `Endpoints` otherwise: the serving process's own metrics, and the `/metrics` pages of the
  dataflows and of the Pushgateway named in `FEATUREPLANE_CATALOG_METRICS_URLS`, scraped
  when a page asks (at most every 2 s) and kept for 5 minutes, so that a figure covers the
  time between the oldest kept scrape and now; after the first scrape, since each process
  started.

The functions at the bottom (`group_figures`, `topic_figures`, `job_states`) turn a window
into what a page shows; a figure no source holds is None, shown as "unavailable", and the
sources that could not be read are named on the page (`Window.missing`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "FAMILIES",
    "Endpoints",
    "GroupFigures",
    "Prometheus",
    "Source",
    "TopicFigures",
    "Window",
    "group_figures",
    "job_states",
    "quantile",
    "topic_figures",
]

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]
"""A sample: its name (`..._total`, `..._bucket`) and its labels, sorted."""

FRESHNESS = "featureplane_ingest_freshness_seconds_bucket"
WRITTEN = "featureplane_ingest_items_written_total"
CACHE = "featureplane_cache_events_total"
RECORDS = "featureplane_ingest_records_total"
RETRIED = "featureplane_ingest_retry_total"
DEAD = "featureplane_ingest_dlq_total"
RUN_STATE = "featureplane_batch_run_state"
COUNTERS = (FRESHNESS, WRITTEN, CACHE, RECORDS, RETRIED, DEAD)
GAUGES = (RUN_STATE,)
FAMILIES = COUNTERS + GAUGES
"""The samples the pages read; everything else a page scrapes is dropped at once."""

_KEEP_S = 300.0
_MIN_WINDOW_S = 10.0
_MIN_INTERVAL_S = 2.0
_TIMEOUT_S = 1.0
_MAX_PAGE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Window:
    """What the metrics say for a span of time."""

    seconds: float | None
    """The span the increases cover; None: since each process started."""
    increases: Mapping[Key, float]
    gauges: Mapping[Key, float]
    missing: tuple[str, ...] = ()
    """Sources that could not be read, each with why."""


class Source(Protocol):
    async def window(self) -> Window: ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- endpoints


def parse(text: str) -> dict[Key, float]:
    """The samples of `FAMILIES` in a Prometheus text page."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in FAMILIES and not math.isnan(s.value):
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    return out


class _Http:
    """An aiohttp session opened at the first request and closed with the source."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(slots=True)
class _History:
    scrapes: deque[tuple[float, dict[Key, float]]] = field(default_factory=deque)


class Endpoints(_Http):
    """This process's own page (`local`) and the `/metrics` pages at `urls`."""

    def __init__(
        self,
        urls: Sequence[str],
        local: Callable[[], bytes] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(_TIMEOUT_S)
        self.urls = list(urls)
        self.local = local
        self.clock = clock
        self._history: dict[str, _History] = {}
        self._missing: tuple[str, ...] = ()
        self._last = -math.inf
        self._lock = asyncio.Lock()

    async def window(self) -> Window:
        async with self._lock:  # one scrape at a time, whatever the page views
            if self.clock() - self._last >= _MIN_INTERVAL_S:
                await self._scrape()
        return self._window()

    async def _scrape(self) -> None:
        now = self._last = self.clock()
        pages: dict[str, Awaitable[str]] = {url: self._fetch(url) for url in self.urls}
        results: dict[str, str | BaseException] = {}
        if self.local is not None:
            results["this server"] = self.local().decode()
        got = await asyncio.gather(*pages.values(), return_exceptions=True)
        results.update(zip(pages, got, strict=True))
        missing = []
        for name, page in results.items():
            try:
                if isinstance(page, BaseException):
                    raise page
                samples = parse(page)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                missing.append(f"{name}: {_why(exc)}")
                continue
            history = self._history.setdefault(name, _History())
            history.scrapes.append((now, samples))
            while history.scrapes and now - history.scrapes[0][0] > _KEEP_S:
                history.scrapes.popleft()
        self._missing = tuple(missing)

    async def _fetch(self, url: str) -> str:
        async with self.session.get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = await resp.content.read(_MAX_PAGE + 1)
            if len(body) > _MAX_PAGE:
                raise ValueError(f"page over {_MAX_PAGE // 2**20} MiB")
            return body.decode("utf-8", "replace")

    def _window(self) -> Window:
        increases: dict[Key, float] = {}
        gauges: dict[Key, float] = {}
        spans: list[float | None] = []
        for history in self._history.values():
            if not history.scrapes:
                continue
            t1, newest = history.scrapes[-1]
            if self._last - t1 > _MIN_INTERVAL_S:  # not read in the last scrape: gone
                continue
            for key, value in newest.items():
                if key[0] in GAUGES:
                    gauges[key] = gauges.get(key, 0.0) + value
            t0 = history.scrapes[0][0]
            if t1 - t0 >= _MIN_WINDOW_S:  # every scrape kept, the last 5 minutes
                spans.append(t1 - t0)
                grew = _increase([samples for _, samples in history.scrapes])
            else:  # too short a span to be a rate: the totals, since the process started
                spans.append(None)
                grew = _increase([{}, newest])
            for key, value in grew.items():
                increases[key] = increases.get(key, 0.0) + value
        seconds = None if not spans or None in spans else min(s for s in spans if s)
        return Window(seconds, increases, gauges, tuple(sorted(self._missing)))


def _increase(scrapes: Sequence[Mapping[Key, float]]) -> dict[Key, float]:
    """What each counter grew by from the first scrape to the last, as Prometheus's
    `increase` counts it: a value that went down was reset (a restart), and grew by all
    it holds after."""
    out: dict[Key, float] = {}
    for before, after in itertools.pairwise(scrapes):
        for key, value in after.items():
            if key[0] in GAUGES:
                continue
            old = before.get(key, 0.0)
            out[key] = out.get(key, 0.0) + (value - old if value >= old else value)
    return out


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------- Prometheus


class Prometheus(_Http):
    """A Prometheus server's HTTP API: `increase` of each family over 5 minutes."""

    _SPAN = "5m"

    def __init__(self, url: str) -> None:
        super().__init__(2.0)
        self.url = url.rstrip("/") + "/api/v1/query"

    async def window(self) -> Window:
        queries = {name: f"increase({name}[{self._SPAN}])" for name in COUNTERS}
        queries |= {name: name for name in GAUGES}
        got = await asyncio.gather(
            *(self._query(q) for q in queries.values()), return_exceptions=True
        )
        increases: dict[Key, float] = {}
        gauges: dict[Key, float] = {}
        missing: list[str] = []
        for name, result in zip(queries, got, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(
                    result, aiohttp.ClientError | TimeoutError | OSError | ValueError
                ):
                    raise result
                missing.append(f"Prometheus ({name}): {_why(result)}")
                continue
            into = gauges if name in GAUGES else increases
            for labels, value in result:
                key = (name, labels)
                into[key] = into.get(key, 0.0) + value
        return Window(300.0, increases, gauges, tuple(sorted(set(missing))))

    async def _query(self, query: str) -> list[tuple[Labels, float]]:
        async with self.session.get(self.url, params={"query": query}) as resp:
            doc = await resp.json(content_type=None)
        if not isinstance(doc, dict) or doc.get("status") != "success":
            raise ValueError(str(doc.get("error") if isinstance(doc, dict) else doc)[:200])
        out = []
        for row in doc.get("data", {}).get("result", []):
            labels = {k: str(v) for k, v in row.get("metric", {}).items() if k != "__name__"}
            value = float(row["value"][1])
            if not math.isnan(value):
                out.append((tuple(sorted(labels.items())), value))
        return out


# ---------------------------------------------------------------- figures


@dataclass(frozen=True, slots=True)
class GroupFigures:
    freshness_p50: float | None
    """Seconds from event time to write, over the window; None when nothing was written."""
    freshness_p99: float | None
    items_per_minute: float | None
    """Items written to the store; None without a span (since start) or any ingest source."""
    items_written: float
    tiers: Mapping[str, Mapping[str, float]]
    """tier -> event (hit, miss, negative_hit, ...) -> count over the window."""

    def hit_rate(self, tier: str) -> float | None:
        """Hits and negative hits over every lookup of `tier`; None without lookups."""
        events = self.tiers.get(tier, {})
        asked = sum(events.get(e, 0.0) for e in ("hit", "negative_hit", "miss", "unanswerable"))
        if not asked:
            return None
        return (events.get("hit", 0.0) + events.get("negative_hit", 0.0)) / asked


@dataclass(frozen=True, slots=True)
class TopicFigures:
    records: float
    records_per_minute: float | None
    retried: float
    dead_lettered: float


def _select(
    values: Mapping[Key, float], name: str, **where: str
) -> Iterable[tuple[dict[str, str], float]]:
    for (sample, labels), value in values.items():
        if sample != name:
            continue
        found = dict(labels)
        if all(found.get(k) == v for k, v in where.items()):
            yield found, value


def _total(values: Mapping[Key, float], name: str, **where: str) -> float:
    return sum(v for _, v in _select(values, name, **where))


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus's `histogram_quantile` over cumulative bucket counts (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]) or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def group_figures(window: Window, group: str) -> GroupFigures:
    buckets: dict[float, float] = {}
    for labels, value in _select(window.increases, FRESHNESS, group=group, flow="ingest"):
        try:
            bound = float(labels.get("le", ""))
        except ValueError:
            continue
        buckets[bound] = buckets.get(bound, 0.0) + value
    written = _total(window.increases, WRITTEN, group=group, tier="store")
    per_minute = written * 60 / window.seconds if window.seconds else None
    tiers: dict[str, dict[str, float]] = {}
    for labels, value in _select(window.increases, CACHE, group=group):
        events = tiers.setdefault(labels.get("tier", "?"), {})
        event = labels.get("event", "?")
        events[event] = events.get(event, 0.0) + value
    return GroupFigures(
        freshness_p50=quantile(0.5, buckets),
        freshness_p99=quantile(0.99, buckets),
        items_per_minute=per_minute,
        items_written=written,
        tiers=tiers,
    )


def topic_figures(window: Window, topic: str) -> TopicFigures:
    records = _total(window.increases, RECORDS, topic=topic, flow="ingest")
    return TopicFigures(
        records=records,
        records_per_minute=records * 60 / window.seconds if window.seconds else None,
        retried=_total(window.increases, RETRIED, topic=topic),
        dead_lettered=_total(window.increases, DEAD, topic=topic),
    )


def job_states(window: Window) -> dict[str, str]:
    """job -> the state of its latest run, from the batch metrics (Pushgateway)."""
    return {
        labels["job"]: labels["state"]
        for labels, value in _select(window.gauges, RUN_STATE)
        if value == 1 and "job" in labels and "state" in labels
    }
