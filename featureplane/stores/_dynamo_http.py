"""DynamoDB's JSON protocol over one pooled aiohttp session: the store's only HTTP path.

Why not botocore here: it builds, validates, serialises and parses every request
through its service model, ~2 ms of CPU a request, which made DynamoDB ingest cost
~2.3 ms of CPU an event. This client sends what the store already has, a dict shaped
as DynamoDB's JSON (`{"pk": {"S": ...}}`; `B` values base64, `N` strings), as
`POST /` with `X-Amz-Target: DynamoDB_20120810.<Op>` (the documented
`application/x-amz-json-1.0` protocol), body by orjson, signed with SigV4 here.

botocore still finds the region, the endpoint and the credentials at start-up, and
refreshes expiring credentials (instance roles, IRSA): `frozen` is called at most
every `CREDENTIALS_RECHECK_S`, well inside botocore's 10-minute refresh margin.

Behaviour kept from the botocore client it replaces ("standard" retry mode):
transient failures (throttling codes, HTTP 5xx, connection errors, timeouts, a
response whose `x-amz-crc32` does not match) are retried up to `ATTEMPTS` attempts
in all with `backoff_ms`; a 3 s connect and 10 s read timeout. Errors come out as
`StoreError`/`TransientStoreError` (`dynamodb_requests.map_error`) whose cause is
a `DynamoWireError` carrying DynamoDB's error code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from featureplane.backoff import backoff_ms
from featureplane.errors import NotStartedError, StoreError, TransientStoreError
from featureplane.stores.dynamodb_requests import CRC_MISMATCH, DynamoWireError, map_error

__all__ = [
    "ATTEMPTS",
    "CREDENTIALS_RECHECK_S",
    "Credentials",
    "DynamoHttp",
    "Signer",
    "host_of",
    "wire_error",
]

ATTEMPTS = 3  # botocore's "standard" mode: the first try and two retries
CREDENTIALS_RECHECK_S = 30.0
_CONNECT_TIMEOUT_S = 3.0
_READ_TIMEOUT_S = 10.0
_TARGET = "DynamoDB_20120810."
_CONTENT_TYPE = "application/x-amz-json-1.0"


class Credentials(NamedTuple):
    """Frozen AWS credentials (botocore's `ReadOnlyCredentials` has these fields)."""

    access_key: str
    secret_key: str
    token: str | None = None


def host_of(url: URL) -> str:
    """The Host header botocore signs: lowercase host, with the port unless default."""
    host = (url.host or "").lower()
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return host if url.explicit_port is None or url.is_default_port() else f"{host}:{url.port}"


class Signer:
    """AWS Signature Version 4 for DynamoDB's `POST /`, the signing key cached per day.

    Signs exactly the headers sent that botocore would sign (content-type, host,
    x-amz-date, x-amz-security-token when there is a token, x-amz-target); a unit
    test checks the result against botocore's `SigV4Auth` for the same request."""

    def __init__(self, region: str, host: str, path: str = "/", service: str = "dynamodb") -> None:
        """`path`: the endpoint's path as sent (percent-encoded), `/` but behind a proxy;
        SigV4 encodes it once more for every service but S3."""
        self.region, self.host, self.service = region, host, service
        self.path = quote(path, safe="/~")
        self._key: tuple[str, str, bytes] = ("", "", b"")  # (secret, day, key)
        self._second = (-1, "")  # (epoch second, its x-amz-date)

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key[0] != secret or self._key[1] != day:
            k = _hmac(f"AWS4{secret}".encode(), day)
            for part in (self.region, self.service, "aws4_request"):
                k = _hmac(k, part)
            self._key = (secret, day, k)
        return self._key[2]

    def headers(self, target: str, body: bytes, creds: Credentials, now: float) -> dict[str, str]:
        """The request's headers, `Authorization` included, at epoch seconds `now`."""
        second = int(now)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second)))
        amz_date = self._second[1]
        day = amz_date[:8]
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        token = creds.token
        if token:
            names = "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
            canon_headers = (
                f"content-type:{_CONTENT_TYPE}\nhost:{self.host}\nx-amz-date:{amz_date}\n"
                f"x-amz-security-token:{token}\nx-amz-target:{target}\n"
            )
        else:
            names = "content-type;host;x-amz-date;x-amz-target"
            canon_headers = (
                f"content-type:{_CONTENT_TYPE}\nhost:{self.host}\nx-amz-date:{amz_date}\n"
                f"x-amz-target:{target}\n"
            )
        payload = hashlib.sha256(body).hexdigest()
        canonical = f"POST\n{self.path}\n\n{canon_headers}\n{names}\n{payload}"
        to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        key = self._signing_key(creds.secret_key, day)
        signature = hmac.digest(key, to_sign.encode(), "sha256").hex()
        headers = {
            "Host": self.host,
            "Content-Type": _CONTENT_TYPE,
            "X-Amz-Date": amz_date,
            "X-Amz-Target": target,
            "Accept-Encoding": "identity",  # x-amz-crc32 is over the bytes as sent
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                f"SignedHeaders={names}, Signature={signature}"
            ),
        }
        if token:
            headers["X-Amz-Security-Token"] = token
        return headers


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")


def wire_error(status: int, body: bytes) -> DynamoWireError:
    """DynamoDB's error answer: `{"__type": "...#Code", "message": ...}` (or `Message`)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):  # a proxy's HTML page, say
        text = body[:200].decode("utf-8", "replace").strip()
        return DynamoWireError(f"HTTP{status}", text, status)
    code = str(doc.get("__type") or f"HTTP{status}").rpartition("#")[2]
    message = doc.get("message") or doc.get("Message") or ""
    return DynamoWireError(code, str(message), status)


class DynamoHttp:
    """One DynamoDB endpoint: `await call(op, params)` returns the response as a dict.

    Requests run under a semaphore of `concurrency` slots (the connection pool's
    size), taken per attempt, so a backoff sleep holds no slot."""

    def __init__(
        self,
        endpoint: str,
        region: str,
        frozen: Callable[[], Awaitable[Credentials]],
        *,
        concurrency: int = 32,
        attempts: int = ATTEMPTS,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        """`frozen`: returns the current credentials (botocore's `get_frozen_credentials`)."""
        self.url = URL(endpoint.rstrip("/") + "/")
        self.signer = Signer(region, host_of(self.url), self.url.raw_path)
        self.attempts = attempts
        self._frozen = frozen
        self._creds: Credentials | None = None
        self._creds_at = 0.0
        self._sleep = sleep
        self._slots = asyncio.Semaphore(concurrency)
        self._limit = max(concurrency, 10)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S
                ),
            )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _credentials(self) -> Credentials:
        now = time.monotonic()
        if self._creds is None or now - self._creds_at > CREDENTIALS_RECHECK_S:
            try:
                got = await self._frozen()
            except Exception as exc:  # botocore's refresh (IMDS, STS) failed: try again later
                raise TransientStoreError(
                    f"DynamoDB: cannot refresh AWS credentials: {exc}"
                ) from exc
            self._creds = Credentials(got.access_key, got.secret_key, got.token)
            self._creds_at = now
        return self._creds

    async def call(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        """One operation, retried while transient; raises StoreError/TransientStoreError."""
        body = orjson.dumps(params)
        target = _TARGET + op
        for attempt in range(self.attempts):
            if attempt:
                await self._sleep(backoff_ms(attempt - 1) / 1000)
            try:
                return await self._send(target, body)
            except StoreError:
                raise
            except Exception as exc:
                err = map_error(exc, op)
                if not isinstance(err, TransientStoreError) or attempt + 1 == self.attempts:
                    raise err from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _send(self, target: str, body: bytes) -> dict[str, Any]:
        session = self._session
        if session is None:
            raise NotStartedError("DynamoStore")
        async with self._slots:  # signed once a slot is free: the date is the sending time
            creds = await self._credentials()
            headers = self.signer.headers(target, body, creds, time.time())
            async with session.post(self.url, data=body, headers=headers) as resp:
                data = await resp.read()
                status, crc = resp.status, resp.headers.get("x-amz-crc32")
        if crc is not None and zlib.crc32(data) != int(crc):
            raise DynamoWireError(CRC_MISMATCH, "the response was damaged in transit", status)
        if status != 200:
            raise wire_error(status, data)
        doc: dict[str, Any] = orjson.loads(data)
        return doc
