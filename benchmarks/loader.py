"""Images per second of the CIFAR training data paths, and of training with each.

Paths, all with the paper's augmentation (crop 32 pad 4, flip, rotation +-15) and normalisation:

* `pil-global-seed`: PIL transforms in DataLoader workers, each sample seeded with
  torch.manual_seed (the data path before the seeding fix; slow in a CUDA build of torch, which
  queues a lazy CUDA seed with a captured stack trace on every call);
* `pil`: the same with only the CPU generator seeded (`training.SeededSamples`), same images;
* `device`: the split decoded once into a uint8 tensor on `--device`, whole batches augmented
  there (`training.device_loader`); its one-off decode time is reported apart.

Loader rows time one pass over `--images` training images for each worker count (workers do not
apply to `device`); training rows time `--train-steps` SGD steps of `--arch` fed by each path.
Ratios are against `pil-global-seed` in the same run.

    python -m benchmarks.loader --data-dir /tmp/cifar10-jpeg --out-dir results/loader
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import models
from Cifar.data_loader import CifarData, load_tensors
from Cifar.utils import get_args_parser as cifar_args_parser
from experiments.tables import markdown_table, write_table
from training import ResumableSampler, Runtime, SeededSamples, build_loaders
from training.data import sample_seed
from training.device_loader import TensorImages
from training.engine import loader_batches, shutdown_workers

PATHS = ("pil-global-seed", "pil", "device")


class GlobalSeededSamples(SeededSamples):
    """The seeding before the fix: torch.manual_seed per sample (CPU and, lazily, CUDA)."""

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self._read(index)


def cifar_args(args: argparse.Namespace, workers: int) -> argparse.Namespace:
    """Cifar/main.py's flags for a `-ds folder` run on `args.data_dir`."""
    return cifar_args_parser().parse_args([
        "-a", args.arch, "-ds", "folder", "--data-dir", str(args.data_dir), "-b",
        str(args.batch_size), "-j", str(workers)])


def training_loader(path: str, args: argparse.Namespace, workers: int,
                    decoded: TensorImages) -> Iterable:
    """A training loader of `path` over `args.images` images spread over the split; the device
    path takes them from the `decoded` split."""
    cifar = cifar_args(args, workers)
    rt = Runtime(torch.device(args.device))
    if path == "device":
        keep = torch.linspace(0, len(decoded) - 1, args.images).long()
        subset = copy.copy(decoded)
        subset.images, subset.labels = decoded.images[keep], decoded.labels[keep]
        return build_loaders(subset, subset, cifar, rt)[0]
    full, _ = CifarData().load(cifar, train=True)
    subset = Subset(full, torch.linspace(0, len(full) - 1, args.images).long().tolist())
    if path == "pil":
        return build_loaders(subset, subset, cifar, rt)[0]
    sampler = ResumableSampler(subset, args.batch_size, num_replicas=1, rank=0, seed=0)
    return DataLoader(GlobalSeededSamples(subset, 0), batch_size=args.batch_size,
                      sampler=sampler, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def images_per_second(loader: Iterable, device: torch.device) -> float:
    """One epoch through `loader`, images per second (worker start-up included)."""
    loader.sampler.set_epoch(1)
    start, count = time.perf_counter(), 0
    with loader_batches(loader) as batches:
        for images, _ in batches:
            images = images.to(device)
            count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def training_images_per_second(loader: Iterable, args: argparse.Namespace) -> float:
    """Images per second of `args.train_steps` SGD + weight-mean steps of `args.arch` on batches
    of `loader`, after one warm-up step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = models.create_model(args.arch, 10, "cifar").to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    project = models.WeightMean(net, models.CIFAR_RULE)
    loss_fn = nn.CrossEntropyLoss()
    loader.sampler.set_epoch(2)
    with loader_batches(loader) as batches:
        for step, (images, target) in enumerate(batches):
            if step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            if step == args.train_steps + 1:
                break
            loss = loss_fn(net(images.to(device)), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            project()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return args.train_steps * args.batch_size / (time.perf_counter() - start)


def run_benchmark(args: argparse.Namespace) -> tuple[list[dict[str, object]], float]:
    """Rows of the loader and training tables, and the device path's decode seconds."""
    device = torch.device(args.device)
    start = time.perf_counter()
    decoded = load_tensors(cifar_args(args, max(args.workers)), train=True)
    decode = time.perf_counter() - start
    rows: list[dict[str, object]] = []
    for workers in args.workers:
        for path in PATHS:
            if path == "device" and workers != args.workers[0]:
                continue
            loader = training_loader(path, args, workers, decoded)
            try:
                rate = images_per_second(loader, device)
            finally:
                shutdown_workers(loader)
            rows.append({"measure": "loader", "path": path,
                         "workers": "-" if path == "device" else workers, "images_per_s": rate})
            print(rows[-1], flush=True)
    if args.train_steps:
        workers = max(args.workers)
        for path in PATHS:
            loader = training_loader(path, args, workers, decoded)
            try:
                rate = training_images_per_second(loader, args)
            finally:
                shutdown_workers(loader)
            rows.append({"measure": f"train {args.arch}", "path": path,
                         "workers": "-" if path == "device" else workers, "images_per_s": rate})
            print(rows[-1], flush=True)
    for row in rows:
        base = next(r for r in rows if r["measure"] == row["measure"]
                    and r["path"] == PATHS[0] and (r["workers"] == row["workers"]
                                                   or row["path"] == "device"))
        row["vs_pil-global-seed"] = row["images_per_s"] / base["images_per_s"]
    return rows, decode


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="an ImageFolder tree with train/<class>/<32x32 image>")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2048, help="training images per pass")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arch", default="resnet18_cbn")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="timed training steps per path (0: loader rows only)")
    parser.add_argument("--out-dir", type=Path, help="write loader.csv and loader.md here")
    return parser


def main(args: argparse.Namespace) -> list[dict[str, object]]:
    """Run the benchmark, print the table, and write CSV / markdown when asked."""
    rows, decode = run_benchmark(args)
    caption = (f"CIFAR training data paths on {args.device}: {args.images} images per loader "
               f"pass, batch {args.batch_size}; training rows: {args.train_steps} steps of "
               f"{args.arch} after 1 warm-up; device path's one-off decode of the whole split "
               f"with {max(args.workers)} workers: {decode:.1f} s; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average at the "
               f"end {os.getloadavg()[0]:.1f}")
    frame = pd.DataFrame(rows)
    print(f"\n{caption}\n\n{markdown_table(frame)}\n")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_table(frame, args.out_dir / "loader", caption)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
