"""Suite-wide invariants."""
from __future__ import annotations

import multiprocessing
from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def no_worker_processes_left() -> Iterator[None]:
    """Every test must leave no data-loading worker running: a leftover worker that ignores
    SIGTERM makes the interpreter wait for it forever at exit."""
    yield
    left = multiprocessing.active_children()
    assert not left, f"worker processes still running after the test: {left}"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): one
    thread avoids contention on the shared CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
