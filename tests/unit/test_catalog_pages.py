"""The catalog's pages rendered without a server: every page of the example catalog, the
M:N graph, escaping of what a spec holds, empty and 200-group catalogs, figures missing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from featureplane.serving.catalog import CatalogPages, graph_of
from featureplane.serving.figures import Endpoints, Window
from featureplane.spec import Catalog, load_catalog

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Fixed:
    """A figure source that always says the same."""

    def __init__(self, window: Window) -> None:
        self.given = window

    async def window(self) -> Window:
        return self.given

    async def aclose(self) -> None:
        pass


def catalog_of(yaml: str, tmp_path: Path) -> Catalog:
    (tmp_path / "spec.yaml").write_text(yaml)
    return load_catalog(tmp_path)


async def test_every_page_of_the_examples() -> None:
    catalog = load_catalog(EXAMPLES)
    pages = CatalogPages(catalog, None, token_required=False)
    status, html = await pages._part_of("/ui")
    assert status == 200
    for group in catalog.groups.values():
        assert f'href="/ui/groups/{group.name}"' in html
    assert "team-recs-feed" in html and "ml:embeddings" in html
    status, html = await pages._part_of("/ui/groups/recent_user_clicked_fleaMarketArticles")
    assert status == 200
    assert "The article clicked." in html and "<code>string</code>" in html
    assert "clicks_to_recent" in html and "user-actions" in html  # the rule and topic
    assert "unavailable" in html  # no figure source
    assert 'id="lookup"' in html and 'name="limit"' in html
    _, latest = await pages._part_of("/ui/groups/user_notification_keywords")
    assert 'name="limit"' not in latest  # latest groups take no limit or range
    _, topics = await pages._part_of("/ui/topics")
    assert "user-actions.dlq" in topics
    _, jobs = await pages._part_of("/ui/jobs")
    assert "article_stats_daily" in jobs and "30 3 * * *" in jobs
    assert (await pages._part_of("/ui/groups/nope"))[0] == 404
    assert (await pages._part_of("/ui/whatever"))[0] == 404


def test_the_graph_marks_the_groups_own_path_among_the_fan_out() -> None:
    catalog = load_catalog(EXAMPLES)
    graph = graph_of(catalog, "user_last_click")
    names = {(kind, name): mine for kind, name, _, _, mine in graph.nodes}
    assert names["topic", "user-actions"] is True
    assert names["group", "user_last_click"] is True
    assert names["group", "recent_user_clicked_fleaMarketArticles"] is False  # fan-out
    assert any(mine for *_, mine in graph.edges) and not all(mine for *_, mine in graph.edges)
    assert graph_of(catalog, "request_time_context").nodes == (
        ("group", "request_time_context", 392, 8, True),
    )


async def test_what_a_spec_holds_is_escaped(tmp_path: Path) -> None:
    catalog = catalog_of(
        "feature_groups:\n"
        "  - name: g\n    entity: u\n    kind: timeseries\n"
        "    description: '<script>alert(1)</script> & \"quotes\"'\n"
        "    owner: '<b>me</b>'\n"
        "    tags: ['a/b:c']\n"
        "    features: [{name: f, type: 'map<string,int>', description: '<img src=x onerror=1>'}]\n"
        "ingestion:\n"
        "  - {name: r, topic: 't.x-1', event_type: '<e>', where: {'a.<b>': '</td>'},"
        " group: g, id: '<id>', features: {f: '\"p\"'}}\n",
        tmp_path,
    )
    pages = CatalogPages(catalog, None, token_required=False)
    for path in ("/ui", "/ui/groups/g", "/ui/topics", "/ui/jobs"):
        status, html = await pages._part_of(path)
        assert status == 200
        assert "<script>" not in html and "<img" not in html and "<b>me" not in html, path
        assert "</td>'" not in html
    assert (
        "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#34;quotes&#34;"
        in (await pages._part_of("/ui/groups/g"))[1]
    )


async def test_an_empty_catalog_and_200_groups(tmp_path: Path) -> None:
    empty = CatalogPages(Catalog(groups={}), None, token_required=False)
    for path in ("/ui", "/ui/topics", "/ui/jobs"):
        status, html = await empty._part_of(path)
        assert status == 200 and "No " in html, path
    groups = "".join(
        f"  - {{name: g{i}, entity: user, kind: latest, owner: team{i % 7}, tags: [t{i % 5}],"
        f" features: [{{name: a, type: int}}]}}\n"
        for i in range(200)
    )
    rules = "".join(
        f"  - {{name: r{i}, topic: topic{i % 3}, event_type: e, group: g{i}, id: u,"
        f" features: {{a: a}}}}\n"
        for i in range(200)
    )
    catalog = catalog_of(f"feature_groups:\n{groups}ingestion:\n{rules}", tmp_path)
    pages = CatalogPages(catalog, None, token_required=False)
    await pages._part_of("/ui/groups/g0")  # templates compiled once, at the first page
    started = time.perf_counter()
    status, html = await pages._part_of("/ui/groups/g100")
    took = time.perf_counter() - started
    assert status == 200 and "g100" in html
    # Not a speed test (bench/ measures): a page of the 200-group catalog is no slow path.
    assert took < 1.0
    status, html = await pages._part_of("/ui")
    assert status == 200 and html.count('href="/ui/groups/g') == 200


async def test_figures_that_cannot_be_read_say_so_and_never_hold_the_page(tmp_path: Path) -> None:
    catalog = load_catalog(EXAMPLES)
    dead = Endpoints(["http://127.0.0.1:9/metrics"], local=None)
    pages = CatalogPages(catalog, dead, token_required=False)
    try:
        _, html = await pages._part_of("/ui/groups/user_last_click")
    finally:
        await pages.aclose()
    assert "Unavailable: http://127.0.0.1:9/metrics: " in html


@pytest.mark.parametrize("path", ["/ui/groups/a/b", "/ui/groups/%00", "/ui/groups/" + "x" * 5000])
async def test_odd_paths_are_404_pages(path: str) -> None:
    pages = CatalogPages(load_catalog(EXAMPLES), None, token_required=False)
    status, html = await pages._part_of(path)
    assert status == 404 and "Not found" in html
