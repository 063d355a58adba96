"""The feature catalog at `/ui`: every group, topic and batch job, with live figures.

Pages are HTML rendered here (Jinja2, every value escaped) with a little JavaScript and
nothing from anywhere else, so the catalog works offline. `/ui/...` answers a shell: the
page chrome and the script. The content comes from `/ui/part/...`, which needs the token
like the API: with `FEATUREPLANE_TOKEN` set, the script asks for it once a tab and sends
it as `Authorization: Bearer`; without one, the shell carries the content inline, so the
page is one request. The lookup box calls the API itself (`GET /v1/features/...`).

Figures (freshness, items written, hit rates, retried and dead-lettered records, the
state of batch runs) come from `featureplane.serving.figures`; a page never waits more than
`FIGURES_WAIT_S` for them: it shows what the last scrape said, or "unavailable".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import jinja2
from aiohttp import web

from featureplane.jobs import BatchJob
from featureplane.serving.figures import (
    Source,
    Window,
    group_figures,
    job_states,
    topic_figures,
)
from featureplane.spec import Catalog, FeatureGroup, IngestionRule

__all__ = ["FIGURES_WAIT_S", "CatalogPages", "CatalogParts", "Graph", "Letters", "graph_of"]

FIGURES_WAIT_S = 0.25
"""The longest a page waits for a scrape of the metrics; the scrape goes on after it."""
_UI = Path(__file__).parent / "ui"
_STATIC = {
    "catalog.css": "text/css",
    "catalog.js": "text/javascript",
}
T = TypeVar("T")
Letters = Mapping[str, Sequence[Mapping[str, Any]]]
"""topic -> its newest dead letters: {ts, reason, source, size} each."""
_LETTERS_EVERY_S = 10.0
_EMPTY = Window(None, {}, {})
_PAGES = ("/ui", "/ui/groups", "/ui/groups/{name}", "/ui/topics", "/ui/jobs")


@dataclass(frozen=True, slots=True)
class CatalogParts:
    """What the catalog reads beyond the server, given by the command that starts it
    (serving imports neither batch nor Kafka code): both blocking, run in a thread."""

    batch_runs: Callable[[], Mapping[str, Mapping[str, str]]] | None = None
    """Each batch job's last run on this machine: {job: {state, when}}."""
    dead_letters: Callable[[Sequence[str]], Letters] | None = None
    """The newest records of each event topic's DLQ (`featureplane.batch.dlq.newest`)."""


@dataclass(frozen=True, slots=True)
class Graph:
    """The M:N graph around a group, laid out: topics, the rules they feed, those groups."""

    width: int
    height: int
    nodes: tuple[tuple[str, str, int, int, bool], ...]
    """(kind, name, x, y, on the group's own path)."""
    edges: tuple[tuple[int, int, int, int, bool], ...]
    """(x1, y1, x2, y2, on the group's own path)."""


_COL = (8, 200, 392)
_NODE_W = 180
_ROW = 34


def graph_of(catalog: Catalog, group: str) -> Graph:
    """Topics feeding `group`, every rule of those topics (the fan-out), and the groups
    those rules feed; the group's own rules and topics marked."""
    own = [r for r in catalog.rules if r.group == group]
    topics = sorted({r.topic for r in own})
    rules = [r for r in catalog.rules if r.topic in topics]
    groups = sorted({r.group for r in rules} | {group})
    y_of: dict[tuple[str, str], int] = {}
    nodes: list[tuple[str, str, int, int, bool]] = []
    for col, (kind, names) in enumerate(
        (("topic", topics), ("rule", [r.name for r in rules]), ("group", groups))
    ):
        for i, name in enumerate(names):
            y = 8 + i * _ROW
            y_of[kind, name] = y
            mine = kind != "rule" and (kind == "topic" or name == group)
            nodes.append((kind, name, _COL[col], y, mine or any(r.name == name for r in own)))
    edges: list[tuple[int, int, int, int, bool]] = []
    half = 12
    for r in rules:
        mine = r.group == group
        ry = y_of["rule", r.name] + half
        edges.append((_COL[0] + _NODE_W, y_of["topic", r.topic] + half, _COL[1], ry, mine))
        edges.append((_COL[1] + _NODE_W, ry, _COL[2], y_of["group", r.group] + half, mine))
    rows = max(len(topics), len(rules), len(groups), 1)
    return Graph(_COL[2] + _NODE_W + 8, 8 + rows * _ROW, tuple(nodes), tuple(edges))


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "unavailable"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.0f} min"


def _percent(value: float | None) -> str:
    return "unavailable" if value is None else f"{value * 100:.1f}%"


def _count(value: float | None) -> str:
    if value is None:
        return "unavailable"
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:,.1f}"


def _millis(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    return f"{value}ms"


def _when(ms: int | None) -> str:
    if not ms or ms < 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


class CatalogPages:
    """The catalog's handlers over one catalog and one figure source."""

    def __init__(
        self,
        catalog: Catalog,
        source: Source | None,
        *,
        token_required: bool,
        runs: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
        tiers: frozenset[str] = frozenset({"local", "redis", "store"}),
        dead_letters: Callable[[Sequence[str]], Letters] | None = None,
    ) -> None:
        """`tiers`: those this server has (no Redis URL: no redis tier); `runs`: each batch
        job's last run ({job: {state, when}}); `dead_letters`: the newest records of each
        topic's DLQ (`batch.dlq.newest`; blocking, so it runs in a thread)."""
        self.catalog = catalog
        self.tiers = tiers
        self.dead_letters = dead_letters
        self._letters: _Latest[Letters | str] = _Latest(
            "reading the dead-letter topics…", every_s=_LETTERS_EVERY_S
        )
        self.source = source
        self.token_required = token_required
        self.runs = runs
        self._figures: _Latest[Window] = _Latest(_EMPTY)
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_UI),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters |= {
            "seconds": _seconds,
            "percent": _percent,
            "count": _count,
            "millis": _millis,
            "when": _when,
        }
        self.env = env
        self._static = {name: (_UI / name).read_bytes() for name in _STATIC}
        self._fed_by = _fed_by(catalog)

    async def aclose(self) -> None:
        self._figures.cancel()
        self._letters.cancel()
        if self.source is not None:
            await self.source.aclose()

    # ------------------------------------------------------------ figures

    async def window(self) -> Window:
        """The figures, waiting at most `FIGURES_WAIT_S` for a scrape under way."""
        if self.source is None:
            return _EMPTY
        return await self._figures.get(self.source.window)

    # ------------------------------------------------------------ handlers

    def routes(
        self,
    ) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], bool]]:
        """(method, path, handler, needs the token) of every catalog route: the shell and
        its script and stylesheet hold no data; the parts do."""
        shell = [("GET", path, self.shell, False) for path in _PAGES]
        return [
            *shell,
            ("GET", "/ui/static/{name}", self.static, False),
            ("GET", "/ui/part/groups", self.groups, True),
            ("GET", "/ui/part/groups/{name}", self.group, True),
            ("GET", "/ui/part/topics", self.topics, True),
            ("GET", "/ui/part/jobs", self.jobs, True),
        ]

    async def shell(self, request: web.Request) -> web.Response:
        inline = None
        if not self.token_required:  # the content in the same answer: one request a page
            inline = await self._part_of(request.path)
        html = self.env.get_template("shell.html").render(
            inline=inline, token_required=self.token_required
        )
        return _html(html, 200 if inline is None else inline[0])

    async def _part_of(self, path: str) -> tuple[int, str]:
        rest = path.removeprefix("/ui").strip("/")
        if rest in ("", "groups"):
            return 200, await self._groups()
        if rest.startswith("groups/"):
            return await self._group(rest.removeprefix("groups/"))
        if rest == "topics":
            return 200, await self._topics()
        if rest == "jobs":
            return 200, await self._jobs()
        return 404, self._not_found(f"no page {path}")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._static:
            return _html(self._not_found(f"no file {name}"), 404)
        return web.Response(
            body=self._static[name],
            content_type=_STATIC[name],
            headers={"Cache-Control": "no-cache"},
        )

    async def groups(self, request: web.Request) -> web.Response:
        return _html(await self._groups())

    async def group(self, request: web.Request) -> web.Response:
        status, html = await self._group(request.match_info["name"])
        return _html(html, status)

    async def topics(self, request: web.Request) -> web.Response:
        return _html(await self._topics())

    async def jobs(self, request: web.Request) -> web.Response:
        return _html(await self._jobs())

    # ------------------------------------------------------------ pages

    def _not_found(self, message: str) -> str:
        return self.env.get_template("not_found.html").render(message=message)

    async def _groups(self) -> str:
        window = await self.window()
        rows = [(g, group_figures(window, g.name)) for g in self.catalog.groups.values()]
        return self.env.get_template("groups.html").render(
            rows=rows, window=window, facets=_facets(self.catalog), served=self.tiers
        )

    async def _group(self, name: str) -> tuple[int, str]:
        group = self.catalog.groups.get(name)
        if group is None:
            return 404, self._not_found(f"no feature group {name!r}")
        window = await self.window()
        jobs = [
            job
            for job in self.catalog.jobs.values()
            if (job.load is not None and job.load.group == name)
            or (job.backfill is not None and name in _backfill_groups(self.catalog, job))
        ]
        html = self.env.get_template("group.html").render(
            group=group,
            figures=group_figures(window, name),
            window=window,
            rules=self._fed_by.get(name, []),
            graph=graph_of(self.catalog, name),
            jobs=jobs,
            tiers=[t for t in group.tiers if t in self.tiers],
            skipped=[t for t in group.tiers if t not in self.tiers],
        )
        return 200, html

    async def _topics(self) -> str:
        window = await self.window()
        rows = [
            (
                topic,
                [r for r in self.catalog.rules if r.topic == topic],
                topic_figures(window, topic),
            )
            for topic in self.catalog.topics
        ]
        letters: Letters | str = "no Kafka bootstrap configured"
        if self.dead_letters is not None and self.catalog.topics:
            letters = await self._letters.get(self._read_letters)
        return self.env.get_template("topics.html").render(
            rows=rows, window=window, letters=letters
        )

    async def _read_letters(self) -> Letters | str:
        assert self.dead_letters is not None
        try:
            return await asyncio.to_thread(self.dead_letters, self.catalog.topics)
        except Exception as exc:  # a broker down or refusing us: the page says so
            return f"the dead-letter topics cannot be read: {type(exc).__name__}: {exc}"[:500]

    async def _jobs(self) -> str:
        window = await self.window()
        states = job_states(window)
        runs: Mapping[str, Mapping[str, Any]] = {}
        runs_error = None
        if self.runs is not None:
            try:
                runs = await asyncio.to_thread(self.runs)
            except Exception as exc:  # a locked or broken runs database: the page says so
                runs_error = f"{type(exc).__name__}: {exc}"[:300]
        return self.env.get_template("jobs.html").render(
            jobs=list(self.catalog.jobs.values()),
            states=states,
            runs=runs,
            runs_error=runs_error,
            window=window,
            groups_of=lambda job: _backfill_groups(self.catalog, job),
        )


class _Latest(Generic[T]):
    """The latest result of a slow call that a page must not wait long for: a call starts
    when none is under way, a page waits at most `FIGURES_WAIT_S` for it, and otherwise
    shows the result before (the call goes on and the next page has it)."""

    def __init__(self, initial: T, every_s: float = 0.0) -> None:
        """`every_s`: a finished call's result is kept that long before the next call."""
        self.value = initial
        self.every_s = every_s
        self._task: asyncio.Task[T] | None = None
        self._ended = -math.inf

    async def get(self, call: Callable[[], Awaitable[T]]) -> T:
        now = time.monotonic()
        if self._task is not None and self._task.done() and self._ended == -math.inf:
            self._ended = now
        if self._task is None or (self._task.done() and now - self._ended >= self.every_s):
            self._task = asyncio.ensure_future(call())
            self._ended = -math.inf
        try:
            self.value = await asyncio.wait_for(asyncio.shield(self._task), FIGURES_WAIT_S)
        except TimeoutError:
            pass
        return self.value

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _fed_by(catalog: Catalog) -> dict[str, list[IngestionRule]]:
    out: dict[str, list[IngestionRule]] = {}
    for rule in catalog.rules:
        out.setdefault(rule.group, []).append(rule)
    return out


def _backfill_groups(catalog: Catalog, job: BatchJob) -> list[str]:
    """The groups a backfill job writes: those named, else every group its topic feeds."""
    if job.backfill is None:
        return []
    if job.backfill.groups:
        return list(job.backfill.groups)
    return sorted({r.group for r in catalog.rules if r.topic == job.backfill.topic})


def _facets(catalog: Catalog) -> dict[str, list[str]]:
    groups: list[FeatureGroup] = list(catalog.groups.values())
    return {
        "entity": sorted({g.entity for g in groups}),
        "kind": sorted({g.kind for g in groups}),
        "owner": sorted({g.owner for g in groups if g.owner}),
        "tag": sorted({t for g in groups for t in g.tags}),
        "tier": sorted({t for g in groups for t in g.tiers}),
    }
