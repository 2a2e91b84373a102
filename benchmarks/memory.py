"""Memory and speed of one training step: every architecture, BN twin vs MimicNorm vs no norm.

For each architecture it builds four networks and runs the same SGD training step on the same
random batch:

* `plain`: the BatchNorm network;
* `cbn`: its MimicNorm twin (weight-mean projection included in the step);
* `nobn`: the MimicNorm twin without the last BN;
* `limit`: the plain network with every BatchNorm2d replaced by identity, the least a network of
  this topology can save for backward without recomputation.

and measures

* activation memory: bytes of the tensors autograd saves for backward during forward + loss
  (`saved_tensors_hooks`, each storage counted once, parameters and buffers excluded), which
  depends only on shapes and dtypes, so it is the same on any device;
* peak memory of the step above what is live before it (parameters, buffers, momentum): on CUDA
  `torch.cuda.max_memory_allocated`; on CPU the running sum of the CPU allocator's allocation
  events recorded by the profiler (`profile_memory=True`), i.e. allocator-level live bytes;
* median step time over `--steps` steps after `--warmup`, the variants interleaved step by step
  so that background load hits them alike (and, since load only ever slows a step down, the
  ratio of the fastest steps too); and the median time of the weight-mean projection.

    python -m benchmarks.memory --dataset cifar --batch-size 16 --out-dir results/memory
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import torch
from torch import nn

import models
from experiments.tables import markdown_table, write_table

# benchmark variant -> the registry variant it builds ("limit" then strips the BatchNorm2d)
MODEL_VARIANTS = {"plain": models.BN, "cbn": models.MIMIC, "nobn": models.NO_NORM,
                  "limit": models.BN}
VARIANTS = tuple(MODEL_VARIANTS)
RESOLUTION = {"cifar": 32, "imagenet": 224}
NUM_CLASSES = {"cifar": 100, "imagenet": 1000}
MIB = 2**20


def strip_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of `model` by `nn.Identity`, in place; returns `model`."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    return model


def build_variant(arch: str, variant: str, dataset: str) -> nn.Module:
    """The `variant` ("plain", "cbn", "nobn" or "limit") of registered architecture `arch`."""
    name = models.twin_name(arch, MODEL_VARIANTS[variant])
    model = models.create_model(name, NUM_CLASSES[dataset], dataset)
    return strip_batchnorm(model) if variant == "limit" else model


def state_storages(model: nn.Module) -> set[int]:
    """Storage addresses of the parameters and buffers of `model`."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_tensor_bytes(forward: Callable[[], object], exclude: Iterable[int] = ()) -> int:
    """Bytes of the storages autograd saves while `forward()` runs, each once, `exclude` left out."""
    excluded = set(exclude)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


class TrainStep:
    """One SGD step of `model` on a fixed random batch; `projection` (weight mean) runs after it."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        resolution: int,
        num_classes: int,
        device: torch.device,
        amp: bool = False,
        channels_last: bool = False,
        projection: Callable[[], None] | None = None,
    ) -> None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format).train()
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, resolution, resolution, generator=generator)
        self.images = images.to(device=device, memory_format=memory_format)
        self.labels = torch.randint(num_classes, (batch_size,), generator=generator).to(device)
        self.device = device
        self.amp = amp
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.projection = projection

    def loss(self) -> torch.Tensor:
        """Forward pass and cross-entropy loss (bf16 autocast with `amp`)."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        with autocast:
            return nn.functional.cross_entropy(self.model(self.images), self.labels)

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        if self.projection is not None:
            self.projection()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `fn()`, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during `step()` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_peak_step_bytes(step)


def cpu_peak_step_bytes(step: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocations and frees the profiler records during `step()`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


@dataclass
class Row:
    """Measurements of one variant of one architecture."""

    arch: str
    variant: str
    saved_mib: float
    peak_mib: float = math.nan
    step_ms: float = math.nan
    projection_ms: float = math.nan
    step_times: list[float] = field(default_factory=list, repr=False)


def benchmark_arch(arch: str, args: argparse.Namespace) -> dict[str, Row]:
    """Measure the four variants of `arch` under the settings in `args`."""
    device = torch.device(args.device)
    rule = models.centring_rule(args.dataset)
    steps: dict[str, TrainStep] = {}
    rows: dict[str, Row] = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = build_variant(arch, variant, args.dataset)
        projection = models.WeightMean(model, rule) if models.is_mimicnorm(model) else None
        step = TrainStep(model, args.batch_size, RESOLUTION[args.dataset], NUM_CLASSES[args.dataset],
                         device, args.amp, args.channels_last, projection)
        saved = saved_tensor_bytes(step.loss, state_storages(model))
        rows[variant] = Row(arch, variant, saved / MIB)
        steps[variant] = step
        if not args.no_peak:
            step()  # allocate the momentum buffers before measuring
            rows[variant].peak_mib = peak_step_bytes(step, device) / MIB
    if args.steps > 0:
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for _ in range(args.steps):
            for variant, step in steps.items():
                rows[variant].step_times.append(timed(step, device))
        for row in rows.values():
            row.step_ms = 1e3 * statistics.median(row.step_times)
        projection = steps["cbn"].projection
        rows["cbn"].projection_ms = 1e3 * statistics.median(
            timed(projection, device) for _ in range(max(args.steps, 5))
        )
    return rows


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing."""
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def summary(rows: dict[str, Row]) -> dict[str, object]:
    """One table row for an architecture: absolute figures and the ratios that matter."""
    plain, cbn, nobn, limit = (rows[v] for v in VARIANTS)
    return {
        "arch": plain.arch,
        "saved_plain_MiB": plain.saved_mib,
        "saved_cbn_MiB": cbn.saved_mib,
        "saved_nobn_MiB": nobn.saved_mib,
        "saved_limit_MiB": limit.saved_mib,
        "saved_limit/plain": ratio(limit.saved_mib, plain.saved_mib),
        "saved_cbn/plain": ratio(cbn.saved_mib, plain.saved_mib),
        "saved_cbn/limit": ratio(cbn.saved_mib, limit.saved_mib),
        "saved_cbn/nobn": ratio(cbn.saved_mib, nobn.saved_mib),
        "peak_plain_MiB": plain.peak_mib,
        "peak_cbn_MiB": cbn.peak_mib,
        "peak_cbn/plain": ratio(cbn.peak_mib, plain.peak_mib),
        "peak_cbn/nobn": ratio(cbn.peak_mib, nobn.peak_mib),
        "step_plain_ms": plain.step_ms,
        "step_cbn_ms": cbn.step_ms,
        "step_nobn_ms": nobn.step_ms,
        "step_cbn/plain": ratio(cbn.step_ms, plain.step_ms),
        "step_cbn/plain_min": ratio(min(cbn.step_times, default=math.nan),
                                    min(plain.step_times, default=math.nan)),
        "step_cbn/nobn": ratio(cbn.step_ms, nobn.step_ms),
        "weight_mean_ms": cbn.projection_ms,
        "weight_mean_%_of_cbn_step": 100 * ratio(cbn.projection_ms, cbn.step_ms),
    }


def plot_ratios(table: list[dict[str, object]], path: Path, title: str) -> None:
    """Grouped bars per architecture: saved-bytes, peak and step-time ratios of cbn to plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        "saved_limit/plain", "saved_cbn/plain", "saved_cbn/nobn", "peak_cbn/plain", "step_cbn/plain"
    ]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(table)), 4.8))
    for i, key in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(table))]
        ax.bar(xs, [row[key] for row in table], width, label=key)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), [str(row["arch"]) for row in table], rotation=30, ha="right")
    ax.set_ylabel("ratio")
    ax.set_title(textwrap.fill(title, 140), fontsize=8)
    ax.legend(fontsize=7, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.38))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def settings_line(args: argparse.Namespace) -> str:
    """The measurement settings, as one line for table captions."""
    cuda = args.device.startswith("cuda")
    peak = "torch.cuda.max_memory_allocated" if cuda else "CPU allocator events (profiler)"
    return (f"{args.dataset} {RESOLUTION[args.dataset]}px, batch {args.batch_size}, "
            f"device {args.device}, amp={'bf16' if args.amp else 'off'}, "
            f"channels_last={args.channels_last}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; peak = {peak}, above the step's start; "
            f"step = median of {args.steps} after {args.warmup} warm-up, variants interleaved; "
            f"load average at the end {os.getloadavg()[0]:.1f}")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=list(RESOLUTION), default="cifar")
    parser.add_argument("--arch", action="append", help="architecture (repeatable); default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (0: no timing)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--out-dir", type=Path, help="write <name>.csv, <name>.md and <name>.png here")
    parser.add_argument("--name", help="file stem in --out-dir (default memory_<dataset>)")
    return parser


def main(args: argparse.Namespace) -> list[dict[str, object]]:
    """Run the benchmark, print the table, and write CSV / markdown / PNG when asked."""
    archs = args.arch or models.list_archs(args.dataset)
    table = []
    for arch in archs:
        table.append(summary(benchmark_arch(arch, args)))
        print(markdown_table(table[-1:]).splitlines()[-1], flush=True)
    frame = pd.DataFrame(table)
    caption = settings_line(args)
    text = f"{caption}\n\n{markdown_table(frame)}\n"
    print("\n" + text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_dir / (args.name or f"memory_{args.dataset}")
        write_table(frame, stem, caption)
        plot_ratios(table, stem.with_suffix(".png"), caption)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
