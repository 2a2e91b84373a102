"""Suite-wide invariants."""
from __future__ import annotations

import multiprocessing
import os
from typing import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n N`), each of the N test processes gets its share of the cores, in
    process and for the programs its tests start: threads that outnumber the cores wait for each
    other at every parallel region, and a 2-thread run beside a busy process is 10x slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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
