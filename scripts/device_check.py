"""Everything worth measuring on one GPU, in one go, under one output folder (about 8 minutes):

1. the CUDA tests (`pytest -m cuda`: fp16/bf16 AMP, channels_last, compile, the device pipeline
   on CUDA equal to the CPU one) -> pytest.txt;
2. the memory benchmark at batch 128 for the paper's six CIFAR networks, BN vs MimicNorm, beside
   the paper's memory column -> memory/, memory_vs_paper.md;
3. training images/s, BN vs MimicNorm, per loader, with and without AMP / channels_last /
   compile -> speed.csv, speed.md;
4. a short real CIFAR-10 run, resnet18 vs resnet18_cbn -> runs/, short_run.md.

    python scripts/device_check.py --data-dir /data/cifar10-jpeg --out results/gpu
    python scripts/device_check.py --tiny --out /tmp/check      # CPU, generated data, seconds

`--tiny` runs every stage on the CPU with generated data and a few steps, so CI keeps the script
working on machines without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from experiments.tables import markdown_table, write_table  # noqa: E402

PAPER_ARCHS = ("vgg11", "vgg16", "resnet18", "resnet50", "squeezenet", "shufflenetv2")
# The paper's Table 1: training memory (MB, nvidia-smi, one RTX 2080 Ti, CIFAR-100).
PAPER_MEMORY_MB = {"vgg11": (2971, 2851), "vgg16": (3745, 3489), "resnet18": (4447, 4157),
                   "resnet50": (8533, 7533), "squeezenet": (3687, 2693),
                   "shufflenetv2": (3915, 3141)}
SPEED_OPTIONS = {"fp32": [], "amp-fp16": ["--amp", "fp16"],
                 "amp-bf16+channels-last": ["--amp", "bf16", "--channels-last"],
                 "amp-fp16+compile": ["--amp", "fp16", "--compile"]}


def _run(cmd: list[str], log: Path, timeout: float) -> int:
    """Run `cmd` from the repository root, output appended to `log`; returns the exit code."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout:.0f} s\n")
            return 124


def _data_flags(args: argparse.Namespace) -> list[str]:
    if args.tiny:
        return ["-ds", "synthetic", "--synthetic-size", "16", "8", "--gpu", "-1"]
    return ["-ds", "folder", "--data-dir", str(args.data_dir)]


def _last_log_row(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def cuda_tests(args: argparse.Namespace) -> None:
    """Stage 1: the tests marked `cuda` (all skipped without a GPU)."""
    code = _run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p",
                 "no:cacheprovider"], args.out / "pytest.txt", timeout=180)
    print(f"cuda tests: exit {code}", flush=True)


def memory(args: argparse.Namespace) -> None:
    """Stage 2: activation and peak memory at batch 128, ratios beside the paper's."""
    archs = PAPER_ARCHS[4:5] if args.tiny else PAPER_ARCHS
    device, batch = ("cpu", "2") if args.tiny else ("cuda", "128")
    cmd = [sys.executable, "-m", "benchmarks.memory", "--device", device, "--batch-size", batch,
           "--steps", "0" if args.tiny else "5", "--out-dir", str(args.out / "memory"),
           *[a for arch in archs for a in ("--arch", arch)]]
    if args.tiny:
        cmd.append("--no-peak")
    code = _run(cmd, args.out / "memory.log", timeout=240)
    if code != 0:
        print(f"memory benchmark: exit {code}", flush=True)
        return
    with open(args.out / "memory" / "memory_cifar.csv", newline="") as f:
        ours = {row["arch"]: row for row in csv.DictReader(f)}
    table = [{"arch": arch, "paper BN MB": PAPER_MEMORY_MB[arch][0],
              "paper MimicNorm MB": PAPER_MEMORY_MB[arch][1],
              "paper MimicNorm/BN": PAPER_MEMORY_MB[arch][1] / PAPER_MEMORY_MB[arch][0],
              "ours peak MimicNorm/BN": float(ours[arch]["peak_cbn/plain"]),
              "ours saved MimicNorm/BN": float(ours[arch]["saved_cbn/plain"])}
             for arch in archs]
    (args.out / "memory_vs_paper.md").write_text(
        f"batch {batch} on {device}; the paper's figures are whole-process nvidia-smi MB at "
        f"its batch size, ours the allocator's peak and the bytes saved for backward\n\n"
        f"{markdown_table(table)}\n")
    print(markdown_table(table), flush=True)


def speed(args: argparse.Namespace) -> None:
    """Stage 3: training images/s per arch x loader x option, from each run's log."""
    archs = [["-a", "squeezenet"], ["-a", "squeezenet_cbn", "--weight", "mean"]] if args.tiny \
        else [["-a", "resnet18"], ["-a", "resnet18_cbn", "--weight", "mean"]]
    options = {"fp32": []} if args.tiny else SPEED_OPTIONS
    steps = "2" if args.tiny else "60"
    rows = []
    for arch in archs:
        for loader in ("pil", "device"):
            for name, flags in options.items():
                run = f"{arch[1]}-{loader}-{name}"
                cmd = [sys.executable, "Cifar/main.py", *arch, *_data_flags(args), "--loader",
                       loader, "-j", "2" if args.tiny else "8", "-b", "4" if args.tiny else "256",
                       "--epochs", "1", "--max-steps", steps, "--no-progress", *flags,
                       "--out-dir", str(args.out / "speed"), "--run-name", run]
                code = _run(cmd, args.out / "speed.log", timeout=300)
                rate = (float(_last_log_row(args.out / "speed" / arch[1] / run)
                              ["images_per_second"]) if code == 0 else float("nan"))
                rows.append({"arch": arch[1], "loader": loader, "options": name,
                             "exit": code, "images_per_s": rate})
                print(rows[-1], flush=True)
    _write_table(rows, args.out / "speed")


def short_run(args: argparse.Namespace) -> None:
    """Stage 4: resnet18 vs resnet18_cbn on real CIFAR-10, as many epochs as fit."""
    archs = [["-a", "squeezenet"], ["-a", "squeezenet_cbn", "--weight", "mean"]] if args.tiny \
        else [["-a", "resnet18"], ["-a", "resnet18_cbn", "--weight", "mean"]]
    schedule = (["--epochs", "1", "--max-steps", "2", "-b", "4"] if args.tiny else
                ["--epochs", str(args.epochs), "--warm", "1", "--milestones",
                 str(args.epochs // 2), str(args.epochs * 3 // 4), "-b", "256", "--amp", "fp16"])
    rows = []
    for arch in archs:
        cmd = [sys.executable, "Cifar/main.py", *arch, *_data_flags(args), "--loader", "device",
               *schedule, "--no-progress", "--out-dir", str(args.out / "runs"), "--run-name",
               "short"]
        start = time.perf_counter()
        code = _run(cmd, args.out / "short_run.log", timeout=600)
        row = {"arch": arch[1], "exit": code, "wall_s": time.perf_counter() - start}
        if code == 0:
            last = _last_log_row(args.out / "runs" / arch[1] / "short")
            row.update({k: float(last[k]) for k in ("epoch", "test_acc1", "images_per_second")})
        rows.append(row)
        print(row, flush=True)
    _write_table(rows, args.out / "short_run")


def _write_table(rows: list[dict[str, object]], stem: Path) -> None:
    """`<stem>.csv` and `<stem>.md`; a key missing from a row (a failed run) is left blank."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_table(pd.DataFrame([{k: r.get(k, "") for k in keys} for r in rows]), stem)


def main(argv: list[str] | None = None) -> int:
    """Run the stages; returns 0 when every stage wrote its outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="every output goes here")
    parser.add_argument("--data-dir", type=Path, help="CIFAR-10 ImageFolder tree (train/, test/)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the short run")
    parser.add_argument("--tiny", action="store_true", help="CPU, generated data, a few steps")
    parser.add_argument("--stages", nargs="+", default=["tests", "memory", "speed", "short"],
                        choices=["tests", "memory", "speed", "short"])
    args = parser.parse_args(argv)
    if not args.tiny and args.data_dir is None:
        parser.error("--data-dir is needed unless --tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"tests": cuda_tests, "memory": memory, "speed": speed, "short": short_run}
    for name in args.stages:
        start = time.perf_counter()
        stages[name](args)
        print(f"stage {name}: {time.perf_counter() - start:.0f} s", flush=True)
    expected = {"memory": "memory_vs_paper.md", "speed": "speed.md", "short": "short_run.md",
                "tests": "pytest.txt"}
    missing = [expected[s] for s in args.stages if not (args.out / expected[s]).exists()]
    if missing:
        print(f"missing outputs: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
