"""Training images/s of one CIFAR configuration, timed after a warm-up (CUDA events on a GPU).

    python -m benchmarks.train_speed --warmup 10 --steps 30 --result speed.json -- \\
        -a resnet18_cbn --weight mean -ds folder --data-dir DIR --loader device --amp bf16

Everything after `--` is `Cifar/main.py`'s command line. The run trains with the same loaders,
model, optimizer, weight-mean hook and `train_one_epoch` as `Cifar/main.py`, and writes no run
folder: it times steps `warmup`+1 .. `warmup`+`steps` of the first epoch, then stops. On a GPU
the time is that between two CUDA events recorded on the stream after those steps, so it is the
device's steady rate, data loading included, without cuDNN autotuning or compilation (which the
warm-up steps absorb). The result is one JSON object, printed and written to `--result`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from Cifar.data_loader import CifarData
from Cifar.utils import get_args_parser as cifar_args_parser
from training.cli import check_args, positive_int
from training.distributed import cleanup, setup_runtime, wrap_model
from training.engine import AMP_DTYPES, EpochState, train_one_epoch
from training.errors import RunError, UsageError
from training.runner import resolve_defaults
from training.trainer import Trainer


class StepTimer:
    """The engine's `after_step`: marks the end of step `warmup` and of step `warmup + steps`
    (CUDA events on a GPU, the wall clock on the CPU, where steps run synchronously), then stops
    the epoch."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.marks: list[torch.cuda.Event | float] = []

    def __call__(self, state: EpochState, loss: torch.Tensor, lr: float) -> bool:
        if state.step in (self.warmup, self.warmup + self.steps):
            self.marks.append(self._mark())
        return state.step >= self.warmup + self.steps

    def _mark(self) -> torch.cuda.Event | float:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> float:
        """Time between the two marks (waits for the second on a GPU)."""
        start, end = self.marks
        if self.device.type != "cuda":
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def measure(cifar_argv: list[str], warmup: int, steps: int) -> dict[str, float]:
    """Images/s of the configuration `cifar_argv` over `steps` steps after `warmup` steps."""
    args = cifar_args_parser().parse_args(cifar_argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = CifarData()
    rt = setup_runtime(args.gpu)
    try:
        resolve_defaults(args, data.recipe, rt)
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        trainer = Trainer(args, data, rt)
        if trainer.steps < warmup + steps:
            raise UsageError(f"an epoch has {trainer.steps} steps, fewer than --warmup {warmup} + "
                             f"--steps {steps}: use more images or a smaller batch")
        model = wrap_model(trainer.net, rt, AMP_DTYPES.get(args.amp))
        model = torch.compile(model) if args.compile else model
        timer = StepTimer(rt.device, warmup, steps)
        trainer.train_loader.sampler.set_epoch(0)
        train_one_epoch(model, nn.CrossEntropyLoss(), trainer.optimizer, trainer.scheduler,
                        trainer.train_loader, rt.device, EpochState(0, trainer.steps),
                        after_step=timer, amp=args.amp, scaler=trainer.scaler,
                        channels_last=args.channels_last)
        seconds = timer.seconds()
    finally:
        cleanup()
    images = steps * args.batch_size * rt.world_size
    return {"images_per_s": images / seconds, "step_ms": 1000 * seconds / steps,
            "warmup_steps": warmup, "timed_steps": steps, "batch_size": args.batch_size}


def main(argv: list[str] | None = None) -> int:
    """Parse, measure, print and write the result; bad input is one `error:` line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    ours, cifar_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=positive_int, default=10,
                        help="steps before the timing starts")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps")
    parser.add_argument("--result", type=Path, help="also write the JSON result here")
    opts = parser.parse_args(ours)
    try:
        result = measure(cifar_argv, opts.warmup, opts.steps)
    except RunError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result), flush=True)
    if opts.result is not None:
        opts.result.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
