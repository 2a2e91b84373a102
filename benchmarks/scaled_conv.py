"""Which formulation of the learnable branch scalar saves least for backward (and runs fastest).

Three exact formulations of `scale * conv(x)` swapped into every `ScaledConv2d` of a `_cbn` model:

* `separate`: the conv, then a multiply by the scalar (the reference code): the multiply saves
  the conv output for the scalar's gradient;
* `folded`: `conv(x, scale * W, scale * b)` by plain autograd: no output saved, but autograd keeps
  the non-parameter product `scale * W` (parameter-sized) for the conv's backward;
* `custom` (what `ScaledConv2d` does): the same fold in a custom autograd function that saves only
  x and the parameters and recomputes `scale * W` in backward.

    python -m benchmarks.scaled_conv --batch-size 16
"""
from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from benchmarks.memory import (MIB, NUM_CLASSES, RESOLUTION, TrainStep, build_variant,
                               markdown_table, saved_tensor_bytes, state_storages, timed)
from models.mimicnorm import ScaledConv2d


def separate_forward(conv: ScaledConv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv, then a separate multiply by the scalar."""
    return conv.scale * conv._conv_forward(x, conv.weight, conv.bias)


def folded_forward(conv: ScaledConv2d, x: torch.Tensor) -> torch.Tensor:
    """The scalar folded into weight and bias, differentiated by plain autograd."""
    bias = None if conv.bias is None else conv.bias * conv.scale
    return conv._conv_forward(x, conv.weight * conv.scale, bias)


FORMULATIONS: dict[str, Callable[[ScaledConv2d, torch.Tensor], torch.Tensor] | None] = {
    "separate": separate_forward,
    "folded": folded_forward,
    "custom": None,  # ScaledConv2d.forward as shipped
}


@contextmanager
def formulation(name: str) -> Iterator[None]:
    """Swap `ScaledConv2d.forward` for the formulation `name` inside the block."""
    shipped = ScaledConv2d.forward
    replacement = FORMULATIONS[name]
    if replacement is not None:
        ScaledConv2d.forward = replacement  # type: ignore[method-assign]
    try:
        yield
    finally:
        ScaledConv2d.forward = shipped  # type: ignore[method-assign]


def compare(arch: str, args: argparse.Namespace) -> dict[str, object]:
    """Saved MiB (and median step ms) of each formulation in `arch`_cbn, and the BN-free limit."""
    device = torch.device(args.device)
    shape = (args.batch_size, RESOLUTION[args.dataset], NUM_CLASSES[args.dataset], device)
    row: dict[str, object] = {"arch": arch}
    torch.manual_seed(0)
    limit = build_variant(arch, "limit", args.dataset)
    limit_step = TrainStep(limit, *shape, amp=args.amp)
    row["limit_MiB"] = saved_tensor_bytes(limit_step.loss, state_storages(limit)) / MIB
    torch.manual_seed(0)
    model = build_variant(arch, "cbn", args.dataset)
    step = TrainStep(model, *shape, amp=args.amp)
    times: dict[str, list[float]] = {name: [] for name in FORMULATIONS}
    for name in FORMULATIONS:
        with formulation(name):
            row[f"{name}_MiB"] = saved_tensor_bytes(step.loss, state_storages(model)) / MIB
            for _ in range(args.warmup if args.steps else 0):
                step()
    for _ in range(args.steps):  # formulations interleaved step by step, like benchmarks.memory
        for name in FORMULATIONS:
            with formulation(name):
                times[name].append(timed(step, device))
    for name in FORMULATIONS:
        if args.steps:
            row[f"{name}_ms"] = 1e3 * statistics.median(times[name])
    for name in FORMULATIONS:
        row[f"{name}/limit"] = row[f"{name}_MiB"] / row["limit_MiB"]
    return row


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=list(RESOLUTION), default="cifar")
    parser.add_argument("--arch", action="append",
                        help="architecture with ScaledConv2d (repeatable); default: CIFAR "
                             "resnet18, resnet50, shufflenetv2, mobilenetv2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: memory only)")
    parser.add_argument("--warmup", type=int, default=1)
    return parser


def main(args: argparse.Namespace) -> list[dict[str, object]]:
    """Print one markdown row per architecture."""
    archs = args.arch or ["resnet18", "resnet50", "shufflenetv2", "mobilenetv2"]
    table = [compare(arch, args) for arch in archs]
    print(f"{args.dataset}, batch {args.batch_size}, amp={args.amp}, device {args.device}\n")
    print(markdown_table(table))
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
