"""The training program shared by the entry points: `run(args, data)` wires data, model, optimizer,
schedule, checkpoints and logs around `train_one_epoch` and `evaluate`."""
from __future__ import annotations

import argparse
import json
import signal
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
from .cli import Recipe, args_to_dict, check_args, default_lr
from .data import DataSource, build_loaders
from .distributed import (Runtime, all_reduce_sum, broadcast_buffers, cleanup, gather_objects,
                          main_process_first, setup_runtime, sync_last_bn_, wrap_model)
from .engine import EpochState, evaluate, shutdown_workers, train_one_epoch
from .errors import RunError, RunInterrupted, TrainingDiverged, UsageError
from .guard import StopSignals, StepGuard
from .logger import CsvLog, format_row, peak_memory_mb, reset_peak_memory
from .rng import capture_rng_state, deterministic_algorithms, restore_rng_state, seed_everything
from .schedule import WarmupMultiStepLR

# Flags whose new values a resumed run cannot honour: the checkpoint's optimizer and schedule win.
RECIPE_FLAGS = ("batch_size", "lr", "weight_decay", "momentum", "warm", "milestones", "gamma",
                "max_steps")
CUDA_CHECK_EVERY = 10  # steps between loss checks on a GPU (each one waits for the device)


@dataclass
class RunResult:
    """What a run leaves behind in the calling process."""

    model: nn.Module  # the trained network, unwrapped
    metrics: dict[str, float]  # the last epoch's log row, or the evaluation's loss/acc1/acc5
    best_acc1: float | None
    run_dir: Path | None  # None for --evaluate and on processes other than rank 0


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
                return _evaluate_checkpoint(args, data, rt)
            return _train(args, data, rt)
        finally:
            cleanup()


def resolve_defaults(args: argparse.Namespace, recipe: Recipe, rt: Runtime) -> None:
    """Fill in, in `args`, the defaults that depend on this run's devices and processes: the
    learning rate (the recipe's rule on the global batch) and `--loader auto`."""
    if args.lr is None:
        args.lr = default_lr(recipe, args.batch_size, rt.world_size)
    if args.loader == "auto":
        args.loader = "device" if rt.device.type == "cuda" else "pil"


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
    net = models.create_model(args.arch, num_classes, data.recipe.family, width=args.width)
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
    try:
        stats = evaluate(torch.compile(model) if args.compile else model, nn.CrossEntropyLoss(),
                         test_loader, rt.device, amp=args.amp, channels_last=args.channels_last,
                         progress=_progress(args, rt))
    finally:
        shutdown_workers(test_loader)
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
    within = f", step {ckpt['step']}/{ckpt['steps_per_epoch']} of the next" if ckpt["step"] else ""
    _say(rt, f"resumed from {args.resume}: {ckpt['epoch']} epochs done{within}")


class _Training:
    """One training run's state and the steps that act on all of it: checkpoint, restore, fit."""

    def __init__(self, args: argparse.Namespace, data: DataSource, rt: Runtime) -> None:
        self.args, self.data, self.rt = args, data, rt
        self.run_dir = _run_dir(args)
        test_set, self.num_classes = _load_split(args, data, rt, train=False)
        self.ckpt = None
        if args.resume:
            expect = {"arch": args.arch, "num_classes": self.num_classes, "dataset": args.dataset}
            self.ckpt = load_checkpoint(args.resume, expect)
        self.net = _build_net(args, data, rt, self.num_classes)
        seed_everything(args.seed + rt.rank)
        train_set, train_classes = _load_split(args, data, rt, train=True)
        if train_classes != self.num_classes:
            raise UsageError(f"the training split has {train_classes} classes, the test split "
                             f"{self.num_classes}")
        self.train_set, self.test_set = train_set, test_set
        self.train_loader, self.test_loader = build_loaders(train_set, test_set, args, rt)
        self.steps = min(len(self.train_loader), args.max_steps or len(self.train_loader))
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr,
                                         momentum=args.momentum, weight_decay=args.weight_decay)
        self.scheduler = WarmupMultiStepLR(self.optimizer, self.steps, args.warm,
                                           args.milestones, args.gamma)
        self.scaler = torch.amp.GradScaler(rt.device.type) if args.amp == "fp16" else None
        self.project = None
        if args.weight == "mean":
            self.project = models.WeightMean(self.net, models.centring_rule(data.recipe.family))
        self.best_acc1: float | None = None
        self.saver = CheckpointSaver(self.run_dir, args.keep_recovery) if rt.is_main else None
        self.last_saved: str | None = None  # what a failure message points the user to

    def resume_point(self) -> EpochState:
        """Restore the checkpoint, if any, and say where training picks up."""
        if self.ckpt is None:
            if self.project is not None:
                self.project()
            return EpochState(0, self.steps)
        ckpt, rt = self.ckpt, self.rt
        if ckpt["step"] and (ckpt["steps_per_epoch"], ckpt["world_size"]) != (self.steps,
                                                                               rt.world_size):
            raise UsageError(
                f"{self.args.resume} stops mid-epoch at step {ckpt['step']} of "
                f"{ckpt['steps_per_epoch']} with {ckpt['world_size']} process(es); this run has "
                f"{self.steps} steps per epoch and {rt.world_size} process(es): resume with the "
                "same batch size and process count (only epoch-end checkpoints can change them)")
        _restore(ckpt, self.args, rt, self.net, self.optimizer, self.scheduler)
        if self.scaler is not None and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        # Weights saved by a --weight mean run are centred already; centring again would only add
        # rounding noise and break exact resumption.
        if self.project is not None and ckpt["args"].get("weight") != "mean":
            self.project()
        self.best_acc1 = ckpt["best_acc1"]
        self.last_saved = str(self.args.resume)
        state = EpochState(ckpt["epoch"], self.steps, ckpt["step"])
        if ckpt["step"]:
            totals = ckpt["epoch_totals"] if rt.is_main else [0.0, 0.0, 0.0]  # summed at the end
            state.totals = torch.tensor(totals, dtype=torch.float64, device=rt.device)
            state.seconds = ckpt["epoch_seconds"]
        return state

    def save(self, state: EpochState, is_best: bool = False) -> None:
        """Checkpoint `state` (every process takes part; rank 0 writes): at an epoch's end as
        last.pt (+ best.pt), mid-epoch as last.pt or, every --save-every steps, a step file."""
        if not _all_finite(self.net, self.optimizer):
            lr = self.optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(f"training diverged: the weights or momentum are no longer "
                                   f"finite at epoch {state.epoch + 1} step {state.step} "
                                   f"(lr now {lr:.4g}); {self.divergence_hint()}")
        done = state.done
        totals = all_reduce_sum(state.totals.clone()).tolist() if not done else [0.0] * 3
        rng = gather_objects(capture_rng_state(self.rt.device_ids))
        if not self.rt.is_main:
            return
        args = self.args
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "arch": args.arch, "dataset": args.dataset, "num_classes": self.num_classes,
            "epoch": state.epoch + done, "step": 0 if done else state.step,
            "steps_per_epoch": self.steps, "world_size": self.rt.world_size,
            "epoch_totals": totals, "epoch_seconds": 0.0 if done else state.seconds,
            "best_acc1": self.best_acc1,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng, "args": args_to_dict(args),
        }
        global_step = state.epoch * self.steps + state.step
        recovery = not done and args.save_every and global_step % args.save_every == 0
        path = self.saver.save(checkpoint, is_best, global_step if recovery else None)
        self.last_saved = f"{path} (epoch {state.epoch + 1}, step {state.step}/{self.steps})"

    def divergence_hint(self) -> str:
        """What to do after a non-finite loss, and which checkpoint is still good."""
        kept = (f"{self.last_saved} is the last good checkpoint" if self.last_saved
                else "no checkpoint had been written")
        twin = f"{models.split_model_name(self.args.arch)[0]}_cbn"
        advice = f"lower -lr (it is {self.args.lr:g})"
        family = self.data.recipe.family
        if not self.args.arch.endswith("_cbn") and twin in models.list_models(family):
            advice += f" or train the MimicNorm twin: -a {twin} --weight mean"
        return f"{kept}; {advice}"


def _all_finite(net: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight, buffer and optimizer state is finite (checked before each save, so
    that a diverged state never replaces a good checkpoint)."""
    tensors = [*net.parameters(), *net.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()])
    return bool(finite.all())


def _train(args: argparse.Namespace, data: DataSource, rt: Runtime) -> RunResult:
    t = _Training(args, data, rt)
    try:
        return _fit(t)
    finally:  # persistent data workers outlive epochs, not the run
        shutdown_workers(t.train_loader)
        shutdown_workers(t.test_loader)


def _fit(t: _Training) -> RunResult:
    """Train `t` from its resume point to the last epoch, evaluating and saving at epoch ends."""
    args, rt = t.args, t.rt
    state = t.resume_point()
    net, run_dir = t.net, t.run_dir
    train_model = wrap_model(net, rt)
    eval_model = net if rt.distributed else train_model  # DDP's forward would sync buffers
    if args.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(eval_model) if rt.distributed else train_model

    if rt.is_main:
        log = _start_outputs(run_dir, args, t.ckpt)
    n_params = sum(p.numel() for p in net.parameters())
    criterion = nn.CrossEntropyLoss()
    progress = _progress(args, rt)
    row: dict[str, float] = {}
    with StopSignals() as signals:  # before the start line: from then on a stop saves
        _say(rt, f"{args.arch} ({n_params / 1e6:.2f}M parameters, weight {args.weight}) on "
                 f"{_describe(rt)}: {args.dataset} {len(t.train_set)} train / "
                 f"{len(t.test_set)} test images, {t.num_classes} classes, {t.steps} steps per "
                 f"epoch -> {run_dir}")
        guard = StepGuard(signals, t.save, t.divergence_hint,
                          check_every=1 if rt.device.type == "cpu" else CUDA_CHECK_EVERY,
                          save_every=args.save_every)
        for epoch in range(state.epoch, args.epochs):
            if state.epoch != epoch:
                state = EpochState(epoch, t.steps)
            t.train_loader.sampler.set_epoch(epoch, skip=state.step)
            reset_peak_memory(rt.device)
            epoch_start = time.perf_counter() - state.seconds
            train = train_one_epoch(train_model, criterion, t.optimizer, t.scheduler,
                                    t.train_loader, rt.device, state, project=t.project,
                                    after_step=guard, amp=args.amp, scaler=t.scaler,
                                    channels_last=args.channels_last, progress=progress,
                                    desc=f"epoch {epoch + 1}/{args.epochs}")
            if not state.done:
                raise _interrupted(signals, t.saver.last_path if t.saver else None,
                                   f"at epoch {epoch + 1} step {state.step}/{t.steps}")
            broadcast_buffers(net)  # evaluate and save rank 0's running statistics everywhere
            test = evaluate(eval_model, criterion, t.test_loader, rt.device, amp=args.amp,
                            channels_last=args.channels_last, progress=progress)
            row = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"],
                   "train_acc1": train["acc1"], "test_loss": test["loss"],
                   "test_acc1": test["acc1"], "test_acc5": test["acc5"],
                   "epoch_seconds": time.perf_counter() - epoch_start,
                   "images_per_second": train["images"] / max(train["seconds"], 1e-9),
                   "peak_memory_mb": peak_memory_mb(rt.device)}
            is_best = t.best_acc1 is None or test["acc1"] > t.best_acc1
            t.best_acc1 = test["acc1"] if is_best else t.best_acc1
            t.save(state, is_best)
            if rt.is_main:
                log.write(row)
                print(format_row(row, args.epochs), flush=True)
            stop = guard.stop_after_epoch or (signals.requested and not rt.distributed)
            if stop and epoch + 1 < args.epochs:
                raise _interrupted(signals, t.saver.last_path if t.saver else None,
                                   f"after epoch {epoch + 1}")
    return RunResult(net, row, t.best_acc1, run_dir if rt.is_main else None)


def _start_outputs(run_dir: Path, args: argparse.Namespace, ckpt: dict[str, Any] | None
                   ) -> CsvLog:
    """Create the run folder, args.json and log.csv, or say in one line why they cannot be."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(args_to_dict(args), indent=2) + "\n")
        return CsvLog(run_dir / "log.csv", resume_epoch=ckpt["epoch"] if ckpt else None)
    except OSError as e:
        raise UsageError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def _interrupted(signals: StopSignals, saved: Path | None, where: str) -> RunInterrupted:
    received = signals.received or signal.SIGTERM  # another process got it under torchrun
    resume = f"; continue with --resume {saved}" if saved else ""
    return RunInterrupted(f"{received.name} {where}: saved {saved or 'on rank 0'}{resume}",
                          exit_code=128 + received.value)
