"""Seeding and the random-number-generator states a checkpoint carries."""
from __future__ import annotations

import os
import random
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(cuda_devices: Sequence[int] = ()) -> dict[str, Any]:
    """This process's generator states as `weights_only`-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(d) for d in cuda_devices],
    }


def restore_rng_state(state: dict[str, Any], cuda_devices: Sequence[int] = ()) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored when the device count matches."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if len(state["cuda"]) == len(cuda_devices):
        for d, s in zip(cuda_devices, state["cuda"]):
            torch.cuda.set_rng_state(s, d)


CUBLAS_WORKSPACE = ":4096:8"  # a workspace size with which cuBLAS is deterministic


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Within the block, only deterministic kernels (cuDNN without autotuning, a fixed cuBLAS
    workspace): a GPU run then repeats bit for bit, somewhat slower. Restores the previous
    settings on exit; does nothing when not `enabled`.

    `CUBLAS_WORKSPACE_CONFIG` is set if unset and left set: cuBLAS reads it once, when CUDA first
    uses it in the process. Set here after CUDA started (a second run in one process after a GPU
    run without it) it has no effect, which a note on stderr says."""
    if not enabled:
        yield
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        if torch.cuda.is_initialized():
            print("note: CUDA had started in this process before --deterministic set "
                  "CUBLAS_WORKSPACE_CONFIG, so cuBLAS may not be deterministic; set "
                  f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the environment",
                  file=sys.stderr)
    cudnn = torch.backends.cudnn
    previous = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
                cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        cudnn.deterministic, cudnn.benchmark = previous[1], previous[2]
