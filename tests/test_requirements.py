"""requirements.txt states the supported ranges (the GPU machine's torch 2.11 as well as CI's
2.14); constraints.txt pins exactly what CI installs, inside those ranges."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import REPO

# torch and the torchvision built for it: the GPU machine's, CI's
PAIRS = [("2.11.0", "0.26.0"), ("2.14.1", "0.29.1")]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def _lines(name: str) -> list[str]:
    text = (REPO / name).read_text().splitlines()
    return [line.strip() for line in text if line.strip() and not line.startswith("#")]


def _requirements() -> dict[str, Requirement]:
    return {(r := Requirement(line)).name.lower(): r for line in _lines("requirements.txt")}


def test_ranges_admit_the_gpu_machines_and_cis_torch():
    required = _requirements()
    for torch_version, vision_version in PAIRS:
        assert required["torch"].specifier.contains(torch_version)
        assert required["torchvision"].specifier.contains(vision_version)
    assert not required["torch"].specifier.contains("2.3.1")  # older than the API the code uses


def test_constraints_pin_every_requirement_inside_its_range():
    pins = {}
    for line in _lines("constraints.txt"):
        pin = Requirement(line)
        (spec,) = pin.specifier
        assert spec.operator == "==", line
        pins[pin.name.lower()] = Version(spec.version)
    for name, requirement in _requirements().items():
        assert requirement.specifier.contains(pins[name]), (name, pins[name])
    assert (pins["torch"], pins["torchvision"]) == tuple(map(Version, PAIRS[1]))


def test_ci_installs_with_the_constraints_and_keys_its_venv_on_both_files():
    script = (REPO / ".ci" / "run").read_text()
    assert "-r requirements.txt -c constraints.txt" in script
    assert "cat requirements.txt constraints.txt | sha256sum" in script


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("torch_version,vision_version", PAIRS, ids=["torch-2.11", "torch-2.14"])
def test_pip_resolves_the_requirements_with_that_torch(tmp_path, torch_version, vision_version):
    """pip's own resolver, for the GPU machine's Python 3.12 on Linux (metadata only, no
    download of the wheels; the requirements' own dependencies are not resolved)."""
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    report = tmp_path / "report.json"
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
         "--quiet", "--report", str(report), "--only-binary=:all:", "--python-version", "3.12",
         *platforms, "-r", str(REPO / "requirements.txt"), f"torch=={torch_version}",
         f"torchvision=={vision_version}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    assert (chosen["torch"], chosen["torchvision"]) == (torch_version, vision_version)
    assert set(chosen) == set(_requirements())
