"""The OpenAPI 3.0 document served at `/openapi.json`."""

from __future__ import annotations

from typing import Any

from featureplane.keys import MAX_TS
from featureplane.serving.api import limit_maximum
from featureplane.spec import Catalog

__all__ = ["openapi"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi(catalog: Catalog) -> dict[str, Any]:
    names = sorted(catalog.groups)
    error = {"$ref": "#/components/schemas/Error"}
    errors = {
        "400": _json(
            error,
            "malformed body, unknown group or feature, bad limit or range (limit past the "
            "group's max_items, since after until), more than 1,000 (group, id) pairs",
        ),
        "401": _json(error, "a token is configured and the request lacks it"),
        "408": _json(error, "the body did not arrive within --body-timeout (then disconnected)"),
        "413": _json(error, "body over 1 MiB"),
        "503": _json(error, "no tier can answer, or the server is at --max-connections"),
    }
    ts = {"type": "integer", "minimum": 0, "maximum": MAX_TS}
    limit = {
        "type": "integer",
        "minimum": 1,
        "maximum": limit_maximum(catalog),
        "description": "timeseries groups: the most items answered, newest first; default 30 "
        "(or the group's max_items if smaller), at most the group's max_items (GET /v1/groups "
        "shows it; the maximum here is the largest). Ignored for latest groups.",
    }

    since, until = (
        ts
        | {
            "description": f"timeseries groups: the {side} event time answered, epoch "
            "milliseconds, inclusive. Ignored for latest groups."
        }
        for side in ("oldest", "newest")
    )

    group = {"type": "string", "enum": names} if names else {"type": "string"}
    request = {
        "type": "object",
        "required": ["group", "ids"],
        "additionalProperties": False,
        "properties": {
            "group": group,
            "ids": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "limit": limit,
            "since": since,
            "until": until,
            "features": {"type": "array", "items": {"type": "string"}},
        },
    }
    result = {
        "type": "object",
        "required": ["group", "id", "found"],
        "properties": {
            "group": {"type": "string"},
            "id": {"type": "string"},
            "found": {"type": "boolean"},
            "ts": {"type": "integer", "description": "latest groups, when found"},
            "features": {"type": "object", "description": "latest groups, when found"},
            "items": {
                "type": "array",
                "description": "timeseries groups, newest first",
                "items": {
                    "type": "object",
                    "required": ["ts", "features"],
                    "properties": {"ts": {"type": "integer"}, "features": {"type": "object"}},
                },
            },
        },
    }
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "featureplane",
            "version": "1",
            "description": "Feature serving over local, Redis and store tiers.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "FeatureRequest": request,
                "Result": result,
            },
        },
        "paths": {
            "/v1/features": {
                "post": {
                    "summary": "features of many (group, id) pairs, one result each in order",
                    "security": secured,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["requests"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "requests": {
                                            "type": "array",
                                            "items": {
                                                "$ref": "#/components/schemas/FeatureRequest"
                                            },
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["results"],
                                "properties": {
                                    "results": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Result"},
                                    }
                                },
                            },
                            "results in request order",
                        ),
                        **errors,
                    },
                }
            },
            "/v1/features/{group}/{id}": {
                "get": {
                    "summary": "features of one (group, id)",
                    "security": secured,
                    "parameters": [
                        {"name": "group", "in": "path", "required": True, "schema": group},
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1},
                        },
                        {"name": "limit", "in": "query", "schema": limit},
                        {"name": "since", "in": "query", "schema": since},
                        {"name": "until", "in": "query", "schema": until},
                        {
                            "name": "features",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "comma-separated feature names",
                        },
                    ],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Result"}, "one result"),
                        **errors,
                    },
                }
            },
            "/v1/groups": {
                "get": {
                    "summary": "the feature group specs in force",
                    "security": secured,
                    "responses": {"200": _json({"type": "object"}, "specs"), "401": errors["401"]},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "liveness",
                    "responses": {"200": _json({"type": "object"}, "alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "200 whenever the durable store answers (status "
                    "'degraded' with a cache tier down); 503 while "
                    "starting, draining or with the store unreachable",
                    "responses": {
                        "200": _json({"type": "object"}, "ready"),
                        "503": _json({"type": "object"}, "not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text",
                    "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI")},
                }
            },
        },
    }
