"""The training program shared by the entry points: `run(args, data)` wires data, model, optimizer,
schedule, checkpoints and logs around `train_one_epoch` and `evaluate`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import models

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointSaver, load_checkpoint
from .cli import args_to_dict, check_args
from .data import DataSource, build_loaders
from .distributed import (Runtime, broadcast_buffers, cleanup, gather_objects, main_process_first,
                          setup_runtime, sync_last_bn_, wrap_model)
from .engine import evaluate, train_one_epoch
from .errors import UsageError
from .logger import CsvLog, format_row, peak_memory_mb, reset_peak_memory
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .schedule import WarmupMultiStepLR

# Flags whose new values a resumed run cannot honour: the checkpoint's optimizer and schedule win.
RECIPE_FLAGS = ("batch_size", "lr", "weight_decay", "momentum", "warm", "milestones", "gamma",
                "max_steps")


@dataclass
class RunResult:
    """What a run leaves behind in the calling process."""

    model: nn.Module  # the trained network, unwrapped
    metrics: dict[str, float]  # the last epoch's log row, or the evaluation's loss/acc1/acc5
    best_acc1: float | None
    run_dir: Path | None  # None for --evaluate and on processes other than rank 0


def main(args: argparse.Namespace, data: DataSource) -> int:
    """`run`, reporting bad input as one `error: ...` line on stderr; returns the exit code."""
    try:
        run(args, data)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run(args: argparse.Namespace, data: DataSource) -> RunResult:
    """Train (or with `--evaluate` test a checkpoint) as the flags in `args` say."""
    check_args(args)
    rt = setup_runtime(args.gpu)
    try:
        if args.compile and len(rt.device_ids) > 1 and not rt.distributed:
            raise UsageError("--compile does not work with DataParallel; launch one process per "
                             "GPU with torchrun instead")
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return _evaluate_checkpoint(args, data, rt) if args.evaluate else _train(args, data, rt)
    finally:
        cleanup()


def _say(rt: Runtime, message: str) -> None:
    if rt.is_main:
        print(message, flush=True)


def _load_split(args: argparse.Namespace, data: DataSource, rt: Runtime, train: bool
                ) -> tuple[Dataset, int]:
    with main_process_first(rt):  # rank 0 downloads, the others then find the files
        return data.load(args, train=train)


def _build_net(args: argparse.Namespace, data: DataSource, rt: Runtime, num_classes: int
               ) -> nn.Module:
    seed_everything(args.seed)  # the same initial weights in every process
    net = models.create_model(args.arch, num_classes, data.family)
    if args.sync_lastbn and rt.distributed:
        sync_last_bn_(net)
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    return net.to(rt.device, memory_format=fmt)


def _describe(rt: Runtime) -> str:
    if rt.distributed:
        backend = "NCCL" if rt.device_ids else "gloo"
        return f"{rt.world_size} processes ({backend}, {rt.device.type})"
    if len(rt.device_ids) > 1:
        return f"DataParallel over GPUs {','.join(map(str, rt.device_ids))}"
    return str(rt.device)


def _evaluate_checkpoint(args: argparse.Namespace, data: DataSource, rt: Runtime) -> RunResult:
    test_set, num_classes = _load_split(args, data, rt, train=False)
    ckpt = load_checkpoint(args.resume, {"arch": args.arch, "num_classes": num_classes})
    net = _build_net(args, data, rt, num_classes)
    net.load_state_dict(ckpt["model"])
    model = net if rt.distributed else wrap_model(net, rt)  # DDP adds nothing to evaluation
    _, test_loader = build_loaders(None, test_set, args, rt)
    stats = evaluate(torch.compile(model) if args.compile else model, nn.CrossEntropyLoss(),
                     test_loader, rt.device, amp=args.amp, channels_last=args.channels_last,
                     progress=_progress(args, rt))
    _say(rt, f"{args.resume} (epoch {ckpt['epoch']}) on {len(test_set)} {args.dataset} test "
             f"images: loss {stats['loss']:.4f} top-1 {stats['acc1']:.2f}% "
             f"top-5 {stats['acc5']:.2f}%")
    return RunResult(net, stats, ckpt["best_acc1"], None)


def _progress(args: argparse.Namespace, rt: Runtime) -> bool:
    return rt.is_main and not args.no_progress and sys.stderr.isatty()


def _run_dir(args: argparse.Namespace) -> Path:
    """OUT_DIR/ARCH/RUN_NAME; a resumed run without --run-name continues in the checkpoint's folder.

    Refuses a folder that holds another run's last.pt, so a typo cannot overwrite a finished run.
    """
    if args.run_name:
        run_dir = Path(args.out_dir) / args.arch / args.run_name
    elif args.resume:
        run_dir = Path(args.resume).parent
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{args.dataset}-{args.weight}-s{args.seed}-{stamp}"
        run_dir = Path(args.out_dir) / args.arch / name
    continuing = args.resume and Path(args.resume).resolve().parent == run_dir.resolve()
    if (run_dir / "last.pt").exists() and not continuing:
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume "
                         f"{run_dir / 'last.pt'} or choose another --run-name")
    return run_dir


def _restore(ckpt: dict[str, Any], args: argparse.Namespace, rt: Runtime, net: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: WarmupMultiStepLR) -> None:
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if len(ckpt["rng"]) == rt.world_size:
        restore_rng_state(ckpt["rng"][rt.rank], rt.device_ids)
    else:
        _say(rt, f"note: the checkpoint was written by {len(ckpt['rng'])} process(es), this run "
                 f"has {rt.world_size}: random streams start afresh")
    changed = [f"{k} {ckpt['args'].get(k)} -> {getattr(args, k)}" for k in RECIPE_FLAGS
               if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        _say(rt, f"note: resumed with changed flags ({'; '.join(changed)}); the checkpoint's "
                 "optimizer and learning-rate schedule continue unchanged")
    _say(rt, f"resumed from {args.resume}: {ckpt['epoch']} epochs done")


def _train(args: argparse.Namespace, data: DataSource, rt: Runtime) -> RunResult:
    run_dir = _run_dir(args)
    test_set, num_classes = _load_split(args, data, rt, train=False)
    ckpt = None
    if args.resume:
        expect = {"arch": args.arch, "num_classes": num_classes, "dataset": args.dataset}
        ckpt = load_checkpoint(args.resume, expect)
    net = _build_net(args, data, rt, num_classes)
    seed_everything(args.seed + rt.rank)  # from here on each process augments differently
    train_set, train_classes = _load_split(args, data, rt, train=True)
    if train_classes != num_classes:
        raise UsageError(f"the training split has {train_classes} classes, the test split "
                         f"{num_classes}")
    train_loader, test_loader = build_loaders(train_set, test_set, args, rt)
    steps = min(len(train_loader), args.max_steps or len(train_loader))

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, steps, args.warm, args.milestones, args.gamma)
    project = None
    if args.weight == "mean":
        project = models.WeightMean(net, models.centring_rule(data.family))
    start_epoch, best_acc1 = 0, None
    if ckpt is not None:
        _restore(ckpt, args, rt, net, optimizer, scheduler)
        start_epoch, best_acc1 = ckpt["epoch"], ckpt["best_acc1"]
    # Centre the initial weights, or resumed ones trained without weight mean; weights saved by a
    # --weight mean run are centred already, and centring again would only add rounding noise.
    if project is not None and (ckpt is None or ckpt["args"].get("weight") != "mean"):
        project()

    train_model = wrap_model(net, rt)
    eval_model = net if rt.distributed else train_model  # DDP's forward would sync buffers
    if args.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(eval_model) if rt.distributed else train_model

    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(args_to_dict(args), indent=2) + "\n")
        log = CsvLog(run_dir / "log.csv", resume_epoch=start_epoch if ckpt else None)
        saver = CheckpointSaver(run_dir)
    n_params = sum(p.numel() for p in net.parameters())
    _say(rt, f"{args.arch} ({n_params / 1e6:.2f}M parameters, weight {args.weight}) on "
             f"{_describe(rt)}: {args.dataset} {len(train_set)} train / {len(test_set)} test "
             f"images, {num_classes} classes, {steps} steps per epoch -> {run_dir}")

    progress = _progress(args, rt)
    row: dict[str, float] = {}
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        reset_peak_memory(rt.device)
        epoch_start = time.perf_counter()
        train = train_one_epoch(train_model, criterion, optimizer, scheduler, train_loader,
                                rt.device, steps=steps, project=project, amp=args.amp,
                                channels_last=args.channels_last, progress=progress,
                                desc=f"epoch {epoch + 1}/{args.epochs}")
        broadcast_buffers(net)  # evaluate and save rank 0's running statistics everywhere
        test = evaluate(eval_model, criterion, test_loader, rt.device, amp=args.amp,
                        channels_last=args.channels_last, progress=progress)
        row = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"],
               "train_acc1": train["acc1"], "test_loss": test["loss"], "test_acc1": test["acc1"],
               "test_acc5": test["acc5"], "epoch_seconds": time.perf_counter() - epoch_start,
               "images_per_second": train["images"] / train["seconds"],
               "peak_memory_mb": peak_memory_mb(rt.device)}
        is_best = best_acc1 is None or test["acc1"] > best_acc1
        best_acc1 = test["acc1"] if is_best else best_acc1
        rng = gather_objects(capture_rng_state(rt.device_ids))
        if rt.is_main:
            saver.save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "arch": args.arch, "dataset": args.dataset, "num_classes": num_classes,
                "epoch": epoch + 1, "best_acc1": best_acc1,
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None,  # bfloat16 autocast needs no loss scaling; slot kept for fp16
                "rng": rng, "args": args_to_dict(args),
            }, is_best)
            log.write(row)
            print(format_row(row, args.epochs), flush=True)
    return RunResult(net, row, best_acc1, run_dir if rt.is_main else None)
