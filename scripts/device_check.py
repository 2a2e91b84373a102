"""The GPU checks in one command, within 8 minutes on one H200; any failed stage fails the check.

Prepare here (network needed; docs/gpu.md), then run on the GPU machine from a fresh copy:

    python scripts/device_check.py --prepare --cifar-tar data/cifar10-jpeg.tar.gz
    python3 scripts/device_check.py --out results/gpu               # on the GPU machine
    python scripts/device_check.py --tiny --out /tmp/check          # CPU, generated data (tests)

`--prepare` fills the git-ignored `.device-check/`: cp312 manylinux wheels of what the GPU
machine may lack (tqdm, pytest and its dependencies, lmdb; versions from constraints.txt) and a
CIFAR-10 subset as one .tar.gz. The run installs the missing ones from those wheels (`pip install
--no-index`), unpacks the subset into the scratch folder, then runs the stages:

1. `tests`: `pytest -m cuda` (AMP, channels_last, compile, the device data path's bits);
2. `memory`: the memory benchmark at batch 128 for the paper's six CIFAR networks, beside the
   paper's memory column;
3. `speed`: training images/s of resnet18 vs resnet18_cbn per loader and option, from CUDA events
   after 10 warm-up steps (`benchmarks/train_speed.py`), one of them compiled;
4. `short`: a short CIFAR-10 run of both in bf16;
5. `torchrun`: one `torchrun --nproc_per_node 1` run (NCCL) with `--sync-lastbn`;
6. `deterministic`: ImageNet vgg11_cbn at 224 px with `--deterministic`, twice, same weights.

Each stage has a time budget; success is read from results (exit codes, pytest's counts, the
rows' values), never from a file's existence. Outputs (`--out`): summary.md, stages.csv,
speed.csv, memory.csv, short_run.csv and log.txt (every command's output); runs and checkpoints
go to `--scratch`, cleared first, so re-running into the same folders works.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from experiments.tables import markdown_table, write_csv  # noqa: E402

BUNDLE = REPO / ".device-check"  # git-ignored: what --prepare builds and the device run reads
CIFAR_SUBSET = "cifar10.tar.gz"
MAYBE_MISSING = ("tqdm", "pytest", "lmdb")  # the GPU machine's image may lack these
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
PAPER_ARCHS = ("vgg11", "vgg16", "resnet18", "resnet50", "squeezenet", "shufflenetv2")
# The paper's Table 1: training memory (MB, nvidia-smi, one RTX 2080 Ti, CIFAR-100).
PAPER_MEMORY_MB = {"vgg11": (2971, 2851), "vgg16": (3745, 3489), "resnet18": (4447, 4157),
                   "resnet50": (8533, 7533), "squeezenet": (3687, 2693),
                   "shufflenetv2": (3915, 3141)}
# Seconds each stage may take on the GPU machine; the sum stays under the 8 minutes.
BUDGET_S = {"install": 25, "data": 15, "tests": 90, "memory": 60, "speed": 150, "short": 70,
            "torchrun": 35, "deterministic": 35}
STAGES = ("tests", "memory", "speed", "short", "torchrun", "deterministic")
SPEED_OPTIONS = {"fp32": [], "bf16": ["--amp", "bf16"],
                 "bf16+channels-last": ["--amp", "bf16", "--channels-last"]}
# one compiled row (compiling takes most of its time): the MimicNorm arch on the device loader
COMPILED = ("bf16+channels-last+compile", ["--amp", "bf16", "--channels-last", "--compile"])


class StageFailed(Exception):
    """A stage's result is not what success needs; the message says what it was."""


@dataclass
class Check:
    """One run of the check: flags, where things go, the deadline and the stages' results."""

    args: argparse.Namespace
    deadline: float
    log: Path
    data_dir: Path | None = None
    results: list[dict[str, object]] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    @property
    def scratch(self) -> Path:
        return self.args.scratch

    def run(self, cmd: list[str], stage_end: float) -> subprocess.CompletedProcess:
        """`cmd` from the repository root, its output appended to log.txt and returned, killed
        at the stage's end or the check's deadline (exit 124)."""
        timeout = max(1.0, min(stage_end, self.deadline) - time.monotonic())
        # its own process group, so that a timeout also ends the processes it started (torchrun)
        with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                err, code = f"{err}timed out after {timeout:.0f} s\n", 124
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n{out}{err}exit {code}\n")
        return subprocess.CompletedProcess(cmd, code, out, err)

    def data_flags(self) -> list[str]:
        if self.tiny:
            return ["-ds", "synthetic", "--synthetic-size", "16", "8", "--gpu", "-1"]
        return ["-ds", "folder", "--data-dir", str(self.data_dir)]


def _checked(proc: subprocess.CompletedProcess, what: str) -> str:
    """`proc`'s output; StageFailed naming `what` and the last line of its output if it failed."""
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines() or ["(no output)"]
        raise StageFailed(f"{what}: exit {proc.returncode}: {lines[-1][:200]}")
    return proc.stdout


def _last_log_row(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise StageFailed(f"{run_dir}/log.csv has no epoch row")
    return rows[-1]


def _archs(check: Check) -> list[list[str]]:
    if check.tiny:
        return [["-a", "squeezenet"], ["-a", "squeezenet_cbn", "--weight", "mean"]]
    return [["-a", "resnet18"], ["-a", "resnet18_cbn", "--weight", "mean"]]


# --- preparing here, and the first steps there ---------------------------------------------------

def prepare(cifar_tar: Path, per_class: tuple[int, int], bundle: Path = BUNDLE) -> Path:
    """Fill `bundle` with the wheels and the CIFAR-10 subset the device run needs."""
    if not cifar_tar.is_file():
        raise SystemExit(f"error: --cifar-tar {cifar_tar}: no such file")
    wheels = bundle / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d",
                    str(wheels), "-c", str(REPO / "constraints.txt"), *MAYBE_MISSING],
                   check=True)
    counts = cifar_subset(cifar_tar, bundle / CIFAR_SUBSET, per_class)
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(f"{bundle}: {len(list(wheels.glob('*.whl')))} wheels, CIFAR-10 subset "
          f"{counts['train']} train / {counts['test']} test images, {size / 2**20:.1f} MiB")
    return bundle


def cifar_subset(source: Path, target: Path, per_class: tuple[int, int]) -> dict[str, int]:
    """The first `per_class` (train, test) images of each class of the `cifar10-jpeg.tar.gz` at
    `source` (sorted names), as a .tar.gz of the same layout at `target`; the counts per split."""
    limits = {"train": per_class[0], "test": per_class[1]}
    chosen: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and parts[1] in limits:
                chosen.setdefault((parts[1], parts[2]), []).append(member)
        if not chosen:
            raise SystemExit(f"error: {source} holds no cifar10-jpeg/<split>/<class>/<image>")
        target.parent.mkdir(parents=True, exist_ok=True)
        counts = {"train": 0, "test": 0}
        with tarfile.open(target, "w:gz") as out:
            for (split, _), members in sorted(chosen.items()):
                for member in sorted(members, key=lambda m: m.name)[:limits[split]]:
                    out.addfile(member, tar.extractfile(member))
                    counts[split] += 1
    return counts


def install(check: Check, stage_end: float) -> None:
    """Install what is missing of MAYBE_MISSING from the prepared wheels."""
    missing = [name for name in MAYBE_MISSING if importlib.util.find_spec(name) is None]
    check.tables["install"] = f"missing before: {', '.join(missing) or 'none'}"
    if not missing:
        return
    wheels = check.args.bundle / "wheels"
    if not wheels.is_dir():
        raise StageFailed(f"{', '.join(missing)} missing and no {wheels}: run --prepare first")
    _checked(check.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                        "--find-links", str(wheels), *missing], stage_end), "pip install")
    _checked(check.run([sys.executable, "-c", f"import {', '.join(missing)}"], stage_end),
             "import after install")


def unpack_data(check: Check, stage_end: float) -> None:
    """The CIFAR-10 tree: --data-dir, or the prepared subset unpacked into the scratch folder."""
    if check.args.data_dir is None:
        subset = check.args.bundle / CIFAR_SUBSET
        if not subset.is_file():
            raise StageFailed(f"no {subset} and no --data-dir: run --prepare first")
        with tarfile.open(subset) as tar:
            tar.extractall(check.scratch / "data", filter="data")
        check.data_dir = check.scratch / "data" / "cifar10-jpeg"
    else:
        check.data_dir = check.args.data_dir
    counts = {s: sum(1 for _ in (check.data_dir / s).glob("*/*")) for s in ("train", "test")}
    if not all(counts.values()):
        raise StageFailed(f"{check.data_dir}: no images in train/ or test/ ({counts})")
    check.tables["data"] = f"{check.data_dir}: {counts['train']} train, {counts['test']} test"


# --- the stages ----------------------------------------------------------------------------------

def cuda_tests(check: Check, stage_end: float) -> None:
    """`pytest -m cuda`: exit 0, and on a GPU at least one test passed and none was skipped."""
    proc = check.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p",
                      "no:cacheprovider"], stage_end)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    check.tables["tests"] = summary
    _checked(proc, "pytest -m cuda")
    if not check.tiny and ("passed" not in summary or "skipped" in summary):
        raise StageFailed(f"pytest -m cuda: {summary} (every CUDA test must run and pass)")


def memory(check: Check, stage_end: float) -> None:
    """The memory benchmark; each architecture's ratios beside the paper's."""
    archs = PAPER_ARCHS[4:5] if check.tiny else PAPER_ARCHS
    device, batch = ("cpu", "2") if check.tiny else ("cuda", "128")
    out = check.scratch / "memory"
    cmd = [sys.executable, "-m", "benchmarks.memory", "--device", device, "--batch-size", batch,
           "--steps", "0" if check.tiny else "5", "--out-dir", str(out),
           *[a for arch in archs for a in ("--arch", arch)], *(["--no-peak"] if check.tiny else [])]
    _checked(check.run(cmd, stage_end), "benchmarks.memory")
    with open(out / "memory_cifar.csv", newline="") as f:
        ours = {row["arch"]: row for row in csv.DictReader(f)}
    rows = [{"arch": arch, "paper BN MB": PAPER_MEMORY_MB[arch][0],
             "paper MimicNorm MB": PAPER_MEMORY_MB[arch][1],
             "paper MimicNorm/BN": PAPER_MEMORY_MB[arch][1] / PAPER_MEMORY_MB[arch][0],
             "ours peak MimicNorm/BN": float(ours.get(arch, {}).get("peak_cbn/plain", "nan")),
             "ours saved MimicNorm/BN": float(ours.get(arch, {}).get("saved_cbn/plain", "nan"))}
            for arch in archs]
    write_csv(pd.DataFrame(rows), check.args.out / "memory.csv")
    check.tables["memory"] = (f"batch {batch} on {device}; the paper's figures are whole-process "
                              f"nvidia-smi MB, ours the allocator's peak and the bytes saved for "
                              f"backward\n\n{markdown_table(rows)}")
    key = "ours saved MimicNorm/BN" if check.tiny else "ours peak MimicNorm/BN"
    bad = [r["arch"] for r in rows if not 0 < r[key] < math.inf]
    if bad:
        raise StageFailed(f"no {key} for {', '.join(bad)}")


def _speed_rows(check: Check) -> list[tuple[str, str, str, list[str]]]:
    """(arch, loader, option name, flags) of every speed row."""
    options = {"fp32": []} if check.tiny else SPEED_OPTIONS
    rows = []
    for arch in _archs(check):
        rows.append((arch[1], "pil", "fp32", arch))
        rows += [(arch[1], "device", name, arch + flags) for name, flags in options.items()]
    if not check.tiny:
        arch = _archs(check)[1]
        rows.append((arch[1], "device", COMPILED[0], arch + COMPILED[1]))
    return rows


def speed(check: Check, stage_end: float) -> None:
    """Images/s per row (`benchmarks/train_speed.py`); every row must give a positive rate."""
    warmup, steps, batch = ("1", "2", "4") if check.tiny else ("10", "30", "256")
    rows, failed = [], []
    for arch, loader, name, flags in _speed_rows(check):
        result = check.scratch / "speed" / f"{arch}-{loader}-{name}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        proc = check.run([sys.executable, "-m", "benchmarks.train_speed", "--warmup", warmup,
                          "--steps", steps, "--result", str(result), "--", *flags,
                          *check.data_flags(), "--loader", loader, "-b", batch,
                          "-j", "2" if check.tiny else "8", "--no-progress"], stage_end)
        rate = json.loads(result.read_text())["images_per_s"] if proc.returncode == 0 else math.nan
        rows.append({"arch": arch, "loader": loader, "options": name, "exit": proc.returncode,
                     "images_per_s": rate})
        if not rate > 0:
            failed.append(f"{arch} {loader} {name} (exit {proc.returncode})")
    write_csv(pd.DataFrame(rows), check.args.out / "speed.csv")
    check.tables["speed"] = (f"batch {batch}, {steps} steps timed after {warmup} warm-up steps"
                             f"\n\n{markdown_table(rows)}")
    if failed:
        raise StageFailed(f"no rate for {'; '.join(failed)}")


def _train(check: Check, entry: str, flags: list[str], run_name: str, stage_end: float,
           launcher: list[str] | None = None) -> tuple[str, dict[str, str]]:
    """One training run into the scratch folder; its output and last log row."""
    out_dir = check.scratch / "runs"
    proc = check.run([*(launcher or [sys.executable]), entry, *flags, "--no-progress",
                      "--out-dir", str(out_dir), "--run-name", run_name], stage_end)
    output = _checked(proc, f"{entry} {run_name}")
    arch = flags[flags.index("-a") + 1]
    return output, _last_log_row(out_dir / arch / run_name)


def short_run(check: Check, stage_end: float) -> None:
    """resnet18 vs resnet18_cbn, bf16: every epoch done, training loss finite."""
    epochs = 1 if check.tiny else check.args.epochs
    schedule = (["--epochs", "1", "--max-steps", "2", "-b", "4"] if check.tiny else
                ["--epochs", str(epochs), "--warm", "1", "--milestones", str(epochs // 2 + 1),
                 "-b", "256", "--amp", "bf16", "--channels-last", "-j", "8"])
    rows = []
    for arch in _archs(check):
        start = time.monotonic()
        _, last = _train(check, "Cifar/main.py", [*arch, *check.data_flags(), "--loader",
                                                  "device", *schedule], "short", stage_end)
        rows.append({"arch": arch[1], "wall_s": time.monotonic() - start,
                     **{k: float(last[k]) for k in ("epoch", "train_loss", "test_acc1",
                                                    "images_per_second", "peak_memory_mb")}})
        if rows[-1]["epoch"] != epochs or not math.isfinite(rows[-1]["train_loss"]):
            raise StageFailed(f"{arch[1]}: epoch {rows[-1]['epoch']} of {epochs}, train loss "
                              f"{rows[-1]['train_loss']}")
    write_csv(pd.DataFrame(rows), check.args.out / "short_run.csv")
    check.tables["short"] = (f"{epochs} epoch(s), --loader device (peak memory includes the "
                             f"dataset on the device)\n\n{markdown_table(rows)}")


def torchrun(check: Check, stage_end: float) -> None:
    """One process under torchrun with --sync-lastbn: NCCL on a GPU (gloo on the CPU)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "1"]
    flags = ["-a", "resnet18_cbn" if not check.tiny else "squeezenet_cbn", "--weight", "mean",
             "--sync-lastbn", *check.data_flags(), "--loader", "device", "--epochs", "1",
             "--max-steps", "2" if check.tiny else "20", "-b", "4" if check.tiny else "256",
             *([] if check.tiny else ["--amp", "bf16"])]
    output, last = _train(check, "Cifar/main.py", flags, "torchrun", stage_end, launcher)
    backend = "gloo" if check.tiny else "NCCL"
    check.tables["torchrun"] = f"epoch {last['epoch']}, train loss {last['train_loss']}"
    if f"1 processes ({backend}" not in output:
        raise StageFailed(f"torchrun: the run did not say it used {backend}")


def deterministic(check: Check, stage_end: float) -> None:
    """ImageNet vgg11_cbn with --deterministic twice: both runs end with the same weights."""
    import torch

    size = "64" if check.tiny else "224"
    flags = ["-a", "vgg11_cbn", "--weight", "mean", "--width", "0.25", "-ds", "synthetic",
             "--synthetic-size", "16", "8", "--image-size", size, "-b", "4", "--epochs", "1",
             "--max-steps", "3", "--deterministic", "-j", "0",
             *(["--gpu", "-1"] if check.tiny else [])]
    states = []
    for name in ("deterministic-1", "deterministic-2"):
        _train(check, "ImageNet/main.py", flags, name, stage_end)
        path = check.scratch / "runs" / "vgg11_cbn" / name / "last.pt"
        states.append(torch.load(path, map_location="cpu", weights_only=True)["model"])
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    check.tables["deterministic"] = f"{size} px, 3 steps twice: {len(differ)} tensors differ"
    if differ:
        raise StageFailed(f"two --deterministic runs differ in {', '.join(differ[:3])}")


STAGE_FUNCTIONS: dict[str, Callable[[Check, float], None]] = {
    "install": install, "data": unpack_data, "tests": cuda_tests, "memory": memory,
    "speed": speed, "short": short_run, "torchrun": torchrun, "deterministic": deterministic}


# --- the whole check -----------------------------------------------------------------------------

def run_stage(check: Check, name: str) -> bool:
    """Run stage `name` within its budget; record and print its outcome; True if it passed."""
    start = time.monotonic()
    budget = BUDGET_S[name] * (20 if check.tiny else 1)
    error = ""
    try:
        STAGE_FUNCTIONS[name](check, start + budget)
    except StageFailed as e:
        error = str(e)
    except Exception as e:  # a stage's own bug or a missing file: a failed stage, not a crash
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    check.results.append({"stage": name, "ok": not error, "seconds": round(seconds, 1),
                          "budget_s": budget, "error": error})
    print(f"stage {name}: {'ok' if not error else 'FAILED: ' + error} ({seconds:.0f} s)",
          flush=True)
    return not error


def write_summary(check: Check) -> None:
    """stages.csv and summary.md: each stage's outcome, then its table."""
    out = check.args.out
    write_csv(pd.DataFrame(check.results), out / "stages.csv")
    parts = ["# Device check", "", markdown_table(check.results)]
    for result in check.results:
        if result["stage"] in check.tables:
            parts += ["", f"## {result['stage']}", "", check.tables[result["stage"]]]
    (out / "summary.md").write_text("\n".join(parts) + "\n")


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    """The check's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", action="store_true",
                        help="here, with network: build .device-check/ (wheels, CIFAR subset)")
    parser.add_argument("--cifar-tar", type=Path, help="--prepare: cifar10-jpeg.tar.gz to cut")
    parser.add_argument("--per-class", type=_positive, nargs=2, default=[2000, 200],
                        metavar=("TRAIN", "TEST"), help="--prepare: images per class kept")
    parser.add_argument("--out", type=Path, help="summary.md, the csv tables and log.txt go here")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/mimicnorm-device-check"),
                        help="runs, checkpoints and unpacked data (cleared first)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="what --prepare built")
    parser.add_argument("--data-dir", type=Path, help="a CIFAR-10 tree instead of the subset")
    parser.add_argument("--epochs", type=_positive, default=5, help="epochs of the short run")
    parser.add_argument("--budget", type=_positive, default=470,
                        help="seconds for the whole check (each stage also has its own)")
    parser.add_argument("--tiny", action="store_true", help="CPU, generated data, a few steps")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Prepare, or run the stages; 0 when every stage passed, 1 when one failed, 2 bad input."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.prepare:
        if args.cifar_tar is None:
            parser.error("--prepare needs --cifar-tar PATH (cifar10-jpeg.tar.gz)")
        prepare(args.cifar_tar, tuple(args.per_class), args.bundle)
        print("next, on the GPU machine: python3 scripts/device_check.py --out DIR")
        return 0
    if args.out is None:
        parser.error("--out DIR is needed (or --prepare)")
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log.txt").write_text("")
    budget = args.budget * (20 if args.tiny else 1)
    check = Check(args, time.monotonic() + budget, args.out / "log.txt")
    setup = [] if args.tiny else ["install", "data"]
    passed = all(run_stage(check, name) for name in setup)  # stops at a failed set-up stage
    if passed:
        passed = all([run_stage(check, name) for name in args.stages])  # every stage runs
    write_summary(check)
    failed = [r["stage"] for r in check.results if not r["ok"]]
    if failed:
        print(f"device check FAILED: stage(s) {', '.join(failed)}; see {args.out}/summary.md "
              f"and log.txt", file=sys.stderr)
        return 1
    print(f"device check passed: {len(check.results)} stages; {args.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
