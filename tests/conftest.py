"""Suite-wide invariants."""
from __future__ import annotations

import multiprocessing
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_worker_processes_left() -> Iterator[None]:
    """Every test must leave no data-loading worker running: a leftover worker that ignores
    SIGTERM makes the interpreter wait for it forever at exit."""
    yield
    left = multiprocessing.active_children()
    assert not left, f"worker processes still running after the test: {left}"
