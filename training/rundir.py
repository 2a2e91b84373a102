"""The run folder: where a run's outputs go, and the lock that keeps it to one process at a time."""
from __future__ import annotations

import argparse
import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import UsageError

LOCK_NAME = ".lock"


def run_dir_for(args: argparse.Namespace) -> Path:
    """OUT_DIR/ARCH/RUN_NAME; a resumed run without --run-name continues in the checkpoint's folder.
    Sets `args.run_name` to the folder's name, so that args.json records it.

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
    # realpath, unlike Path.resolve, never raises (a symlink loop in --out-dir is left to mkdir)
    continuing = args.resume and (os.path.dirname(os.path.realpath(args.resume))
                                  == os.path.realpath(run_dir))
    if (run_dir / "last.pt").exists() and not continuing:
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume "
                         f"{run_dir / 'last.pt'} or choose another --run-name")
    args.run_name = run_dir.name
    return run_dir


class RunDirLock:
    """An exclusive lock on a run folder for the life of a run (context manager).

    `flock` on RUN_DIR/.lock: the OS releases it when the process ends, however it ends, so a
    killed run never leaves a stale lock. A second process that wants the folder gets a
    UsageError naming the holder, before it has touched anything in the folder.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot write the run folder {self.run_dir}: "
                             f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.run_dir} is in use by {holder}: wait for it to end, or "
                             "choose another --run-name") from None
        except OSError as e:  # a file system without flock (some network or FUSE mounts)
            os.close(fd)
            raise UsageError(f"cannot lock the run folder {self.run_dir}: {e.strerror or e}; "
                             "use an --out-dir on a file system with flock") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
