"""Cells per hour of a study on this machine: how to pack its cells onto the CPU cores.

For every packing (`--jobs J --threads T`, J training processes of T torch threads each), memory
layout (default or `--channels-last`) and load (the machine otherwise idle, or beside a test
suite running in a loop), J worker processes train every model of the study's six networks (BN
and MimicNorm twins) in the same order for `--seconds` each after `--warmup` steps: forward,
cross-entropy, backward, SGD step and, for the `_cbn` twins, the weight-mean projection, on
random 32x32 batches (`Cifar/main.py --loader device` trains at this bare loop's speed). The
throughput of a packing is the sum over its processes; a cell costs `--epochs` x (its training
images + a third of its test images, the cost of a forward-only evaluation), so

    cells per hour = 3600 x images/s of the packing / images of one cell.

    python -m benchmarks.study_packing --out-dir results/study_packing
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments.tables import write_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NETWORKS = ("vgg11", "vgg16", "resnet18", "resnet50", "squeezenet", "shufflenetv2")
LOAD_COMMAND = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/test_models_light.py", "tests/test_mimicnorm.py"]


def worker(args: argparse.Namespace) -> None:
    """Train each of `args.models` for `args.seconds`; print one JSON line per model."""
    import torch
    from torch import nn

    import models

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (args.batch,))
    for name in args.models:
        net = models.create_model(name, 10, "cifar", width=args.width).to(memory_format=fmt)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if models.is_mimicnorm_name(name):
            models.attach_weight_mean(optimizer, net)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(images), labels).backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        steps, start = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - start < args.seconds:
            step()
            steps += 1
        seconds = time.perf_counter() - start
        print(json.dumps({"model": name, "images_per_second": steps * args.batch / seconds}),
              flush=True)


def measure(args: argparse.Namespace, jobs: int, threads: int, channels_last: bool
            ) -> dict[str, float]:
    """model -> images/s summed over `jobs` simultaneous worker processes."""
    model_list = [m for n in NETWORKS for m in (n, f"{n}_cbn")]
    cmd = [sys.executable, "-m", "benchmarks.study_packing", "--worker", "--threads",
           str(threads), "--width", str(args.width), "--batch", str(args.batch), "--seconds",
           str(args.seconds), "--warmup", str(args.warmup), "--models", *model_list]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd + (["--channels-last"] if channels_last else []), cwd=REPO,
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    total: dict[str, float] = {}
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a benchmark worker ended with exit {proc.returncode}")
        for line in out.splitlines():
            row = json.loads(line)
            total[row["model"]] = total.get(row["model"], 0.0) + row["images_per_second"]
    return total


class Load:
    """A test suite running in a loop beside the measurement (context manager)."""

    def __init__(self, on: bool) -> None:
        self.on, self.proc = on, None

    def __enter__(self) -> "Load":
        if self.on:
            loop = f"while true; do {' '.join(LOAD_COMMAND)} > /dev/null 2>&1; done"
            self.proc = subprocess.Popen(["bash", "-c", loop], cwd=REPO, start_new_session=True)
            time.sleep(8)  # past the suite's start-up (imports), into its tests
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def run(args: argparse.Namespace) -> pd.DataFrame:
    """One row per load, layout, packing and model."""
    cell_images = args.epochs * (args.train_images + args.test_images / 3)
    rows = []
    for beside, channels_last, (jobs, threads) in itertools.product(
            (False, True), (False, True), ((1, 2), (2, 1))):
        with Load(beside):
            speeds = measure(args, jobs, threads, channels_last)
        for model, speed in speeds.items():
            rows.append({"load": "beside a test suite" if beside else "idle",
                         "layout": "channels_last" if channels_last else "default",
                         "packing": f"--jobs {jobs} --threads {threads}", "model": model,
                         "images_per_second": speed,
                         "cells_per_hour": 3600 * speed / cell_images})
        print(f"{rows[-1]['load']}, {rows[-1]['layout']}, {rows[-1]['packing']}: done",
              flush=True)
    return pd.DataFrame(rows)


def summary(runs: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """Per load, layout and packing: the hours one cell of each model takes on average, the
    hours of a study of one cell per model, and the speed-up against the 2-thread default."""
    table = (runs.assign(hours=1 / runs["cells_per_hour"])
             .groupby(["load", "layout", "packing"], sort=False)
             .agg(cells_per_hour=("cells_per_hour", lambda c: len(c) / (1 / c).sum()),
                  study_hours=("hours", "sum")).reset_index())
    base = table[(table["layout"] == "default") & (table["packing"] == "--jobs 1 --threads 2")]
    base_hours = dict(zip(base["load"], base["study_hours"]))
    table["speed-up"] = [base_hours[load] / h for load, h in zip(table["load"],
                                                                 table["study_hours"])]
    return table


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--epochs", type=int, default=60, help="epochs of one cell")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--out-dir", type=Path, default=Path("results/study_packing"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=[], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    runs = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out_dir / "runs.csv", index=False)
    caption = (f"Cells per hour (harmonic mean over the 12 models) and hours of one cell of each "
               f"of the six networks' BN and MimicNorm twins, width {args.width:g}, batch "
               f"{args.batch}, a cell = {args.epochs} epochs of {args.train_images} train + "
               f"{args.test_images} test images; speed-up against --jobs 1 --threads 2 with the "
               "default layout under the same load")
    write_table(summary(runs, args), args.out_dir / "summary", caption)
    print((args.out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
