"""The numerically sensitive tests (marker `numerics`) again under each other CPU kernel set.

Float results differ between torch's CPU kernel sets, and CI runs on whichever CPU it gets
(AVX512 or AVX2). Re-running the tests whose outcome depends on float results (exact resume,
divergence, "this trains") under ATEN_CPU_CAPABILITY=default, avx2 and avx512 makes a test that
passes here pass on the other machines too.

The re-runs leave out the slow ones (marker `slow`: SIGKILL, stop-signal and killed-study resumes,
two thirds of the time). Equality of an interrupted and an uninterrupted run does not depend on the
kernel set, only on the shared recipe staying finite, which `test_margins.py` checks under every
kernel set; the fast exact-resume tests (mid-epoch, fp16, a fault during evaluation) still re-run.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KERNEL_SETS = ("default", "avx2", "avx512")


@functools.cache
def _native_capability() -> str:
    """The best kernel set this CPU runs: what torch picks with ATEN_CPU_CAPABILITY unset.

    Asked for more than the CPU has, torch 2.14 reports the requested set anyway and dies of an
    illegal instruction later (SIGILL on an AVX2 machine under avx512), so support is decided here,
    from the unset choice, never from what torch reports under the setting."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return out.stdout.strip().lower()


def _supported(kernel_set: str, native: str) -> bool:
    """Whether a CPU whose best kernel set is `native` can run `kernel_set` (x86 sets are ordered:
    default < avx2 < avx512; other platforms run only "default" besides their own)."""
    if kernel_set == "default" or kernel_set == native:
        return True
    return native in KERNEL_SETS and KERNEL_SETS.index(kernel_set) < KERNEL_SETS.index(native)


def test_support_follows_the_order_of_the_kernel_sets():
    assert _supported("avx2", "avx512") and _supported("default", "avx2")
    assert not _supported("avx512", "avx2") and not _supported("avx2", "default")
    assert _supported("default", "sve256") and not _supported("avx2", "sve256")


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_numerics_tests_pass_under_every_kernel_set(kernel_set, tmp_path):
    if torch.backends.cpu.get_cpu_capability().lower() == kernel_set:
        pytest.skip(f"this pytest process already runs on {kernel_set}")
    if not _supported(kernel_set, _native_capability()):
        pytest.skip(f"this CPU does not support {kernel_set}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernel_set)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "numerics and not slow", "-q", "-p",
         "no:cacheprovider",
         "--basetemp", str(tmp_path / "t")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"under ATEN_CPU_CAPABILITY={kernel_set}:\n{proc.stdout[-6000:]}"
