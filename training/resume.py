"""What `--resume` may change: the checkpoint file it names, the flags it keeps, applies or refuses,
and the newer checkpoint it must not overwrite."""
from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import torch

from .checkpoint import TrainingState
from .errors import UsageError

# Flags a resumed run takes from the checkpoint (its optimizer and schedule continue); new values
# are ignored with a note, and args.json records the checkpoint's.
KEPT_FLAGS = ("lr", "weight_decay", "momentum", "warm", "milestones", "gamma")
# Flags that set the steps per epoch: applied at an epoch end (the schedule, defined in epochs,
# continues with the new steps per epoch), refused mid-epoch.
STEP_FLAGS = ("batch_size", "max_steps")
# Flags that define the method and the data order of a run: another value is another run.
IDENTITY_FLAGS = ("weight", "seed")
FLAG_NAMES = {"batch_size": "-b", "lr": "-lr", "weight_decay": "-wd"}


def flag_name(key: str) -> str:
    """The command-line spelling of the args key `key`."""
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def resume_path(text: str) -> str:
    """The checkpoint file `--resume text` names (a run folder means its last.pt), checked to be
    readable; anything else (missing, a symlink loop, no permission, a folder without last.pt)
    raises UsageError with one line."""
    path = Path(text)
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            if not (path / "last.pt").exists():
                raise UsageError(f"--resume {text}: the folder holds no last.pt; give a run "
                                 "folder or a checkpoint file (RUN/last.pt, best.pt, step-*.pt)")
            path = path / "last.pt"
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    return str(path)


def check_same_run(args: argparse.Namespace, ckpt: TrainingState) -> None:
    """Refuse a resume whose --weight or --seed differs from the checkpoint's: weight mean is the
    method itself and the seed the data order, so the result would be neither run."""
    for key in IDENTITY_FLAGS:
        old, new = ckpt.args.get(key), getattr(args, key)
        if old is not None and old != new:
            raise UsageError(f"{args.resume} was trained with {flag_name(key)} {old}, this run "
                             f"asks for {flag_name(key)} {new}: a resumed run continues its own "
                             f"method and data order; resume with {flag_name(key)} {old}, or "
                             "start a new run")


def check_batch_unchanged_mid_epoch(args: argparse.Namespace, ckpt: TrainingState) -> None:
    """Refuse another -b for a mid-epoch checkpoint: the batches already trained would be
    counted in other images."""
    old = ckpt.args.get("batch_size")
    if ckpt.step and old is not None and old != args.batch_size:
        raise UsageError(f"{args.resume} stops mid-epoch at step {ckpt.step} of "
                         f"{ckpt.steps_per_epoch} with -b {old}; this run has -b "
                         f"{args.batch_size}: resume it with -b {old} (only epoch-end "
                         "checkpoints can change the batch size)")


def adopt_checkpoint_recipe(args: argparse.Namespace, ckpt: TrainingState) -> list[str]:
    """Set the KEPT_FLAGS of `args` to the checkpoint's values (what the restored optimizer and
    schedule do); returns the flags whose asked-for value this replaced, as "-lr 0.05 (kept
    0.1)"."""
    ignored = []
    for key in KEPT_FLAGS:
        if key not in ckpt.args:
            continue
        old, new = ckpt.args[key], getattr(args, key)
        if isinstance(old, (list, tuple)):
            old, new = list(old), list(new)
        if old != new:
            ignored.append(f"{flag_name(key)} {_spelled(new)} (kept {_spelled(old)})")
        setattr(args, key, old)
    return ignored


def changed_step_flags(args: argparse.Namespace, ckpt: TrainingState) -> list[str]:
    """The STEP_FLAGS this run changes, as "-b 8 -> 4"."""
    return [f"{flag_name(k)} {_spelled(ckpt.args[k])} -> {_spelled(getattr(args, k))}"
            for k in STEP_FLAGS if k in ckpt.args and ckpt.args[k] != getattr(args, k)]


def _spelled(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def position(ckpt: TrainingState | dict) -> tuple[int, int, int]:
    """Where a checkpoint is in its run, ordered: epochs done, evaluated (1) or not (0), step."""
    get = ckpt.get if isinstance(ckpt, dict) else lambda k: getattr(ckpt, k)
    return get("epoch"), int(get("pending_eval") is None), get("step")


def describe_position(epoch: int, evaluated: int, step: int) -> str:
    """`position` in words."""
    if step:
        return f"epoch {epoch + 1} step {step}"
    return f"{epoch} epochs done" + ("" if evaluated else ", the last not evaluated")


def check_not_behind_last(run_dir: Path, args: argparse.Namespace, ckpt: TrainingState) -> None:
    """Refuse to continue an older checkpoint of `run_dir` (best.pt, a step file) into it while
    its last.pt is further on: the run would overwrite the newer state."""
    last, resumed = run_dir / "last.pt", Path(args.resume)
    if not last.exists() or os.path.realpath(run_dir) != os.path.realpath(resumed.parent):
        return
    if os.path.samefile(last, resumed):
        return
    try:
        newest = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        newer = position(newest) > position(ckpt)
    except Exception:  # a damaged last.pt: continuing from an older file is the way to recover
        return
    if newer:
        raise UsageError(f"{last} ({describe_position(*position(newest))}) is newer than "
                         f"{resumed} ({describe_position(*position(ckpt))}): resuming it here "
                         f"would overwrite last.pt; resume {last} instead, or continue "
                         f"{resumed.name} elsewhere with a new --run-name (or a copy in another "
                         "folder)")
