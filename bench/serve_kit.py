"""What the serving benches share: the bench catalog, the request bodies, wrk's script,
the bare-aiohttp ceiling, and waiting for a server (bench/serve.py, serve_workers.py,
invalidation.py)."""

from __future__ import annotations

import time
import urllib.request

SPEC = """
feature_groups:
  - {name: last_click, entity: user, kind: latest, tiers: [local, store],
     ttl: {soft: 10m, hard: 1h},
     features: [{name: article_id, type: string}, {name: category, type: string}]}
  - {name: keywords, entity: user, kind: latest, tiers: [redis, store],
     ttl: {soft: 10m, hard: 1h},
     features: [{name: keywords, type: "set<string>"}, {name: updated_by, type: string}]}
  - {name: stats, entity: user, kind: latest, tiers: [redis, store], ttl: {soft: 10m, hard: 1h},
     features: [{name: clicks, type: int}, {name: score, type: float}]}
  - {name: recent, entity: user, kind: timeseries, max_items: 30, tiers: [redis, store],
     ttl: {soft: 10m, hard: 1h},
     features: [{name: article_id, type: string}, {name: category, type: string}]}
"""
BODY_A = '{"requests":[{"group":"last_click","ids":["%d"]}]}'
BODY_B = (
    '{"requests":[{"group":"keywords","ids":["%d"]},{"group":"stats","ids":["%d"]},'
    '{"group":"recent","ids":["%d"]}]}'
)
CEILING = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def handler(request):
    await request.read()
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_post("/v1/features", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = %d
local template = '%s'
request = function()
  local id = math.random(0, n - 1)
  return wrk.format(nil, "/v1/features", nil, string.format(template, id, id, id))
end
"""


def wait_up(port: int, path: str = "/healthz") -> None:
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        except OSError as exc:
            if getattr(exc, "code", None):
                return  # any HTTP answer means it is up
            time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def response_size(port: int, body: str) -> bytes:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/features",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        return bytes(resp.read())
