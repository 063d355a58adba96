"""The HTTP feature server and its tiered read path.

`app` (routes, auth, errors, lifecycle) over `tiers.TieredReader`, which puts in order
the pieces of a read: `plan` (one request's pairs), `freshness` (TTL math, XFetch, what
a cached entry may answer), `local` (the in-process LRU), `coalesce` (concurrent Redis
reads sent together), `flight` (single-flight reads, background refreshes), `fills`
(the queue that writes store answers to Redis), `guarded` (timeouts and breakers).
"""

__all__: list[str] = []
