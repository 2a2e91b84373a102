"""The training program shared by the entry points: `run(args, data)` wires data, model, optimizer,
schedule, checkpoints and logs around `train_one_epoch` and `evaluate`."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

import models

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointSaver, load_checkpoint
from .cli import Recipe, args_to_dict, check_args, default_lr
from .data import DataSource, build_loaders, class_difference
from .distributed import (Runtime, all_reduce_sum, broadcast_buffers, cleanup, gather_objects,
                          main_process_first, setup_runtime, sync_last_bn_, wrap_model)
from .engine import EpochState, evaluate, shutdown_workers, train_one_epoch
from .errors import RunError, RunInterrupted, TrainingDiverged, UsageError
from .guard import StopSignals, StepGuard
from .logger import CsvLog, format_row, peak_memory_mb, reset_peak_memory
from .rng import capture_rng_state, deterministic_algorithms, restore_rng_state, seed_everything
from .rundir import RunDirLock, run_dir_for
from .schedule import WarmupMultiStepLR

# Flags whose new values a resumed run cannot honour: the checkpoint's optimizer and schedule win.
RECIPE_FLAGS = ("batch_size", "lr", "weight_decay", "momentum", "warm", "milestones", "gamma",
                "max_steps")
CUDA_CHECK_EVERY = 10  # steps between loss checks on a GPU (each one waits for the device)
SETTLED_STEPS = 200  # below this many steps the last BN's running statistics still lag (note)


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
                ) -> tuple[Dataset, list[str]]:
    with main_process_first(rt):  # rank 0 downloads, the others then find the files
        return data.load(args, train=train)


def _check_same_classes(args: argparse.Namespace, data: DataSource, train_classes: list[str],
                        test_classes: list[str]) -> None:
    """Refuse splits whose class lists differ: a label would name another class in each."""
    split = data.recipe.eval_split
    difference = class_difference(train_classes, test_classes, "train", split)
    if difference:
        raise UsageError(f"-ds {args.dataset}: the train and {split} splits have different "
                         f"classes ({difference})")


def _expected_header(args: argparse.Namespace, data: DataSource, classes: list[str]
                     ) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed or evaluated by this run."""
    return {"family": data.recipe.family, "arch": args.arch, "width": args.width,
            "num_classes": len(classes), "classes": classes}


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
    test_set, classes = _load_split(args, data, rt, train=False)
    ckpt = load_checkpoint(args.resume, _expected_header(args, data, classes))
    net = _build_net(args, data, rt, len(classes))
    net.load_state_dict(ckpt["model"])
    model = net if rt.distributed else wrap_model(net, rt)  # DDP adds nothing to evaluation
    _, test_loader = build_loaders(None, test_set, args, rt)
    try:
        stats = evaluate(torch.compile(model) if args.compile else model, nn.CrossEntropyLoss(),
                         test_loader, rt.device, amp=args.amp, channels_last=args.channels_last,
                         progress=_progress(args, rt), max_batches=args.max_steps)
    finally:
        shutdown_workers(test_loader)
    _say(rt, f"{args.resume} (epoch {ckpt['epoch']}) on {_test_images(args, test_set)} "
             f"{args.dataset} {data.recipe.eval_split} images: loss {stats['loss']:.4f} top-1 "
             f"{stats['acc1']:.2f}% "
             f"top-5 {stats['acc5']:.2f}%")
    return RunResult(net, stats, ckpt["best_acc1"], None)


def _progress(args: argparse.Namespace, rt: Runtime) -> bool:
    return rt.is_main and not args.no_progress and sys.stderr.isatty()


def _test_images(args: argparse.Namespace, test_set: Dataset) -> str:
    """How many test images an evaluation sees: all, or what --max-steps batches hold."""
    if args.max_steps and args.max_steps * args.batch_size < len(test_set):
        return f"the first {args.max_steps} batches (--max-steps) of {len(test_set)}"
    return str(len(test_set))


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
        self.run_dir = run_dir_for(args)
        test_set, self.classes = _load_split(args, data, rt, train=False)
        self.ckpt = None
        if args.resume:
            expect = {**_expected_header(args, data, self.classes), "dataset": args.dataset}
            self.ckpt = load_checkpoint(args.resume, expect)
        self.net = _build_net(args, data, rt, len(self.classes))
        seed_everything(args.seed + rt.rank)
        train_set, train_classes = _load_split(args, data, rt, train=True)
        _check_same_classes(args, data, train_classes, self.classes)
        self.train_set, self.test_set = train_set, test_set
        self.train_loader, self.test_loader = build_loaders(train_set, test_set, args, rt)
        self.steps = min(len(self.train_loader), args.max_steps or len(self.train_loader))
        if self.ckpt is not None:
            self.check_resumable()
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr,
                                         momentum=args.momentum, weight_decay=args.weight_decay)
        self.scheduler = WarmupMultiStepLR(self.optimizer, self.steps, args.warm,
                                           args.milestones, args.gamma)
        self.scaler = torch.amp.GradScaler(rt.device.type) if args.amp == "fp16" else None
        self.rule = models.centring_rule(data.recipe.family)
        if args.weight == "mean":  # centres the initial weights now, and after every step
            models.attach_weight_mean(self.optimizer, self.net, self.rule)
        self.best_acc1: float | None = None
        self.saver: CheckpointSaver | None = None  # rank 0's, once it holds the run folder
        self.last_saved: str | None = None  # what a failure message points the user to
        self.pending_eval: dict[str, float] | None = None  # the resumed epoch awaits evaluation

    def resume_point(self) -> EpochState:
        """Restore the checkpoint, if any, and say where training picks up."""
        if self.ckpt is None:
            return EpochState(0, self.steps)
        ckpt, rt = self.ckpt, self.rt
        _restore(ckpt, self.args, rt, self.net, self.optimizer, self.scheduler)
        if self.scaler is not None and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        # Weights saved by a --weight mean run are centred already; centring again would only add
        # rounding noise and break exact resumption.
        if self.args.weight == "mean" and ckpt["args"].get("weight") != "mean":
            models.weight_mean_(self.net, self.rule)
        self.best_acc1 = ckpt["best_acc1"]
        self.last_saved = str(self.args.resume)
        self.pending_eval = ckpt["pending_eval"]
        if self.pending_eval is not None:  # trained, not evaluated: the loop evaluates it first
            state = EpochState(ckpt["epoch"] - 1, self.steps, self.steps)
            state.seconds = self.pending_eval["seconds"]
            return state
        state = EpochState(ckpt["epoch"], self.steps, ckpt["step"])
        if ckpt["step"]:
            totals = ckpt["epoch_totals"] if rt.is_main else [0.0, 0.0, 0.0]  # summed at the end
            state.totals = torch.tensor(totals, dtype=torch.float64, device=rt.device)
            state.seconds = ckpt["epoch_seconds"]
        return state

    def check_resumable(self) -> None:
        """Refuse a checkpoint this run cannot continue: a mid-epoch one with another sampler
        position meaning, or one past --epochs. Say so when no epoch is left to run."""
        ckpt, rt, resume, wanted = self.ckpt, self.rt, self.args.resume, self.args.epochs
        if ckpt["step"] and (ckpt["steps_per_epoch"], ckpt["world_size"]) != (self.steps,
                                                                               rt.world_size):
            raise UsageError(
                f"{resume} stops mid-epoch at step {ckpt['step']} of "
                f"{ckpt['steps_per_epoch']} with {ckpt['world_size']} process(es); this run has "
                f"{self.steps} steps per epoch and {rt.world_size} process(es): resume with the "
                "same batch size and process count (only epoch-end checkpoints can change them)")
        if ckpt["epoch"] > wanted:
            raise UsageError(f"{resume} has {ckpt['epoch']} epochs done, more than --epochs "
                             f"{wanted}")
        if ckpt["epoch"] == wanted and not ckpt["pending_eval"]:
            _say(rt, f"note: {resume} has all {wanted} epochs done, nothing to train: pass "
                     f"--epochs N (N > {wanted}) to train on")

    def save(self, state: EpochState, is_best: bool = False,
             pending_eval: dict[str, float] | None = None,
             row: dict[str, float] | None = None) -> None:
        """Checkpoint `state` (every process takes part; rank 0 writes) as last.pt: mid-epoch (and
        every --save-every steps also as a step file), and twice at an epoch's end: once its
        training is done (`pending_eval`: the training part of its log row) and after its
        evaluation (`row`: its log row; + best.pt when `is_best`)."""
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
            "family": self.data.recipe.family, "arch": args.arch, "width": args.width,
            "dataset": args.dataset, "num_classes": len(self.classes), "classes": self.classes,
            "epoch": state.epoch + done, "step": 0 if done else state.step,
            "steps_per_epoch": self.steps, "world_size": self.rt.world_size,
            "epoch_totals": totals, "epoch_seconds": 0.0 if done else state.seconds,
            "best_acc1": self.best_acc1,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng, "args": args_to_dict(args), "pending_eval": pending_eval, "row": row,
        }
        global_step = state.epoch * self.steps + state.step
        recovery = not done and args.save_every and global_step % args.save_every == 0
        path = self.saver.save(checkpoint, is_best, global_step if recovery else None)
        self.last_saved = f"{path} (epoch {state.epoch + 1}, step {state.step}/{self.steps})"

    def stop_check(self, signals: StopSignals, epoch: int) -> Callable[[], None]:
        """The evaluation's `check_stop`: a stop signal abandons it (the trained epoch is saved)."""
        def check() -> None:
            if signals.requested:
                raise _interrupted(signals, self.saver.last_path if self.saver else None,
                                   f"during the evaluation of epoch {epoch + 1} (it is evaluated "
                                   "again when resumed)")
        return check

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
    t = _Training(args, data, rt)  # reads data and checkpoint, writes nothing
    try:
        with RunDirLock(t.run_dir) if rt.is_main else nullcontext():  # one process per folder
            if rt.is_main:
                t.saver = CheckpointSaver(t.run_dir, args.keep_recovery)
            return _fit(t)
    finally:  # persistent data workers outlive epochs, not the run
        shutdown_workers(t.train_loader)
        shutdown_workers(t.test_loader)


def _fit(t: _Training) -> RunResult:
    """Train `t` from its resume point to the last epoch. At each epoch's end: save, evaluate,
    save again with the log row, then log."""
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
                 f"{_test_images(args, t.test_set)} {t.data.recipe.eval_split} images, "
                 f"{len(t.classes)} classes, {t.steps} steps per epoch -> {run_dir}")
        guard = StepGuard(signals, t.save, t.divergence_hint,
                          check_every=1 if rt.device.type == "cpu" else CUDA_CHECK_EVERY,
                          save_every=args.save_every)
        for epoch in range(state.epoch, args.epochs):
            if state.epoch != epoch:
                state = EpochState(epoch, t.steps)
            reset_peak_memory(rt.device)
            epoch_start = time.perf_counter() - state.seconds
            if state.done:  # resumed from the checkpoint written before this epoch's evaluation
                train = t.pending_eval
            else:
                train = _train_epoch(t, train_model, criterion, state, guard, signals, progress)
            test = evaluate(eval_model, criterion, t.test_loader, rt.device, amp=args.amp,
                            channels_last=args.channels_last, progress=progress,
                            max_batches=args.max_steps, check_stop=t.stop_check(signals, epoch))
            row = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"],
                   "train_acc1": train["acc1"], "test_loss": test["loss"],
                   "test_acc1": test["acc1"], "test_acc5": test["acc5"],
                   "epoch_seconds": time.perf_counter() - epoch_start,
                   "images_per_second": train["images"] / max(train["seconds"], 1e-9),
                   "peak_memory_mb": peak_memory_mb(rt.device)}
            is_best = t.best_acc1 is None or test["acc1"] > t.best_acc1
            t.best_acc1 = test["acc1"] if is_best else t.best_acc1
            t.save(state, is_best, row=row)
            if rt.is_main:
                _write_row(log, row)
                print(format_row(row, args.epochs), flush=True)
                _note_unsettled_last_bn(net, (epoch + 1) * t.steps, epoch + 1 == args.epochs)
            if signals.requested and not rt.distributed and epoch + 1 < args.epochs:
                raise _interrupted(signals, t.saver.last_path if t.saver else None,
                                   f"after epoch {epoch + 1}")
    return RunResult(net, row, t.best_acc1, run_dir if rt.is_main else None)


def _train_epoch(t: _Training, model: nn.Module, criterion: nn.Module, state: EpochState,
                 guard: StepGuard, signals: StopSignals, progress: bool) -> dict[str, float]:
    """The training part of an epoch, then its checkpoint; a stop signal during the epoch stops
    the run there (after saving)."""
    args, rt = t.args, t.rt
    t.train_loader.sampler.set_epoch(state.epoch, skip=state.step)
    train = train_one_epoch(model, criterion, t.optimizer, t.scheduler, t.train_loader,
                            rt.device, state, after_step=guard, amp=args.amp,
                            scaler=t.scaler, channels_last=args.channels_last, progress=progress,
                            desc=f"epoch {state.epoch + 1}/{args.epochs}")
    saved = t.saver.last_path if t.saver else None
    if not state.done:
        raise _interrupted(signals, saved, f"at epoch {state.epoch + 1} step "
                                           f"{state.step}/{t.steps}")
    broadcast_buffers(t.net)  # evaluate and save rank 0's running statistics everywhere
    t.save(state, pending_eval=train)
    if guard.stop_after_epoch or (signals.requested and not rt.distributed):
        raise _interrupted(signals, saved, f"after the training of epoch {state.epoch + 1} "
                                           "(its evaluation runs when resumed)")
    return train


def _note_unsettled_last_bn(net: nn.Module, steps_done: int, last_epoch: bool) -> None:
    """Say once, at a short run's end, why a MimicNorm model's test loss can be huge there."""
    if last_epoch and steps_done < SETTLED_STEPS and models.is_mimicnorm(net):
        print(f"note: after only {steps_done} optimizer steps the last BN's running statistics "
              "(used in evaluation) still lag the logits, so test losses can be far above the "
              "training loss; they settle within a few hundred steps", flush=True)


def _write_row(log: CsvLog, row: dict[str, float]) -> None:
    try:
        log.write(row)
    except OSError as e:
        raise RunError(f"cannot append to {log.path}: {e.strerror or e}; the epoch's checkpoint "
                       "is saved and holds the row, which a resumed run writes") from None


def _start_outputs(run_dir: Path, args: argparse.Namespace, ckpt: dict[str, Any] | None
                   ) -> CsvLog:
    """Write args.json and start log.csv (a resumed one keeps its rows up to the checkpoint's
    epoch, plus the checkpoint's own row if a cut run had not logged it), or say in one line why
    they cannot be written."""
    try:
        (run_dir / "args.json").write_text(json.dumps(args_to_dict(args), indent=2) + "\n")
        if ckpt is None:
            return CsvLog(run_dir / "log.csv")
        return CsvLog(run_dir / "log.csv", resume_epoch=ckpt["epoch"] - bool(ckpt["pending_eval"]),
                      last_row=ckpt["row"])
    except OSError as e:
        raise UsageError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def _interrupted(signals: StopSignals, saved: Path | None, where: str) -> RunInterrupted:
    received = signals.received or signal.SIGTERM  # another process got it under torchrun
    resume = f"; continue with --resume {saved}" if saved else ""
    return RunInterrupted(f"{received.name} {where}: saved {saved or 'on rank 0'}{resume}",
                          exit_code=128 + received.value)
