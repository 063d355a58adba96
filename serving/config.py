"""Settings of the HTTP server beyond the shared `Settings`, from flags or FEATUREPLANE_SERVE_*.

Each field's docstring is its flag's help; a flag wins over a variable.
"""

from __future__ import annotations

import sys
from typing import Literal

import pydantic
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from featureplane.settings import Duration

__all__ = ["ServeConfig"]


class ServeConfig(BaseSettings):
    """Cache sizes, timeouts and breaker of `featureplane serve`."""

    model_config = SettingsConfigDict(
        env_prefix="FEATUREPLANE_SERVE_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    local_cache_mb: int = Field(64, ge=0)
    """Size of the in-process tier in MiB; 0 turns the tier off."""
    invalidation: Literal["refresh", "drop", "off"] = "refresh"
    """When a writer says it wrote a (group, id) (a Redis pub/sub channel, so only with a
    Redis tier): refresh drops it from the in-process tier and reads it again from Redis if
    this process held it (the hit rate stays); drop only drops it (the next read of it goes
    to Redis: fewer Redis reads when keys are written more often than read); off: values
    live their soft TTL."""
    local_soft_ttl: Duration = 0
    """While invalidation is subscribed, how long a value in the in-process tier stays fresh
    (never past its group's hard TTL; losing the subscription clears the tier); 0 = each
    group's soft TTL."""
    negative_ttl: Duration = 5_000
    """How long a (group, id) the store lacks is remembered as missing."""
    redis_timeout: Duration = 100
    """Timeout of one Redis round trip."""
    store_timeout: Duration = 1_000
    """Timeout of one store read."""
    breaker_failures: int = Field(5, ge=1)
    """Consecutive failures of a tier that open its circuit breaker."""
    breaker_cooldown: Duration = 2_000
    """How long an open breaker skips its tier before one trial call."""
    xfetch_beta: float = Field(1.0, ge=0)
    """XFetch early-refresh eagerness: > 1 refreshes earlier, 0 turns early refresh off."""
    shutdown_timeout: float = Field(10.0, ge=0)
    """Seconds to finish in-flight requests after SIGTERM."""
    drain_delay: float = Field(5.0, ge=0)
    """Seconds between SIGTERM and closing the listening socket: /readyz answers 503 while
    requests are still served, so load balancers stop sending before connections are refused."""
    header_timeout: float = Field(15.0, gt=0)
    """Seconds a connection has, from opening or from its previous answer, to send a complete
    request head; an idle keep-alive connection is closed after the same time."""
    body_timeout: float = Field(10.0, gt=0)
    """Seconds a request has to deliver its whole body once its head has arrived; later,
    it is answered 408 and disconnected."""
    max_connections: int = Field(10_000, ge=1)
    """Open connections at most (lowered to fit the process's file descriptor limit); more
    are answered 503 and closed."""
    uvloop: bool = sys.platform != "win32"
    """Run on uvloop instead of asyncio's default loop: on where uvloop exists (2-4% less
    server CPU per answer in bench/serve.py's local-tier row);
    --no-uvloop or FEATUREPLANE_SERVE_UVLOOP=false turns it off."""
    workers: int | None = Field(None, ge=1, le=256)
    """Server processes sharing the port (SO_REUSEPORT), each with its own local tier and
    clients; unset = the cores this process may use (CPU affinity and cgroup CPU quota);
    1 = one process, no supervisor."""
    catalog_metrics: str = ""
    """Comma-separated /metrics URLs the catalog (/ui) reads its figures from besides this
    server's own: the ingest and retry dataflows' (freshness, items written, retried and
    dead-lettered records) and a Pushgateway's (batch runs). `up` sets it."""
    catalog_prometheus: str | None = None
    """A Prometheus server's URL: the catalog asks it for the whole fleet's figures over
    5 minutes instead of reading --catalog-metrics."""

    @pydantic.field_validator("catalog_metrics", "catalog_prometheus")
    @classmethod
    def _http_urls(cls, value: str | None) -> str | None:
        for url in (value or "").split(","):
            url = url.strip()
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{url[:200]!r} is not an http:// or https:// URL")
        return value

    @property
    def catalog_metrics_urls(self) -> list[str]:
        return [u.strip() for u in self.catalog_metrics.split(",") if u.strip()]
