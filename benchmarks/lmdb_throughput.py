"""Read throughput of the ImageNet LMDB against ImageFolder on the same images.

Images per second through a shuffled DataLoader, JPEG decode and the eval transform (resize,
centre crop, to tensor, normalise) included, for each format in turn, and the CPU time per image
of one process reading without workers (a figure that other jobs on the machine barely move):

    python benchmarks/lmdb_throughput.py                            # generated 500x375 JPEGs
    python benchmarks/lmdb_throughput.py --src /tmp/cifar10-jpeg/train --image-size 32

The files are read from the page cache after the first pass; on a cold cache or a network file
system the gap between one big file and many small ones is larger than what this shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ImageNet.data_loader import (
    LMDBImageFolder,
    default_val_resize,
    image_folder,
    val_transform,
)
from ImageNet.folder2lmdb import convert


def generate_jpegs(
    root: Path, count: int, classes: int, size: tuple[int, int], seed: int = 0
) -> Path:
    """``count`` photo-like JPEGs (smooth colour fields plus grain) in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = pixels + rng.normal(0, 8, pixels.shape).astype(np.int16)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def one_pass(loader: DataLoader) -> float:
    """Images per second for one pass over ``loader``."""
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def cpu_ms_per_image(dataset: Dataset, indices: list[int]) -> float:
    """CPU time per item in this process (no workers): unlike wall time, robust to other load."""
    start = time.process_time()
    for i in indices:
        dataset[i]
    return 1000 * (time.process_time() - start) / len(indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="ImageFolder to read (default: generate JPEGs)")
    parser.add_argument("--generate", type=int, default=2000, help="how many JPEGs to generate")
    parser.add_argument(
        "--generate-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H")
    )
    parser.add_argument("--limit", type=int, help="read only this many (a fixed random subset)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3, help="the first warms caches and workers")
    parser.add_argument(
        "--cpu-sample", type=int, default=1000, help="images read in-process to time CPU cost"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in DataLoader workers, for the in-process CPU time

    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "images"
        src = args.src or generate_jpegs(generated, args.generate, 10, args.generate_size)
        start = time.perf_counter()
        index = convert(src, Path(tmp) / "images.lmdb", progress=False)
        convert_rate = len(index) / (time.perf_counter() - start)
        transform = val_transform(args.image_size, default_val_resize(args.image_size))
        datasets = {
            "lmdb": LMDBImageFolder(Path(tmp) / "images.lmdb", transform),
            "folder": image_folder(Path(src), transform),
        }
        count = min(args.limit or len(index), len(index))
        subset = np.random.default_rng(0).permutation(len(index))[:count].tolist()
        print(
            f"{count} images from {src}, {args.workers} workers, batch {args.batch_size}, eval "
            f"transform at {args.image_size}px; conversion ran at {convert_rate:.0f} images/s"
        )
        loaders = {
            name: DataLoader(
                Subset(dataset, subset),
                args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                persistent_workers=args.workers > 0,
            )
            for name, dataset in datasets.items()
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.passes):  # alternate formats so that load from other jobs hits both
            for name, loader in loaders.items():
                rates[name].append(one_pass(loader))
        for name, history in rates.items():
            steady = statistics.median(history[1:] or history)
            passes = ", ".join(f"{rate:.1f}" for rate in history)
            cpu = cpu_ms_per_image(datasets[name], subset[: args.cpu_sample])
            print(f"{name:>6}: {steady:8.1f} images/s (passes: {passes}); {cpu:.3f} CPU ms/image")

if __name__ == "__main__":
    main()
