"""Checkpoints: one dict format, written atomically, validated on load, kept as last.pt/best.pt."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .data import class_difference
from .errors import RunError, UsageError

CHECKPOINT_FORMAT = "mimicnorm-checkpoint"
# 2: mid-epoch position (step, steps_per_epoch, world_size, epoch_totals).
# 3: family, width and classes in the header; "pending_eval": the training part of the log row in
#    the checkpoint written when an epoch's training ends, before its evaluation (None otherwise);
#    "row": the epoch's log row in the one written after its evaluation (None otherwise).
CHECKPOINT_VERSION = 3
READABLE_VERSIONS = (2, 3)
RECOVERY_GLOB = "step-*.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file, fsync it, then rename it over `path`.

    A crash leaves either the old file or the new one, never a truncated checkpoint.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                if "inline_container" not in str(e):  # not the zip writer: a bug, keep it
                    raise
                # The zip writer reports a failed write (full disk, file-size limit) this way.
                raise OSError(errno.EIO, "the file could not be written completely (is the "
                                         "disk full?)") from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_with_copy(src: Path, dst: Path) -> None:
    """Atomically make `dst` a copy of `src`: a hard link when possible (free), else a byte copy."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)


@dataclass
class TrainingState:
    """Everything a checkpoint holds: the format's one definition (`to_dict` writes it,
    `from_dict` reads and checks it), so that exact resumption has a single contract."""

    # What the run was made with; a run that resumes or evaluates it must agree (`check`).
    family: str | None  # model family of the entry point: "cifar" or "imagenet" (None: version 2)
    arch: str
    width: float
    dataset: str  # the -ds choice
    num_classes: int
    classes: list[str] | None  # class names in label order (None: version 2)
    # Where the run is.
    epoch: int  # epochs whose training is done
    step: int  # steps done of the next epoch (0 at an epoch end)
    steps_per_epoch: int
    world_size: int
    epoch_totals: list[float]  # the next epoch's sums so far over all processes: loss*n, top-1, n
    epoch_seconds: float  # its training time so far
    pending_eval: dict[str, float] | None  # epoch `epoch` trained, not yet evaluated: its stats
    row: dict[str, float] | None  # epoch `epoch`'s log row, once evaluated
    best_acc1: float | None
    # What continues it.
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None  # the fp16 GradScaler's state
    rng: list[Any]  # every process's RNG states
    args: dict[str, Any]  # the flags

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint file's contents (plain values and tensors: `weights_only` loadable)."""
        fields_ = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **fields_}

    @classmethod
    def from_dict(cls, ckpt: Any, path: Path) -> TrainingState:
        """Read a loaded checkpoint file, version 2 or 3; anything else is a UsageError."""
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{path} is not a mimicnorm training checkpoint")
        if ckpt.get("version") not in READABLE_VERSIONS:
            raise UsageError(f"checkpoint {path} has format version {ckpt.get('version')}, "
                             f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if ckpt["version"] == 2:
            ckpt = _upgrade_v2(ckpt)
        missing = [f.name for f in fields(cls) if f.name not in ckpt]
        if missing:
            raise UsageError(f"checkpoint {path} lacks {', '.join(missing)} (damaged or foreign)")
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})

    def check(self, path: Path, expect: dict[str, Any]) -> None:
        """Raise UsageError (one line) unless the header fields in `expect` have those values;
        fields a version-2 file did not record (None) are not checked."""
        for key, wanted in expect.items():
            found = getattr(self, key)
            if found is None or found == wanted:
                continue
            if key == "classes":
                difference = class_difference(found, wanted, "the checkpoint", "this run's data")
                raise UsageError(f"checkpoint {path} was trained on other classes: {difference}")
            raise UsageError(f"checkpoint {path} was made with {key} {found}, this run has {key} "
                             f"{wanted}")


def _upgrade_v2(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A version-2 checkpoint in version 3's layout: nothing pending, no log row, family and
    classes unknown (None), width from its flags."""
    width = ckpt.get("args", {}).get("width", 1.0)
    return {**ckpt, "version": 3, "family": None, "classes": None, "width": width,
            "pending_eval": None, "row": None}


def load_checkpoint(path: str | os.PathLike, expect: dict[str, Any]) -> TrainingState:
    """Load a training checkpoint (`weights_only=True`, on the CPU) and check it against `expect`,
    a map of header fields ("family", "arch", "width", "num_classes", "classes", "dataset") to the
    values this run needs. Any problem, from a missing file to another architecture, raises
    UsageError with one line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files; all mean "unreadable"
        raise UsageError(f"cannot read checkpoint {path}: {_load_failure(e)}") from None
    state = TrainingState.from_dict(ckpt, path)
    state.check(path, expect)
    return state


def _load_failure(error: Exception) -> str:
    """One line on why `torch.load(weights_only=True)` failed (torch's own messages run long)."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a weights-only torch file (damaged, or it pickles Python objects)"
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    first_sentence = str(error).strip().split(". ")[0].splitlines()
    return first_sentence[0] if first_sentence else type(error).__name__


class CheckpointSaver:
    """Checkpoint policy of a run. `last.pt` is always the newest state (epoch end, recovery
    point or stop signal), `best.pt` the epoch with the best test top-1, and `step-NNNNNNNN.pt`
    the `keep_recovery` most recent --save-every recovery points (hard links where possible, so
    each state is written once)."""

    def __init__(self, run_dir: str | os.PathLike, keep_recovery: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.last_path = self.run_dir / "last.pt"
        self.best_path = self.run_dir / "best.pt"
        self.keep_recovery = keep_recovery
        for stale in self.run_dir.glob(".*.pt.tmp*"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], is_best: bool = False,
             recovery_step: int | None = None) -> Path:
        """Write `state` as last.pt, also as best.pt when `is_best` and as the recovery file of
        global step `recovery_step` when given. Returns last.pt's path.

        A failed write (full disk, lost permissions) raises RunError and leaves every earlier
        file as it was.
        """
        try:
            if recovery_step is None:
                save_atomic(state, self.last_path)
            else:
                step_path = self.run_dir / f"step-{recovery_step:08d}.pt"
                save_atomic(state, step_path)
                _replace_with_copy(step_path, self.last_path)
                self._prune()
            if is_best:
                _replace_with_copy(self.last_path, self.best_path)
        except OSError as e:
            raise RunError(f"cannot write a checkpoint in {self.run_dir}: {e.strerror or e}; "
                           "the checkpoints already there are intact") from None
        return self.last_path

    def recovery_files(self) -> list[Path]:
        """The step files, oldest written first."""
        return sorted(self.run_dir.glob(RECOVERY_GLOB), key=lambda p: (p.stat().st_mtime_ns, p))

    def _prune(self) -> None:
        for old in self.recovery_files()[:-self.keep_recovery or None]:
            old.unlink(missing_ok=True)
