"""The catalog (/ui) in a real headless browser: Debian's chromium driven by Playwright.

A real ingest dataflow (the tansu broker, the embedded store) writes a user's clicks and a
real `featureplane serve` reads its metrics page; the browser then searches the groups
list, opens a group (its features, the M:N rules, a live freshness figure), looks up the
ingested id and one never written, and, on a server with a token, is asked for it, refused
a wrong one and let in with the right one.
"""

from __future__ import annotations

import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.integration.ingest_env import Env, click, now_ms, wait_for
from tests.services import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, in a sandbox without a network: no sandbox, no background connections.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "s3cret-catalog-token"
GROUP = "recent_user_clicked_fleaMarketArticles"


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is not installed: run ./dev setup"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[dict[str, str]]:
    """An ingest dataflow that wrote one user's clicks, and two servers on its store: one
    open, one with a token. Returns their base URLs and the user's id."""
    env = Env(tmp_path_factory.mktemp("catalog"), kafka_bootstrap)
    metrics = free_port()
    env.start("ingest", FEATUREPLANE_METRICS_PORT=str(metrics))
    ports = {"open": free_port(), "token": free_port()}
    for name, port in ports.items():
        extra = {"FEATUREPLANE_TOKEN": TOKEN} if name == "token" else {}
        env.start(
            "serve",
            FEATUREPLANE_PORT=str(port),
            FEATUREPLANE_SERVE_WORKERS="1",
            FEATUREPLANE_SERVE_DRAIN_DELAY="0",
            FEATUREPLANE_SERVE_CATALOG_METRICS=f"http://127.0.0.1:{metrics}/metrics",
            **extra,
        )
    user = f"browser-{env.tok}"
    t = now_ms() - 2_000
    env.produce("user-actions", [click(i, t + i, user=user) for i in range(5)])
    try:
        wait_for(lambda: env.rows(GROUP) >= 5, 60, env, "the clicks in the store")
        for port in ports.values():
            wait_for(lambda p=port: _up(f"http://127.0.0.1:{p}/readyz"), 30, env, "serve ready")
        yield {
            "open": f"http://127.0.0.1:{ports['open']}",
            "token": f"http://127.0.0.1:{ports['token']}",
            "user": user,
        }
    finally:
        env.cleanup()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    p = context.new_page()
    p.set_default_timeout(10_000)
    yield p
    context.close()


def test_search_filters_the_groups_list(page: Page, served: dict[str, str]) -> None:
    page.goto(served["open"] + "/ui")
    rows = page.locator("#groups tbody tr")
    expect(rows).to_have_count(7)
    page.fill("#search", "keywords")
    expect(page.locator("#groups tbody tr:visible")).to_have_count(1)
    expect(page.locator("#groups tbody tr:visible a")).to_have_text("user_notification_keywords")
    page.fill("#search", "")
    page.select_option("select[data-facet=owner]", "team-recs-feed")
    expect(page.locator("#groups tbody tr:visible")).to_have_count(3)
    page.fill("#search", "no group is called this")
    expect(page.locator("#none")).to_be_visible()


def test_a_group_page_shows_features_rules_freshness_and_looks_ids_up(
    page: Page, served: dict[str, str]
) -> None:
    page.goto(served["open"] + "/ui")
    page.click(f"a[href='/ui/groups/{GROUP}']")
    expect(page).to_have_url(re.compile(f"/ui/groups/{GROUP}$"))
    expect(page.locator("h1")).to_have_text(GROUP)
    features = page.locator("table.features tbody")
    for name in ("article_id", "session_id", "category"):
        expect(features).to_contain_text(name)
    expect(page.locator("table.rules")).to_contain_text("clicks_to_recent")
    expect(page.locator("figure.graph svg .node.topic")).to_have_count(1)
    # A live figure: the ingest dataflow's freshness histogram, read through its metrics page.
    expect(page.locator("#freshness-p50")).not_to_have_text("unavailable")
    expect(page.locator("#freshness-p50")).to_have_text(re.compile(r"^\d+(\.\d+)? (ms|s)$"))

    page.fill("#lookup input[name=id]", served["user"])
    page.fill("#lookup input[name=limit]", "3")
    page.click("#lookup button")
    expect(page.locator("#lookup-status")).to_have_text(re.compile(r"^Found in [\d.]+ ms: 3 items"))
    expect(page.locator("#lookup-answer pre")).to_contain_text('"article_id": "a4"')

    page.fill("#lookup input[name=id]", "nobody-ever")
    page.fill("#lookup input[name=limit]", "")
    page.click("#lookup button")
    expect(page.locator("#lookup-status")).to_have_text(re.compile(r"^Not found"))

    page.go_back()
    expect(page.locator("#groups")).to_be_visible()


def test_the_page_asks_for_the_token_and_refuses_a_wrong_one(
    page: Page, served: dict[str, str]
) -> None:
    page.goto(served["token"] + f"/ui/groups/{GROUP}")
    expect(page.locator("#token")).to_be_visible()
    expect(page.locator("table.features")).to_have_count(0)
    page.fill("#token-input", "wrong")
    page.click("#token button")
    expect(page.locator("#token-error")).to_have_text("That token was refused.")
    page.fill("#token-input", TOKEN)
    page.click("#token button")
    expect(page.locator("#token")).to_be_hidden()
    expect(page.locator("table.features")).to_contain_text("article_id")
    page.fill("#lookup input[name=id]", served["user"])
    page.click("#lookup button")
    expect(page.locator("#lookup-status")).to_have_text(re.compile(r"^Found in"))


def test_the_pages_fit_a_phone(browser: Browser, served: dict[str, str]) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        for path in ("/ui", f"/ui/groups/{GROUP}", "/ui/topics", "/ui/jobs"):
            page.goto(served["open"] + path)
            expect(page.locator("main section")).to_be_visible()
            # Wide tables scroll inside their own box; the page itself never scrolls sideways.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (path, width)
    finally:
        context.close()
