"""The catalog's routes over HTTP: the shell holds no data, the parts need the token like
the API, odd paths are 404 pages, figures or dead letters that cannot be read are said to
be unavailable, and the newest dead letters of a real broker are shown with their reasons."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from featureplane.batch.dlq import newest
from featureplane.operators.kafka_cluster import KafkaCluster
from featureplane.serving.app import create_app
from featureplane.serving.catalog import CatalogParts
from featureplane.serving.config import ServeConfig
from featureplane.spec import load_catalog
from featureplane.stores.embedded import EmbeddedStore
from tests.integration.ingest_env import Env, click, now_ms, wait_for
from tests.services import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CATALOG = load_catalog(EXAMPLES)
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    config = ServeConfig(catalog_metrics=f"http://127.0.0.1:{free_port()}/metrics")
    app = create_app(CATALOG, store=EmbeddedStore(CATALOG, tmp_path), config=config, token="s3cret")
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_the_shell_is_public_and_empty_the_parts_need_the_token(
    client: TestClient[Any, Any],
) -> None:
    for path in ("/ui", "/ui/groups", "/ui/groups/user_last_click", "/ui/topics", "/ui/jobs"):
        resp = await client.get(path)
        html = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/html", path
        assert 'data-token-required="yes"' in html and "user_last_click" not in html, path
    for path in ("/ui/part/groups", "/ui/part/groups/user_last_click", "/ui/part/topics"):
        resp = await client.get(path)
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
        wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 200 and resp.content_type == "text/html", path
    for name in ("catalog.js", "catalog.css"):
        assert (await client.get(f"/ui/static/{name}")).status == 200
    html = await (await client.get("/ui/part/groups/user_last_click", headers=AUTH)).text()
    assert "Unavailable: http://127.0.0.1:" in html  # the metrics page nobody serves


@pytest.mark.parametrize(
    "path",
    [
        "/ui/part/groups/nope",
        "/ui/part/groups/%3Cscript%3E",
        "/ui/part/groups/" + "x" * 4000,
        "/ui/static/../../etc/passwd",
        "/ui/static/%2e%2e%2fapp.py",
        "/ui/static/nope.js",
        "/ui/groups/a/b",
        "/ui/part/nope",
    ],
)
async def test_odd_paths_are_4xx_never_500(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.get(path, headers=AUTH)
    assert 400 <= resp.status < 500, (path, resp.status)
    assert "<script>" not in await resp.text()


async def test_the_newest_dead_letters_are_shown_with_their_reasons(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    env = Env(tmp_path, kafka_bootstrap)
    try:
        env.start("ingest")
        t = now_ms()
        env.produce(
            "user-actions",
            [b'{"oops', click(1, t, user="fine"), json.dumps({"event_type": "click"}).encode()],
        )
        dlq = env.topic("user-actions") + ".dlq"
        wait_for(lambda: len(env.read_topic(dlq, 2, timeout=2)) >= 2, 60, env, "two dead letters")
    finally:
        env.cleanup()
    kafka = KafkaCluster(kafka_bootstrap)
    parts = CatalogParts(dead_letters=functools.partial(newest, kafka))
    app = create_app(
        env.catalog, store=EmbeddedStore(env.catalog, tmp_path / "s"), catalog_parts=parts
    )
    async with TestClient(TestServer(app)) as c:

        async def shown() -> str:
            return await (await c.get("/ui/part/topics")).text()

        html = await shown()
        for _ in range(40):  # the first page may not wait for the read: the next has it
            if "dlq</code></h3>" in html:
                break
            html = await shown()
        topic = env.topic("user-actions")
        assert f"<code>{topic}.dlq</code>" in html
        assert html.count('<td class="reason">') == 2
        assert "not valid JSON" in html  # the `{"oops` record's reason
    letters = newest(kafka, [topic, "never-a-topic"], per_topic=1)
    assert len(letters[topic]) == 1 and letters["never-a-topic"] == []
