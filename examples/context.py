"""The example catalog's on-demand function: features computed when a request asks.

`request_time_context` names `featureplane.examples.context:request_time`; serving
imports it at start-up and calls it once per requested id.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["request_time"]


def request_time(user_id: str) -> dict[str, int]:
    """The hour (0-23) and weekday (0 = Monday) of now, in UTC, for any user."""
    now = datetime.now(UTC)
    return {"hour_of_day": now.hour, "day_of_week": now.weekday()}
