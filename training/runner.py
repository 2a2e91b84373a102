"""The training program shared by the entry points: `run(args, data)` sets up devices and defaults,
then trains (`Trainer`) or evaluates a checkpoint; `main` turns how it ended into an exit code."""
from __future__ import annotations

import argparse
import re
import signal
import sys

import torch
from torch import nn

import models

from .checkpoint import load_checkpoint
from .cli import Recipe, check_args, default_lr
from .data import DataSource, build_loaders
from .distributed import Runtime, cleanup, setup_runtime, wrap_model
from .engine import AMP_DTYPES, evaluate, shutdown_workers
from .errors import RunError, UsageError
from .resume import resume_path
from .rng import deterministic_algorithms
from .tensorboard_log import require_tensorboard
from .trainer import (RunResult, Trainer, build_net, evaluated_images, expected_header,
                      load_split, say, show_progress)


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"
BATCH_OF_ONE = "Expected more than 1 value per channel when training"


def main(args: argparse.Namespace, data: DataSource) -> int:
    """`run`, reporting why it ended early as one line on stderr; returns the exit code:
    2 bad input, 3 diverged, 1 another failure (a full disk, out of memory), 128 + signal
    when stopped."""
    try:
        run(args, data)
    except RunError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except (RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
        failure = resource_failure(e, args)
        if failure is None:  # a bug: keep the traceback
            raise
        print(f"error: {failure[0]}", file=sys.stderr)
        return failure[1]
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
    if args.resume:
        args.resume = resume_path(args.resume)
    with deterministic_algorithms(args.deterministic):
        rt = setup_runtime(args.gpu)
        try:
            resolve_defaults(args, data.recipe, rt)
            check_last_bn_batch(args, rt)
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


def resource_failure(error: Exception, args: argparse.Namespace) -> tuple[str, int] | None:
    """The one-line message and exit code of a run that asked for more than the machine or the
    network allows (out of memory: 1; a BatchNorm on a single value: 2), else None."""
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError) or CPU_OUT_OF_MEMORY in text:
        return out_of_memory_message(error, args), 1
    if isinstance(error, ValueError) and BATCH_OF_ONE in text:
        hint = " or --image-size" if "image_size" in args else ""
        return (f"a BatchNorm layer of {args.arch} got a single value per channel in training "
                f"(a batch of one image at a 1x1 feature map, -b {args.batch_size}): use a "
                f"larger -b{hint}"), 2
    return None


def out_of_memory_message(error: Exception, args: argparse.Namespace) -> str:
    """One line for an allocation that failed: the size asked for and what to lower."""
    text = str(error)
    asked = re.search(r"[Tt]ried to allocate (\d+) bytes", text)
    size = (f"{int(asked[1]) / 2**30:.1f} GiB" if asked else
            (re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text) or [None, None])[1])
    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "CPU"
    return (f"out of {where} memory: an allocation of {size or 'unknown size'} failed; lower -b "
            f"(it is {args.batch_size}) or --width (it is {args.width:g}); checkpoints already "
            "on disk are intact")


def replica_batches(batch_size: int, rt: Runtime) -> list[int]:
    """The images each model replica sees per step: DataParallel splits a batch as
    `torch.chunk` does; under torchrun and on one device a replica gets all of -b."""
    if rt.distributed or len(rt.device_ids) < 2:
        return [batch_size]
    chunk = -(-batch_size // len(rt.device_ids))
    return [chunk] * (batch_size // chunk) + [batch_size % chunk] * bool(batch_size % chunk)


def check_last_bn_batch(args: argparse.Namespace, rt: Runtime) -> None:
    """Refuse a batch in which the last BN of a MimicNorm network would see one sample per step:
    batch statistics need two (the incomplete last batch of an epoch is always dropped;
    --evaluate uses the running statistics)."""
    if args.evaluate or not models.is_mimicnorm_name(args.arch):
        return
    smallest = min(replica_batches(args.batch_size, rt))
    synced = args.sync_lastbn and rt.distributed
    if smallest * (rt.world_size if synced else 1) > 1:
        return
    if len(rt.device_ids) > 1 and not rt.distributed:
        where = (f"split over {len(rt.device_ids)} GPUs (DataParallel) gives a GPU one image per "
                 f"step; use -b {2 * len(rt.device_ids)} or more")
    elif rt.distributed:
        where = ("gives each torchrun process one image per step; use -b 2 or more, or "
                 "--sync-lastbn")
    else:
        where = "is one image per step; use -b 2 or more"
    raise UsageError(f"-b {args.batch_size} {where}: the last BN of {args.arch} normalises the "
                     "logits with batch statistics, which need at least two images")


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
