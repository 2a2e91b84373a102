"""The training program shared by the entry points: `run(args, data)` sets up devices and defaults,
then trains (`Trainer`) or evaluates a checkpoint; `main` turns how it ended into an exit code."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .cli import Recipe, check_args, default_lr
from .data import DataSource, build_loaders
from .distributed import Runtime, cleanup, setup_runtime, wrap_model
from .engine import AMP_DTYPES, evaluate, shutdown_workers
from .errors import RunError, UsageError
from .rng import deterministic_algorithms
from .tensorboard_log import require_tensorboard
from .trainer import (RunResult, Trainer, build_net, evaluated_images, expected_header,
                      load_split, say, show_progress)


def main(args: argparse.Namespace, data: DataSource) -> int:
    """`run`, reporting why it ended early as one line on stderr; returns the exit code:
    2 bad input, 3 diverged, 1 another failure (e.g. a full disk), 128 + signal when stopped."""
    try:
        run(args, data)
    except RunError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"aborted by {e or 'Ctrl-C'}: checkpoints already on disk are complete",
              file=sys.stderr)
        return 128 + signal.SIGINT.value
    return 0


def run(args: argparse.Namespace, data: DataSource) -> RunResult:
    """Train (or with `--evaluate` test a checkpoint) as the flags in `args` say."""
    check_args(args)
    if args.tensorboard:
        require_tensorboard()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and Path(args.resume).is_dir():
        args.resume = str(Path(args.resume) / "last.pt")
    with deterministic_algorithms(args.deterministic):
        rt = setup_runtime(args.gpu)
        try:
            resolve_defaults(args, data.recipe, rt)
            if args.compile and len(rt.device_ids) > 1 and not rt.distributed:
                raise UsageError("--compile does not work with DataParallel; launch one process "
                                 "per GPU with torchrun instead")
            if rt.device.type == "cuda" and not args.deterministic:
                torch.backends.cudnn.benchmark = True
            if args.evaluate:
                return evaluate_checkpoint(args, data, rt)
            return Trainer(args, data, rt).fit()
        finally:
            cleanup()


def resolve_defaults(args: argparse.Namespace, recipe: Recipe, rt: Runtime) -> None:
    """Fill in, in `args`, the defaults that depend on this run's devices and processes: the
    learning rate (the recipe's rule on the global batch) and `--loader auto`."""
    if args.lr is None:
        args.lr = default_lr(recipe, args.batch_size, rt.world_size)
    if args.loader == "auto":
        args.loader = "device" if rt.device.type == "cuda" else "pil"


def evaluate_checkpoint(args: argparse.Namespace, data: DataSource, rt: Runtime) -> RunResult:
    """`--evaluate`: the `--resume` checkpoint's loss, top-1 and top-5 on the test split."""
    test_set, classes = load_split(args, data, rt, train=False)
    ckpt = load_checkpoint(args.resume, expected_header(args, data, classes))
    net = build_net(args, data, rt, len(classes))
    net.load_state_dict(ckpt.model)
    # DDP adds nothing to evaluation
    model = net if rt.distributed else wrap_model(net, rt, AMP_DTYPES.get(args.amp))
    _, test_loader = build_loaders(None, test_set, args, rt)
    try:
        stats = evaluate(torch.compile(model) if args.compile else model, nn.CrossEntropyLoss(),
                         test_loader, rt.device, amp=args.amp, channels_last=args.channels_last,
                         progress=show_progress(args, rt), max_batches=args.max_steps)
    finally:
        shutdown_workers(test_loader)
    say(rt, f"{args.resume} (epoch {ckpt.epoch}) on {evaluated_images(args, test_set)} "
            f"{args.dataset} {data.recipe.eval_split} images: loss {stats['loss']:.4f} top-1 "
            f"{stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}%")
    return RunResult(net, stats, ckpt.best_acc1, None)
