"""Request parsing and answer shaping of the HTTP API; every bad input -> ApiError.

HTTP status codes of featureplane are decided here and in `serving.app`, nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from featureplane.codec import Record, decode, decode_many
from featureplane.errors import FeatureplaneError, ValidationError, quote
from featureplane.keys import MAX_TS, check_id
from featureplane.spec import Catalog, FeatureGroup

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_PAIRS",
    "ApiError",
    "FeatureRequest",
    "limit_maximum",
    "parse_body",
    "parse_query",
    "render",
    "render_json",
]

DEFAULT_LIMIT = 30
MAX_PAIRS = 1_000
MAX_MESSAGE = 600
_FIELDS = frozenset({"group", "ids", "limit", "since", "until", "features"})


class ApiError(FeatureplaneError):
    """An error answered as `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        # Messages quote input through `quote`; this bound is the backstop that keeps the
        # body under 4 KiB (the API's promise) even if one does not: 600 characters are at
        # most 3,600 bytes once JSON-escaped. Lone surrogates would make orjson raise.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> bytes:
        return orjson.dumps({"error": {"code": self.code, "message": self.message}})


def _bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """One entry of `requests`: a group, its ids and the per-request query."""

    group: FeatureGroup
    ids: tuple[str, ...]
    limit: int
    since: int | None
    until: int | None
    features: tuple[str, ...] | None


def parse_body(catalog: Catalog, body: bytes) -> list[FeatureRequest]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("bad_request", "body is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"requests"}:
        raise _bad("bad_request", 'body must be an object with one field, "requests"')
    reqs = doc["requests"]
    if not isinstance(reqs, list):
        raise _bad("bad_request", '"requests" must be a list')
    out: list[FeatureRequest] = []
    pairs = 0
    for n, raw in enumerate(reqs):
        if not isinstance(raw, dict):
            raise _bad("bad_request", f"requests[{n}] must be an object")
        if extra := set(raw) - _FIELDS:
            raise _bad("bad_request", f"requests[{n}] has unknown fields {quote(sorted(extra))}")
        ids = raw.get("ids")
        if not isinstance(ids, list):
            raise _bad("bad_request", f"requests[{n}].ids must be a list of strings")
        pairs += len(ids)
        if pairs > MAX_PAIRS:
            raise _bad("too_many_ids", f"at most {MAX_PAIRS} (group, id) pairs a request")
        out.append(
            _request(
                catalog,
                raw.get("group"),
                ids,
                raw.get("limit"),
                raw.get("since"),
                raw.get("until"),
                raw.get("features"),
                f"requests[{n}].",
            )
        )
    return out


def parse_query(
    catalog: Catalog, group: str, entity_id: str, query: Mapping[str, str]
) -> FeatureRequest:
    """The GET form: `?limit=&since=&until=&features=a,b`."""
    if extra := set(query) - {"limit", "since", "until", "features"}:
        raise _bad("bad_request", f"unknown query parameters {quote(sorted(extra))}")
    nums: dict[str, int | None] = {}
    for name in ("limit", "since", "until"):
        text = query.get(name)
        if text is None or text == "":
            nums[name] = None
            continue
        try:
            nums[name] = int(text)
        except ValueError:
            raise _bad(
                "bad_limit" if name == "limit" else "bad_range",
                f"{name} must be an integer, got {quote(text)}",
            ) from None
    features = query.get("features")
    names = None if features is None else [f for f in features.split(",") if f]
    return _request(
        catalog, group, [entity_id], nums["limit"], nums["since"], nums["until"], names, ""
    )


def _request(
    catalog: Catalog,
    group_name: Any,
    ids: list[Any],
    limit: Any,
    since: Any,
    until: Any,
    features: Any,
    where: str,
) -> FeatureRequest:
    if not isinstance(group_name, str):
        raise _bad("bad_request", f"{where}group must be a string")
    group = catalog.groups.get(group_name)
    if group is None:
        raise _bad("unknown_group", f"unknown feature group {quote(group_name)}")
    for entity_id in ids:
        if not isinstance(entity_id, str):
            raise _bad("bad_request", f"{where}ids must be strings, got {quote(entity_id)}")
        try:
            check_id(entity_id)
        except ValidationError as exc:
            raise _bad("bad_request", str(exc)) from None
    # limit, since and until are checked as the OpenAPI document types them whatever the
    # group; only a timeseries group uses them, so only there do they have to make sense.
    timeseries = group.kind == "timeseries"
    if limit is not None:
        bound = group.max_items if timeseries else limit_maximum(catalog)
        if not _is_int(limit) or not 1 <= limit <= bound:
            allowed = (
                f"the group's max_items ({bound})"
                if timeseries
                else f"{bound} (a latest group ignores it)"
            )
            raise _bad(
                "bad_limit",
                f"{where}limit must be an integer from 1 to {allowed}, got {quote(limit)}",
            )
    for name, value in (("since", since), ("until", until)):
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_TS):
            raise _bad("bad_range", f"{where}{name} must be epoch milliseconds, got {quote(value)}")
    if timeseries and since is not None and until is not None and since > until:
        raise _bad("bad_range", f"{where}since ({since}) is after until ({until})")
    names: tuple[str, ...] | None = None
    if features is not None:
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise _bad("bad_request", f"{where}features must be a list of feature names")
        unknown = [f for f in features if f not in group.index]
        if unknown:
            raise _bad(
                "unknown_feature", f"group {group.name!r} has no feature {quote(unknown[0])}"
            )
        names = tuple(dict.fromkeys(features))
    if not timeseries:  # one value an id: limit, since and until are ignored
        return FeatureRequest(group, tuple(ids), 1, None, None, names)
    if limit is None:
        limit = min(DEFAULT_LIMIT, group.max_items)
    return FeatureRequest(group, tuple(ids), limit, since, until, names)


def limit_maximum(catalog: Catalog) -> int:
    """The largest `limit` a request may give: the largest max_items of a timeseries group
    (`DEFAULT_LIMIT` in a catalog without one). A timeseries group allows its own max_items;
    a latest group ignores limit, but a limit beyond this is refused for it too, as the
    OpenAPI document says."""
    return max(
        (g.max_items for g in catalog.groups.values() if g.kind == "timeseries"),
        default=DEFAULT_LIMIT,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(
    group: FeatureGroup, rows: list[list[Any]], names: tuple[str, ...] | None
) -> list[dict[str, Any]]:
    """Decoded items' features as an answer shows them: all, or the `names` asked.

    One pass over the rows, the positions looked up once: per item calls of `decode` and
    `project` were half of a 30-item answer's rendering."""
    if names is None:
        # Decoding gives one value per feature, in `group.index` order: a strict zip's
        # check would add ~200 ns an item (a third of the dict's cost).
        keys = group.index
        return [dict(zip(keys, values, strict=False)) for values in rows]
    picks = [(n, group.index[n]) for n in names]
    return [{n: values[i] for n, i in picks} for values in rows]


def render(req: FeatureRequest, entity_id: str, records: Sequence[Record]) -> dict[str, Any]:
    """One result object of the answer."""
    group = req.group
    if group.kind == "latest":
        if not records:
            return {"group": group.name, "id": entity_id, "found": False}
        r = records[0]
        return {
            "group": group.name,
            "id": entity_id,
            "found": True,
            "ts": r.ts,
            "features": _shown(group, [decode(group, r.value)], req.features)[0],
        }
    features = _shown(group, decode_many(group, [r.value for r in records]), req.features)
    items = [{"ts": r.ts, "features": f} for r, f in zip(records, features, strict=False)]
    return {"group": group.name, "id": entity_id, "found": bool(items), "items": items}


def render_json(req: FeatureRequest, entity_id: str, records: Sequence[Record]) -> bytes:
    """One result object of the answer, as JSON: the bytes an answer splices."""
    return orjson.dumps(render(req, entity_id, records))
