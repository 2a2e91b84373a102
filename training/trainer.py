"""One training run as an object: `Trainer(args, data, rt).fit()` trains from the checkpoint (or
from scratch) to the last epoch, saving, evaluating and logging at epoch ends."""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

import models

from .checkpoint import CheckpointSaver, TrainingState, load_checkpoint
from .cli import args_to_dict
from .data import DataSource, build_loaders, class_difference
from .distributed import (Runtime, all_reduce_sum, broadcast_buffers, gather_objects,
                          main_process_first, sync_last_bn_, wrap_model)
from .engine import (AMP_DTYPES, AfterStep, EpochState, evaluate, shutdown_workers,
                     train_one_epoch)
from .errors import RunError, RunInterrupted, TrainingDiverged, UsageError
from .guard import StepGuard, StopSignals
from .logger import CsvLog, format_row, peak_memory_mb, reset_peak_memory
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .resume import (adopt_checkpoint_recipe, changed_step_flags, check_batch_unchanged_mid_epoch,
                     check_not_behind_last, check_same_run)
from .rundir import RunDirLock, run_dir_for
from .schedule import WarmupMultiStepLR
from .tensorboard_log import TensorBoardLog

CUDA_CHECK_EVERY = 10  # steps between loss checks on a GPU (each one waits for the device)
SETTLED_STEPS = 200  # below this many steps the last BN's running statistics still lag (note)


@dataclass
class RunResult:
    """What a run leaves behind in the calling process."""

    model: nn.Module  # the trained network, unwrapped
    metrics: dict[str, float]  # the last epoch's log row, or the evaluation's loss/acc1/acc5
    best_acc1: float | None
    run_dir: Path | None  # None for --evaluate and on processes other than rank 0


class Trainer:
    """A training run: data, model, optimizer and schedule built from the flags, and the checkpoint
    it continues (read and checked here; nothing is written before `fit`)."""

    def __init__(self, args: argparse.Namespace, data: DataSource, rt: Runtime) -> None:
        self.args, self.data, self.rt = args, data, rt
        self.run_dir = run_dir_for(args)
        test_set, self.classes = load_split(args, data, rt, train=False)
        _check_several_classes(args, data, self.classes)
        self.resumed: TrainingState | None = None
        self.ignored_flags: list[str] = []  # recipe flags the checkpoint overrides
        if args.resume:
            expect = {**expected_header(args, data, self.classes), "dataset": args.dataset}
            self.resumed = load_checkpoint(args.resume, expect)
            check_same_run(args, self.resumed)
            check_not_behind_last(self.run_dir, args, self.resumed)
            self.ignored_flags = adopt_checkpoint_recipe(args, self.resumed)
        self.net = build_net(args, data, rt, len(self.classes))
        seed_everything(args.seed + rt.rank)
        train_set, train_classes = load_split(args, data, rt, train=True)
        _check_same_classes(args, data, train_classes, self.classes)
        self.train_set, self.test_set = train_set, test_set
        self.train_loader, self.test_loader = build_loaders(train_set, test_set, args, rt)
        self.steps = min(len(self.train_loader), args.max_steps or len(self.train_loader))
        if self.resumed is not None:
            self._check_resumable(self.resumed)
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
        self.board: TensorBoardLog | None = None  # rank 0's with --tensorboard, during `fit`
        self.last_saved: str | None = None  # what a failure message points the user to
        self.pending_eval: dict[str, float] | None = None  # the resumed epoch awaits evaluation

    def fit(self) -> RunResult:
        """Train to the last epoch, holding the run folder's lock; data workers end with it."""
        try:
            with RunDirLock(self.run_dir) if self.rt.is_main else nullcontext():
                if self.rt.is_main:
                    self.saver = CheckpointSaver(self.run_dir, self.args.keep_recovery)
                return self._fit()
        finally:  # persistent data workers outlive epochs, not the run
            shutdown_workers(self.train_loader)
            shutdown_workers(self.test_loader)

    def resume(self) -> EpochState:
        """Restore the checkpoint, if any, and say where training picks up."""
        ckpt, rt = self.resumed, self.rt
        if ckpt is None:
            return EpochState(0, self.steps)
        self.net.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        old_steps = self.scheduler.steps_per_epoch
        if old_steps != self.steps:  # an epoch-end checkpoint (`_check_resumable`)
            self.scheduler.set_steps_per_epoch(self.steps)
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        if len(ckpt.rng) == rt.world_size:
            restore_rng_state(ckpt.rng[rt.rank], rt.device_ids)
        else:
            say(rt, f"note: the checkpoint was written by {len(ckpt.rng)} process(es), this run "
                    f"has {rt.world_size}: random streams start afresh")
        self._note_changed_flags(ckpt, old_steps)
        self.best_acc1, self.pending_eval = ckpt.best_acc1, ckpt.pending_eval
        self.last_saved = str(self.args.resume)
        within = f", step {ckpt.step}/{ckpt.steps_per_epoch} of the next" if ckpt.step else ""
        say(rt, f"resumed from {self.args.resume}: {ckpt.epoch} epochs done{within}")
        if self.pending_eval is not None:  # trained, not evaluated: the loop evaluates it first
            return EpochState(ckpt.epoch - 1, self.steps, self.steps,
                              seconds=self.pending_eval["seconds"])
        state = EpochState(ckpt.epoch, self.steps, ckpt.step)
        if ckpt.step:
            totals = ckpt.epoch_totals if rt.is_main else [0.0, 0.0, 0.0]  # summed at the end
            state.totals = torch.tensor(totals, dtype=torch.float64, device=rt.device)
            state.seconds = ckpt.epoch_seconds
        return state

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
        if self.board is not None:  # the curves on disk reach at least as far as the checkpoint
            self.board.flush()
        args = self.args
        checkpoint = TrainingState(
            **expected_header(args, self.data, self.classes), dataset=args.dataset,
            epoch=state.epoch + done, step=0 if done else state.step,
            steps_per_epoch=self.steps, world_size=self.rt.world_size, epoch_totals=totals,
            epoch_seconds=0.0 if done else state.seconds, pending_eval=pending_eval, row=row,
            best_acc1=self.best_acc1, model=self.net.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None, rng=rng,
            args=args_to_dict(args))
        global_step = state.epoch * self.steps + state.step
        recovery = not done and args.save_every and global_step % args.save_every == 0
        path = self.saver.save(checkpoint.to_dict(), is_best, global_step if recovery else None)
        self.last_saved = f"{path} (epoch {state.epoch + 1}, step {state.step}/{self.steps})"

    def divergence_hint(self) -> str:
        """What to do after a non-finite loss, and which checkpoint is still good."""
        kept = (f"{self.last_saved} is the last good checkpoint" if self.last_saved
                else "no checkpoint had been written")
        return f"{kept}; {self._divergence_advice()}"

    def _test_diverged(self, epoch: int, loss: float, lr: float) -> TrainingDiverged:
        """A non-finite test loss: nothing of the epoch is logged and best.pt stays the best
        evaluated epoch (its trained state, saved as last.pt, evaluates the same when resumed)."""
        best = (f"best.pt holds the best evaluated epoch (top-1 {self.best_acc1:.2f}%)"
                if self.best_acc1 is not None else "no epoch had been evaluated")
        return TrainingDiverged(f"training diverged: non-finite test loss ({loss}) after epoch "
                                f"{epoch + 1} (lr {lr:.4g}); {best}; {self._divergence_advice()}")

    def _divergence_advice(self) -> str:
        twin = models.twin_name(self.args.arch, models.MIMIC)
        advice = f"lower -lr (it is {self.args.lr:g})"
        if self.args.momentum >= 1:  # SGD with momentum 1 or more amplifies every step
            advice += f" and --momentum (it is {self.args.momentum:g}; below 1 converges)"
        family = self.data.recipe.family
        if not models.is_mimicnorm_name(self.args.arch) and twin in models.list_models(family):
            advice += f" or train the MimicNorm twin: -a {twin} --weight mean"
        return advice

    def _check_resumable(self, ckpt: TrainingState) -> None:
        """Refuse a checkpoint this run cannot continue: a mid-epoch one whose sampler position
        would mean other images, or one past --epochs. Say so when no epoch is left to run."""
        rt, resume, wanted = self.rt, self.args.resume, self.args.epochs
        if ckpt.step and (ckpt.steps_per_epoch, ckpt.world_size) != (self.steps, rt.world_size):
            raise UsageError(
                f"{resume} stops mid-epoch at step {ckpt.step} of {ckpt.steps_per_epoch} with "
                f"{ckpt.world_size} process(es); this run has {self.steps} steps per epoch and "
                f"{rt.world_size} process(es): resume with the same batch size and process count "
                "(only epoch-end checkpoints can change them)")
        check_batch_unchanged_mid_epoch(self.args, ckpt)  # the same steps from other images
        if ckpt.epoch > wanted:
            raise UsageError(f"{resume} has {ckpt.epoch} epochs done, more than --epochs "
                             f"{wanted}")
        if ckpt.epoch == wanted and not ckpt.pending_eval:
            say(rt, f"note: {resume} has all {wanted} epochs done, nothing to train: pass "
                    f"--epochs N (N > {wanted}) to train on")

    def _note_changed_flags(self, ckpt: TrainingState, old_steps: int) -> None:
        """Say which changed flags the resumed run applies and which it ignores."""
        rt, args = self.rt, self.args
        applied = changed_step_flags(args, ckpt)
        if applied or old_steps != self.steps:
            lr = self.optimizer.param_groups[0]["lr"]
            change = f" ({', '.join(applied)})" if applied else ""
            say(rt, f"note: resumed with {self.steps} steps per epoch{change}, the checkpoint's "
                    f"run had {old_steps}: the lr schedule, defined in epochs, continues from "
                    f"epoch {ckpt.epoch} with the new steps per epoch (lr now {lr:.4g})")
        if self.ignored_flags:
            say(rt, f"note: resumed with changed recipe flags, not applied: "
                    f"{'; '.join(self.ignored_flags)}: the checkpoint's optimizer and schedule "
                    "continue, and args.json records their values")
        if ckpt.args.get("sync_lastbn", False) != args.sync_lastbn:
            was, now = (("without", "over all processes") if args.sync_lastbn else
                        ("with", "per process"))
            say(rt, f"note: the checkpoint's run was trained {was} --sync-lastbn; this run "
                    f"computes the last BN's batch statistics {now}")

    def _fit(self) -> RunResult:
        """From the resume point to the last epoch. At each epoch's end: save, evaluate, save
        again with the log row, then log."""
        args, rt, net = self.args, self.rt, self.net
        state = self.resume()
        train_model = wrap_model(net, rt, AMP_DTYPES.get(args.amp))
        eval_model = net if rt.distributed else train_model  # DDP's forward would sync buffers
        if args.compile:
            train_model = torch.compile(train_model)
            eval_model = torch.compile(eval_model) if rt.distributed else train_model
        log = self._start_outputs() if rt.is_main else None
        criterion = nn.CrossEntropyLoss()
        row: dict[str, float] = {}
        # Stop signals are caught before the start line: from then on a stop saves.
        with StopSignals() as signals, self._tensorboard():
            self._say_start()
            guard = StepGuard(signals, self.save, self.divergence_hint,
                              check_every=1 if rt.device.type == "cpu" else CUDA_CHECK_EVERY,
                              save_every=args.save_every)
            for epoch in range(state.epoch, args.epochs):
                if state.epoch != epoch:
                    state = EpochState(epoch, self.steps)
                reset_peak_memory(rt.device)
                epoch_start = time.perf_counter() - state.seconds
                if state.done:  # resumed from the checkpoint written before this evaluation
                    train = self.pending_eval
                else:
                    train = self._train_epoch(train_model, criterion, state, guard, signals)
                test = evaluate(eval_model, criterion, self.test_loader, rt.device, amp=args.amp,
                                channels_last=args.channels_last, progress=show_progress(args, rt),
                                max_batches=args.max_steps,
                                check_stop=self._stop_check(signals, epoch))
                if not math.isfinite(test["loss"]):
                    raise self._test_diverged(epoch, test["loss"], train["lr"])
                row = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"],
                       "train_acc1": train["acc1"], "test_loss": test["loss"],
                       "test_acc1": test["acc1"], "test_acc5": test["acc5"],
                       "epoch_seconds": time.perf_counter() - epoch_start,
                       "images_per_second": train["images"] / max(train["seconds"], 1e-9),
                       "peak_memory_mb": peak_memory_mb(rt.device)}
                is_best = self.best_acc1 is None or test["acc1"] > self.best_acc1
                self.best_acc1 = test["acc1"] if is_best else self.best_acc1
                if self.board is not None:  # before the save that completes the epoch
                    self.board.epoch(self.scheduler.last_epoch, row)
                self.save(state, is_best, row=row)
                if log is not None:
                    _write_row(log, row)
                    print(format_row(row, args.epochs), flush=True)
                    _note_unsettled_last_bn(net, (epoch + 1) * self.steps,
                                            epoch + 1 == args.epochs)
                if signals.requested and not rt.distributed and epoch + 1 < args.epochs:
                    raise self._interrupted(signals, f"after epoch {epoch + 1}")
        return RunResult(net, row, self.best_acc1, self.run_dir if rt.is_main else None)

    def _train_epoch(self, model: nn.Module, criterion: nn.Module, state: EpochState,
                     guard: StepGuard, signals: StopSignals) -> dict[str, float]:
        """The training part of an epoch, then its checkpoint; a stop signal during the epoch
        stops the run there (after saving)."""
        args, rt = self.args, self.rt
        self.train_loader.sampler.set_epoch(state.epoch, skip=state.step)
        train = train_one_epoch(model, criterion, self.optimizer, self.scheduler,
                                self.train_loader, rt.device, state,
                                after_step=self._after_step(guard),
                                amp=args.amp, scaler=self.scaler,
                                channels_last=args.channels_last,
                                progress=show_progress(args, rt),
                                desc=f"epoch {state.epoch + 1}/{args.epochs}")
        if not state.done:
            raise self._interrupted(signals, f"at epoch {state.epoch + 1} step "
                                             f"{state.step}/{self.steps}")
        broadcast_buffers(self.net)  # evaluate and save rank 0's running statistics everywhere
        self.save(state, pending_eval=train)
        if guard.stop_after_epoch or (signals.requested and not rt.distributed):
            raise self._interrupted(signals, f"after the training of epoch {state.epoch + 1} "
                                             "(its evaluation runs when resumed)")
        return train

    @contextmanager
    def _tensorboard(self) -> Iterator[None]:
        """With --tensorboard, rank 0's `self.board` for the block, continuing at the current
        global step; closed (so flushed) however the block ends."""
        if not (self.args.tensorboard and self.rt.is_main):
            yield
            return
        self.board = TensorBoardLog(self.run_dir, self.net, self.scheduler.last_epoch,
                                    self.args.log_every)
        try:
            yield
        finally:
            self.board.close()
            self.board = None

    def _after_step(self, guard: StepGuard) -> AfterStep:
        """The engine's `after_step`: `guard`, after recording the step in `self.board`."""
        board, scheduler = self.board, self.scheduler
        if board is None:
            return guard

        def after_step(state: EpochState, loss: torch.Tensor, lr: float) -> bool:
            board.step(scheduler.last_epoch, loss, lr)  # the steps done, this one included
            return guard(state, loss, lr)
        return after_step

    def _stop_check(self, signals: StopSignals, epoch: int) -> Callable[[], None]:
        """The evaluation's `check_stop`: a stop signal abandons it (the trained epoch is saved)."""
        def check() -> None:
            if signals.requested:
                raise self._interrupted(signals, f"during the evaluation of epoch {epoch + 1} (it "
                                                 "is evaluated again when resumed)")
        return check

    def _interrupted(self, signals: StopSignals, where: str) -> RunInterrupted:
        received = signals.received or signal.SIGTERM  # another process got it under torchrun
        saved = self.saver.last_path if self.saver else None
        resume = f"; continue with --resume {saved}" if saved else ""
        return RunInterrupted(f"{received.name} {where}: saved {saved or 'on rank 0'}{resume}",
                              exit_code=128 + received.value)

    def _say_start(self) -> None:
        args = self.args
        n_params = sum(p.numel() for p in self.net.parameters())
        test = f"{evaluated_images(args, self.test_set)} {self.data.recipe.eval_split}"
        say(self.rt, f"{args.arch} ({n_params / 1e6:.2f}M parameters, weight {args.weight}) on "
                     f"{describe(self.rt)}: {args.dataset} {len(self.train_set)} train / {test} "
                     f"images, {len(self.classes)} classes, {self.steps} steps per epoch -> "
                     f"{self.run_dir}")
        if args.warm > args.epochs:
            say(self.rt, f"note: --warm {args.warm} is longer than --epochs {args.epochs}: the lr "
                         f"rises to {args.epochs / args.warm:.0%} of its peak {args.lr:g} only")

    def _start_outputs(self) -> CsvLog:
        """Write args.json and start log.csv (a resumed one keeps its rows up to the checkpoint's
        epoch, plus the checkpoint's own row if a cut run had not logged it), or say in one line
        why they cannot be written."""
        ckpt, run_dir = self.resumed, self.run_dir
        try:
            (run_dir / "args.json").write_text(json.dumps(args_to_dict(self.args), indent=2)
                                               + "\n")
            if ckpt is None:
                return CsvLog(run_dir / "log.csv")
            return CsvLog(run_dir / "log.csv", resume_epoch=ckpt.epoch - bool(ckpt.pending_eval),
                          last_row=ckpt.row)
        except OSError as e:
            raise UsageError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def say(rt: Runtime, message: str) -> None:
    """Print `message` on rank 0."""
    if rt.is_main:
        print(message, flush=True)


def load_split(args: argparse.Namespace, data: DataSource, rt: Runtime, train: bool
               ) -> tuple[Dataset, list[str]]:
    """The training or test split of `data` and its class names (rank 0 first: it downloads)."""
    with main_process_first(rt):
        return data.load(args, train=train)


def expected_header(args: argparse.Namespace, data: DataSource, classes: list[str]
                    ) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed or evaluated by this run."""
    return {"family": data.recipe.family, "arch": args.arch, "width": args.width,
            "num_classes": len(classes), "classes": classes}


def build_net(args: argparse.Namespace, data: DataSource, rt: Runtime, num_classes: int
              ) -> nn.Module:
    """The network of `args.arch`, seeded with `--seed` (the same weights in every process)."""
    seed_everything(args.seed)
    net = models.create_model(args.arch, num_classes, data.recipe.family, width=args.width)
    if args.sync_lastbn and rt.distributed:
        sync_last_bn_(net)
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    return net.to(rt.device, memory_format=fmt)


def describe(rt: Runtime) -> str:
    """The devices and processes of this run, in a few words."""
    if rt.distributed:
        backend = "NCCL" if rt.device_ids else "gloo"
        return f"{rt.world_size} processes ({backend}, {rt.device.type})"
    if len(rt.device_ids) > 1:
        return f"DataParallel over GPUs {','.join(map(str, rt.device_ids))}"
    return str(rt.device)


def show_progress(args: argparse.Namespace, rt: Runtime) -> bool:
    """Whether to draw progress bars: rank 0, not --no-progress, stderr a terminal."""
    return rt.is_main and not args.no_progress and sys.stderr.isatty()


def evaluated_images(args: argparse.Namespace, test_set: Dataset) -> str:
    """How many test images an evaluation sees: all, or what --max-steps batches hold."""
    if args.max_steps and args.max_steps * args.batch_size < len(test_set):
        return f"the first {args.max_steps} batches (--max-steps) of {len(test_set)}"
    return str(len(test_set))


def _check_same_classes(args: argparse.Namespace, data: DataSource, train_classes: list[str],
                        test_classes: list[str]) -> None:
    """Refuse splits whose class lists differ: a label would name another class in each."""
    split = data.recipe.eval_split
    difference = class_difference(train_classes, test_classes, "train", split)
    if difference:
        raise UsageError(f"-ds {args.dataset}: the train and {split} splits have different "
                         f"classes ({difference})")


def _check_several_classes(args: argparse.Namespace, data: DataSource, classes: list[str]
                           ) -> None:
    """Refuse data of a single class: its cross-entropy is 0 whatever the weights, so nothing
    would be learnt and every test image would count as correct."""
    if len(classes) == 1:
        raise UsageError(f"-ds {args.dataset}: the {data.recipe.eval_split} split has a single "
                         f"class ({classes[0]}); a classifier needs at least 2")


def _all_finite(net: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight, buffer and optimizer state is finite (checked before each save, so
    that a diverged state never replaces a good checkpoint)."""
    tensors = [*net.parameters(), *net.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()])
    return bool(finite.all())


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
