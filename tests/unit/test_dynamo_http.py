"""Unit tests of the DynamoDB HTTP client: SigV4 against botocore's own signer, error
answers, retries and the CRC check, against a scripted aiohttp server on localhost."""

from __future__ import annotations

import datetime
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from yarl import URL

from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.stores import _dynamo_http
from featureplane.stores._dynamo_http import Credentials, DynamoHttp, Signer, host_of, wire_error
from featureplane.stores.dynamodb import _code
from tests.services import free_port

NOW = datetime.datetime(2026, 11, 30, 23, 59, 58, tzinfo=datetime.UTC)
BODY = orjson.dumps({"TableName": "t", "Key": {"pk": {"S": "g#1"}, "sk": {"S": "~"}}})


@pytest.mark.parametrize("token", [None, "IQoJb3JpZ2luX2VjEBIaCXVzLWVhc3QtMSJH/token=="])
@pytest.mark.parametrize(
    "endpoint",
    [
        "https://dynamodb.eu-west-1.amazonaws.com",
        "http://127.0.0.1:8000",
        "https://proxy.example:443/dynamo db",  # a path (and a default port) behind a proxy
    ],
)
def test_signature_is_botocores(
    monkeypatch: pytest.MonkeyPatch, token: str | None, endpoint: str
) -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    target = "DynamoDB_20120810.GetItem"
    url = URL(endpoint + "/")
    ours = Signer("eu-west-1", host_of(url), url.raw_path).headers(
        target, BODY, creds, NOW.timestamp()
    )

    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: NOW.replace(tzinfo=None))
    request = AWSRequest(
        method="POST",
        url=str(url),
        data=BODY,
        headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": target},
    )
    SigV4Auth(BotoCredentials(*creds), "dynamodb", "eu-west-1").add_auth(request)
    theirs = dict(request.headers.items())
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Date"] == theirs["X-Amz-Date"] == "20261130T235958Z"
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token") == token


def test_the_signing_key_is_cached_per_day_and_secret() -> None:
    signer = Signer("us-east-1", "h")
    creds = Credentials("a", "s")
    first = signer.headers("T", b"{}", creds, NOW.timestamp())["Authorization"]
    later = signer.headers("T", b"{}", creds, NOW.timestamp() + 1)["Authorization"]
    next_day = signer.headers("T", b"{}", creds, NOW.timestamp() + 3)["Authorization"]
    assert "20261130/us-east-1" in first and "20261201/us-east-1" in next_day
    assert first != later  # x-amz-date differs
    rotated = signer.headers("T", b"{}", Credentials("a", "s2"), NOW.timestamp())["Authorization"]
    assert rotated != first


def test_wire_error() -> None:
    err = wire_error(
        400,
        b'{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",'
        b'"message":"The conditional request failed"}',
    )
    assert (err.code, err.message, err.status) == (
        "ConditionalCheckFailedException",
        "The conditional request failed",
        400,
    )
    err = wire_error(
        400, b'{"__type":"com.amazon.coral.validate#ValidationException","Message":"x"}'
    )
    assert (err.code, err.message) == ("ValidationException", "x")
    err = wire_error(502, b"<html>Bad Gateway</html>")
    assert (err.code, err.message, err.status) == ("HTTP502", "<html>Bad Gateway</html>", 502)
    assert wire_error(500, b"[1]").code == "HTTP500"


# ---------------------------------------------------------------- the client over a scripted server


Reply = tuple[int, bytes] | tuple[int, bytes, dict[str, str]]


class Script:
    """An HTTP server answering each POST with the next scripted (status, body[, headers])."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status, body, *extra = self.replies.pop(0)
        headers = {"x-amz-crc32": str(zlib.crc32(body))}
        headers.update(*extra)
        return web.Response(status=status, body=body, headers=headers)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


async def _creds() -> Credentials:
    return Credentials("a", "s", "tok")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[list[Reply]], Any]]:
    servers: list[TestServer] = []
    clients: list[DynamoHttp] = []

    async def start(replies: list[Reply]) -> tuple[DynamoHttp, Script, Sleeps]:
        script = Script(replies)
        app = web.Application()
        app.router.add_post("/", script.handle)
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        servers.append(server)
        sleeps = Sleeps()
        client = DynamoHttp(str(server.make_url("")), "us-east-1", _creds, sleep=sleeps)
        await client.start()
        clients.append(client)
        return client, script, sleeps

    yield start
    for c in clients:
        await c.aclose()
    for s in servers:
        await s.close()


THROTTLED = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"slow"}'
CONDITION = b'{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"}'


async def test_call_sends_the_protocol_and_retries_throttling(serve: Any) -> None:
    client, script, sleeps = await serve([(400, THROTTLED), (200, b'{"Item":{"n":{"N":"1"}}}')])
    got = await client.call("GetItem", {"TableName": "t"})
    assert got == {"Item": {"n": {"N": "1"}}}
    assert len(script.requests) == 2 and len(sleeps.delays) == 1
    headers, body = script.requests[0]
    assert orjson.loads(body) == {"TableName": "t"}
    assert headers["X-Amz-Target"] == "DynamoDB_20120810.GetItem"
    assert headers["Content-Type"] == "application/x-amz-json-1.0"
    assert headers["X-Amz-Security-Token"] == "tok"
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=a/")


async def test_a_client_error_is_not_retried_and_keeps_its_code(serve: Any) -> None:
    client, script, _ = await serve([(400, CONDITION)])
    with pytest.raises(StoreError) as info:
        await client.call("PutItem", {})
    assert type(info.value) is StoreError and len(script.requests) == 1
    assert _code(info.value) == "ConditionalCheckFailedException"


async def test_server_errors_and_damaged_replies_are_retried_three_times(serve: Any) -> None:
    damaged = (200, b"{}", {"x-amz-crc32": "1"})
    client, script, sleeps = await serve([(500, b"{}"), damaged, (503, b"")])
    with pytest.raises(TransientStoreError, match="Query failed: HTTP503"):
        await client.call("Query", {})
    assert len(script.requests) == 3 and len(sleeps.delays) == 2

    client, script, _ = await serve([damaged, (200, b"{}")])
    assert await client.call("Query", {}) == {}
    assert len(script.requests) == 2


async def test_connection_failures_are_transient() -> None:
    sleeps = Sleeps()
    client = DynamoHttp(f"http://127.0.0.1:{free_port()}", "us-east-1", _creds, sleep=sleeps)
    with pytest.raises(NotStartedError):
        await client.call("Query", {})
    await client.start()
    try:
        with pytest.raises(TransientStoreError, match="Query failed"):
            await client.call("Query", {})
        assert len(sleeps.delays) == 2
    finally:
        await client.aclose()


async def test_credentials_are_fetched_again_after_the_recheck_interval(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, script, _ = await serve([(200, b"{}")] * 4)
    fetched: list[int] = []

    async def rotating() -> Credentials:
        fetched.append(1)
        return Credentials(f"key{len(fetched)}", "s")

    client._frozen = rotating
    await client.call("Query", {})
    await client.call("Query", {})
    assert len(fetched) == 1
    monkeypatch.setattr(_dynamo_http, "CREDENTIALS_RECHECK_S", -1.0)
    await client.call("Query", {})
    assert len(fetched) == 2
    assert "Credential=key2/" in script.requests[-1][0]["Authorization"]

    async def broken() -> Credentials:
        raise RuntimeError("instance metadata did not answer")

    client._frozen = broken
    with pytest.raises(TransientStoreError, match="cannot refresh AWS credentials"):
        await client.call("Query", {})
