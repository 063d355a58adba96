"""Session fixtures that run the real local services on free loopback ports.

A missing service binary fails the tests that need it, with the command
that installs it: it never turns into a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from featureplane.spec import Catalog, load_catalog
from tests.services import (
    Service,
    running,
    start_dynalite,
    start_pushgateway,
    start_redis,
    start_tansu,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the `slow` tests first: with parallel workers (`./dev test` runs
    `-n auto --dist worksteal`) the others are shared out while they run,
    instead of one worker waiting out a 3-minute test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def redis_service() -> Iterator[Service]:
    with running(start_redis) as svc:
        yield svc


@pytest.fixture(scope="session")
def dynalite_service() -> Iterator[Service]:
    with running(start_dynalite) as svc:
        yield svc


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[Service]:
    with running(start_tansu) as svc:
        yield svc


@pytest.fixture
def pushgateway() -> Iterator[Service]:
    """A Pushgateway of the test's own: what one test pushes, another must not read."""
    with running(start_pushgateway) as svc:
        yield svc


@pytest.fixture(scope="session")
def redis_url(redis_service: Service) -> str:
    return f"redis://{redis_service.address}/0"


@pytest.fixture(scope="session")
def dynamodb_endpoint(dynalite_service: Service) -> str:
    return f"http://{dynalite_service.address}"


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: Service) -> str:
    return kafka_service.address


@pytest.fixture(scope="session")
def example_catalog() -> Catalog:
    return load_catalog(EXAMPLES)
