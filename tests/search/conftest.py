"""One local Ray per test process for the launches tests run in it.

A launch leaves running a Ray it did not start, so the in-process launches of a pytest-xdist
worker share this one instead of each starting and stopping its own (seconds each). A test that
needs a Ray set up its own way (test_faults' memory monitor) shuts this one down first; the next
test starts it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from search.launch._cluster import start_ray


@pytest.fixture(scope="session", autouse=True)
def _local_ray_for_the_session() -> Iterator[None]:
    start_ray(None, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _local_ray_up(_local_ray_for_the_session: None) -> None:
    # Session and module fixtures are set up before this, so their launches found the Ray above.
    if not ray.is_initialized():
        start_ray(None, log_to_driver=False)
