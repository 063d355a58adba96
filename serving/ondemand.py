"""On-demand groups: computed per request by a registered function, never cached or stored.

A group's `on_demand: "module:function"` names a function imported at start-up. It is
called once per id as `function(id)` (plain or `async def`) and returns, for a `latest`
group, a mapping of feature name -> value (or None: not found); for a `timeseries`
group, a list of `{"ts": epoch_ms, "features": {...}}`, newest first. Values are
checked and encoded exactly as stored items are, so the answer has the same shape.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from featureplane.codec import Record, encode
from featureplane.errors import FeatureplaneError, quote
from featureplane.keys import version
from featureplane.spec import Catalog, FeatureGroup

__all__ = ["OnDemandError", "compute", "load_functions"]

OnDemandFn = Callable[[str], Any]


class OnDemandError(FeatureplaneError):
    """An on-demand function could not be imported, raised, or returned a bad value.

    `group` names the on-demand group; `message` says what went wrong (input in it is
    quoted short). Serving decides the HTTP status: 503 `on_demand_failed`.
    """

    def __init__(self, group: str, message: str) -> None:
        super().__init__(message)
        self.group, self.message = group, message


def load_functions(catalog: Catalog) -> dict[str, OnDemandFn]:
    """Import every group's on-demand function; fail at start-up, not per request."""
    out: dict[str, OnDemandFn] = {}
    for group in catalog.groups.values():
        if group.on_demand is None:
            continue
        module_name, _, attr = group.on_demand.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise OnDemandError(
                group.name,
                f"group {group.name!r}: cannot import on_demand {group.on_demand!r}: {exc}",
            ) from exc
        if not callable(fn):
            raise OnDemandError(
                group.name, f"group {group.name!r}: {group.on_demand!r} is not callable"
            )
        out[group.name] = fn
    return out


async def compute(
    group: FeatureGroup, fn: OnDemandFn, ids: tuple[str, ...], now: int
) -> list[list[Record]]:
    """Records per id, newest first, as if read from a store."""

    async def one(entity_id: str) -> list[Record]:
        try:
            value = fn(entity_id)
            if inspect.isawaitable(value):
                value = await value
            return _records(group, value, now)
        except Exception as exc:
            raise OnDemandError(
                group.name, f"on-demand group {group.name!r} failed: {quote(exc, 200)}"
            ) from exc

    return list(await asyncio.gather(*(one(i) for i in ids)))


def _records(group: FeatureGroup, value: Any, now: int) -> list[Record]:
    if value is None:
        return []
    if group.kind == "latest":
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a mapping of features, got {type(value).__name__}")
        return [Record(now, version(now, "on-demand"), encode(group, value))]
    out = []
    for item in value:
        ts = int(item["ts"])
        out.append(Record(ts, version(ts, "on-demand"), encode(group, item["features"])))
    return out
