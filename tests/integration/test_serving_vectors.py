"""A 768-d embedding through the HTTP API: stored packed, answered as a JSON array of the
stored float32s; an item stored before packing (JSON floats) is answered as it was."""

from __future__ import annotations

import struct
from pathlib import Path

import orjson
from aiohttp.test_utils import TestClient, TestServer

from featureplane.codec import PACKED, Item, make_item
from featureplane.keys import version
from featureplane.serving.app import create_app
from featureplane.spec import load_catalog
from featureplane.stores.embedded import EmbeddedStore

CATALOG = load_catalog(Path(__file__).parent.parent / "contract" / "catalog.yaml")
T0 = 1_763_800_000_000


async def test_a_768d_embedding_is_served_as_a_json_array(tmp_path: Path) -> None:
    group = CATALOG.group("embeddings")
    embedding = [(i - 384) / 3000 for i in range(768)]
    item = make_item(group, "a1", T0, "e1", {"embedding": embedding, "model": "m", "score": 0.1})
    assert item.value[0] == PACKED
    old = orjson.dumps([[0.1, 0.2] + [0.0] * 766, "old-model", None, 7])  # before packing
    async with EmbeddedStore(CATALOG, tmp_path) as store:
        await store.write([item, Item("embeddings", "a0", T0, version(T0, "e0"), old)])
    app = create_app(CATALOG, store=EmbeddedStore(CATALOG, tmp_path), clock=lambda: T0)
    async with TestClient(TestServer(app)) as client:
        got = await client.get("/v1/features/embeddings/a1")
        assert got.status == 200
        body = orjson.loads(await got.read())
        rounded = list(struct.unpack("<768f", struct.pack("<768f", *embedding)))
        assert body["features"] == {
            "embedding": rounded,
            "model": "m",
            "score": 0.1,  # a float feature is float64: only vectors are float32
            "version": None,
        }
        got = await client.post(
            "/v1/features",
            json={"requests": [{"group": "embeddings", "ids": ["a0"], "features": ["embedding"]}]},
        )
        assert got.status == 200
        (result,) = orjson.loads(await got.read())["results"]
        assert result["features"] == {"embedding": [0.1, 0.2] + [0.0] * 766}
