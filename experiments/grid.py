"""The study engine: a grid of cells, each one `Cifar/main.py` run in its own folder and its own
process, several at once, that can be stopped at any moment and started again.

- A cell's results depend on its flags and its `--threads` only, never on how many cells run
  beside it (`--jobs`) or which.
- A finished cell keeps what the summarizer reads (args.json, log.csv, diverged.txt): a folder of
  finished cells can be committed, and a study pointed at it trains only what is missing.
- A cell cut by a stop or a kill resumes from its last checkpoint; one that saved none restarts.
- Studies on one folder share it: each takes the cells no other process holds (an `flock` per
  cell in `<out>/.work/locks/`) and skips the others, so two commands, or the lines of
  `--print-commands` run by a cluster scheduler, never train a cell twice.
- A cell folder holding a run of another setting (flags that change the result) is an error,
  never overwritten: a finished cell is a result.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from experiments.summarize import DIVERGED, setting_of  # diverged.txt: a result, not retried

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "Cifar" / "main.py"
SPLITS = ("train", "test")
IDENTITY_KEYS = ("arch", "weight", "seed")  # with `setting_of`: what makes two runs the same
KEPT_FILES = ("args.json", "log.csv", DIVERGED)  # what a finished cell keeps
LOCK_WAIT_S = 60  # how long a cell waits for a run of its folder by another process to end


class StudyError(Exception):
    """Bad study input: printed as one `error:` line, exit code 2."""


@dataclass(frozen=True)
class Cell:
    """One run of a study: its folder under the runs folder and its `Cifar/main.py` flags
    (without where the run goes)."""

    name: str  # "<model>/<run name>"
    argv: tuple[str, ...]
    epochs: int


@dataclass(frozen=True)
class Packing:
    """How cells share the machine: `jobs` at once with `threads` torch threads each; with
    `gpus`, `per_gpu` cells on each listed GPU (each cell sees only its own)."""

    jobs: int
    threads: int
    gpus: tuple[int, ...] = ()
    per_gpu: int = 1

    def slots(self, visible: str | None = None) -> list[dict[str, str]]:
        """The environment of each slot a cell can run in. GPU ids count the GPUs this study
        sees: with `visible` (its CUDA_VISIBLE_DEVICES, as a scheduler sets it) id k is the
        k-th of those."""
        threads = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if not self.gpus:
            return [dict(threads) for _ in range(self.jobs)]
        seen = [d.strip() for d in visible.split(",")] if visible else None
        if seen is not None and max(self.gpus) >= len(seen):
            raise StudyError(f"--gpus {' '.join(map(str, self.gpus))}: this study sees only "
                             f"{len(seen)} GPU(s) (CUDA_VISIBLE_DEVICES={visible})")
        return [{**threads, "CUDA_VISIBLE_DEVICES": seen[gpu] if seen else str(gpu)}
                for gpu in self.gpus for _ in range(self.per_gpu)]

    def describe(self) -> str:
        """One line for the start of a study."""
        where = (f"{self.per_gpu} per GPU on GPUs {' '.join(map(str, self.gpus))}" if self.gpus
                 else f"{self.jobs} at once")
        return f"cells {where}, {self.threads} torch thread(s) each"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def default_jobs(threads: int) -> int:
    """Cells at once on the CPU: one per `threads` cores available."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // threads)


def add_study_args(p: argparse.ArgumentParser) -> None:
    """The packing, selection and dispatch flags every study shares."""
    g = p.add_argument_group("packing and dispatch")
    g.add_argument("--jobs", type=positive_int, default=None,
                   help="cells trained at once, each its own process (default: one per "
                        "--threads cores; with --gpus: --per-gpu per GPU)")
    g.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per cell; part of a cell's numbers on the CPU")
    g.add_argument("--gpus", type=int, nargs="+", default=None, metavar="ID",
                   help="train on these GPUs (each cell sees only its own)")
    g.add_argument("--per-gpu", type=positive_int, default=1, help="cells sharing one GPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="train cells in the channels_last memory format (1.3x on 2 CPU cores, "
                        "results/study_packing; a layout, not part of a cell's setting)")
    g.add_argument("--cells", nargs="+", default=None, metavar="MODEL/RUN",
                   help="train only these cells (as --print-commands names them)")
    g.add_argument("--print-commands", action="store_true",
                   help="print one self-contained shell line per unfinished cell (for a "
                        "cluster scheduler: running a line twice trains it once) and exit")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every finished cell's checkpoints (default: logs only)")


def packing_of(args: argparse.Namespace) -> Packing:
    """The `Packing` the study flags ask for."""
    if args.gpus:
        return Packing(len(args.gpus) * args.per_gpu, args.threads, tuple(args.gpus),
                       args.per_gpu)
    return Packing(args.jobs or default_jobs(args.threads), args.threads)


def device_flags(args: argparse.Namespace) -> list[str]:
    """The `Cifar/main.py` device flags of every cell: its one visible GPU or the CPU, and the
    memory layout."""
    return (["--gpu", "0"] if args.gpus else ["--gpu", "-1"]) + (
        ["--channels-last"] if args.channels_last else [])


# --- the state of a cell folder ------------------------------------------------------------


def finished(run_dir: Path, epochs: int) -> bool:
    """Whether the run in `run_dir` is done: `epochs` rows logged, or diverged."""
    if (run_dir / DIVERGED).exists():
        return True
    log = run_dir / "log.csv"
    return log.is_file() and len(log.read_text().strip().splitlines()) - 1 >= epochs


def identity(flags: dict[str, object]) -> str:
    """What two runs must share to be the same cell: model, --weight, seed and the recipe."""
    return ", ".join(f"{k}={flags.get(k)}" for k in IDENTITY_KEYS) + ", " + setting_of(flags)


def cell_flags(cell: Cell) -> dict[str, object]:
    """The flags `Cifar/main.py` records for `cell`, from its own parser."""
    from Cifar.utils import get_args_parser

    return vars(get_args_parser().parse_args(list(cell.argv)))


def check_setting(run_dir: Path, cell: Cell) -> None:
    """StudyError if `run_dir` holds a run of other flags than `cell`'s."""
    recorded = run_dir / "args.json"
    if not recorded.is_file():
        return
    try:
        theirs = json.loads(recorded.read_text())
    except (OSError, ValueError):
        raise StudyError(f"{recorded} is unreadable: move the folder away to retrain the "
                         "cell") from None
    ours = cell_flags(cell)
    if identity(theirs) != identity(ours):
        keys = [k for k in (*IDENTITY_KEYS, "epochs", "width", "lr", "batch_size", "milestones",
                            "warm", "data_dir", "synthetic_size") if str(theirs.get(k)) !=
                str(ours.get(k))]
        differ = ", ".join(f"{k} {theirs.get(k)} (this study: {ours.get(k)})" for k in keys)
        raise StudyError(f"{run_dir} holds a run of another setting ({differ or 'recipe'}); "
                         "it is kept: give this study another --out-dir (a longer schedule is "
                         "another study: its milestones move with --epochs)")


def strip_finished(run_dir: Path) -> None:
    """Leave in a finished cell only what the summarizer reads (KEPT_FILES)."""
    for path in run_dir.iterdir():
        if path.name not in KEPT_FILES and path.is_file():
            path.unlink()


def clear_unsaved_start(run_dir: Path) -> None:
    """Empty the folder of a start that saved no checkpoint (its lock file stays)."""
    for path in run_dir.iterdir():
        if path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True, timeout: float | None = None
              ) -> Iterator[bool]:
    """`flock` on `path` for the block; yields whether it was taken (False only when not
    `blocking`, or when `timeout` seconds passed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
                break
            except BlockingIOError:
                if not blocking or (deadline is not None and time.monotonic() > deadline):
                    taken = False
                    break
                time.sleep(0.2)
        yield taken
    finally:
        os.close(fd)


# --- running cells ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a cell's process before it starts: end with the study, however the study ends (a
    study killed with SIGKILL leaves no cell behind; its cells resume from their last
    checkpoints). A stopped study (SIGTERM, Ctrl-C) stops its cells itself, which then save."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Running:
    """A cell being trained: its process, slot and claim."""

    cell: Cell
    proc: subprocess.Popen
    slot: int
    claim: contextlib.ExitStack
    started: float
    outcome: str


@dataclass
class Study:
    """Trains `cells` under `runs_dir` as `packing` says; `work_dir` holds the cell claims and
    each cell's output."""

    cells: list[Cell]
    runs_dir: Path
    work_dir: Path
    packing: Packing
    keep_checkpoints: bool = False
    running: dict[int, Running] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    stop_signal: int | None = None
    bar: object | None = None  # a tqdm bar of cells done, on a terminal
    done: int = 0

    def run_dir(self, cell: Cell) -> Path:
        """The cell's run folder."""
        return self.runs_dir / cell.name

    def output_file(self, cell: Cell) -> Path:
        """Where the cell's process writes its output."""
        return self.work_dir / "logs" / (cell.name.replace("/", "--") + ".txt")

    def unfinished(self) -> list[Cell]:
        """The cells still to train, after checking every cell folder's setting."""
        for cell in self.cells:
            check_setting(self.run_dir(cell), cell)
        return [c for c in self.cells if not finished(self.run_dir(c), c.epochs)]

    def run(self) -> int:
        """Train every unfinished cell; returns the exit code (0, 1 a cell failed, 2 bad input,
        128 + signal when stopped)."""
        todo = deque(self.unfinished())
        total = len(self.cells)
        self.done = total - len(todo)
        self.say(f"{self.done} of {total} cells done before; {len(todo)} to train, "
                 f"{self.packing.describe()}; outputs in {self.work_dir / 'logs'}")
        slots = self.packing.slots(os.environ.get("CUDA_VISIBLE_DEVICES"))
        failed: list[tuple[Cell, str]] = []
        held: list[Cell] = []
        self.bar = progress_bar(total, self.done)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                if self.stop_signal is None and not failed:
                    self._fill(todo, slots, held, total)
                if not self.running:
                    break
                for pid, ended in self._wait():
                    outcome = self._finish(self.running.pop(pid))
                    if outcome in ("trained", "resumed", "diverged"):
                        self.done += 1
                    elif outcome != "stopped":
                        failed.append((ended.cell, outcome))
                    took = _duration(time.monotonic() - ended.started)
                    self.say(f"[{self.done}/{total}] {ended.cell.name}: {outcome} after {took}"
                             f"{self._eta(todo)}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        return self._exit_code(failed, held)

    def _fill(self, todo: deque, slots: list[dict[str, str]], held: list[Cell],
              total: int) -> None:
        """Start cells from `todo` until every slot is busy or none is left."""
        while todo:
            free = [i for i in range(len(slots))
                    if i not in {r.slot for r in self.running.values()}]
            if not free:
                return
            cell = todo.popleft()
            started = self._start(cell, free[0], slots[free[0]])
            if started == "held":
                held.append(cell)
                self.say(f"{cell.name}: held by another study; skipped")
            elif started != "running":
                self.done += 1
                self.say(f"[{self.done}/{total}] {cell.name}: {started}")

    def _exit_code(self, failed: list[tuple[Cell, str]], held: list[Cell]) -> int:
        """Say how the study ended; its exit code."""
        if self.stop_signal is not None:
            self.say(f"stopped by {signal.Signals(self.stop_signal).name}: cut cells resume "
                     "from their checkpoints when the same command runs again")
            return 128 + self.stop_signal
        for cell, outcome in failed:
            print(f"error: {cell.name} {outcome}; its output: {self.output_file(cell)}; run the "
                  "same command again to continue", file=sys.stderr)
        if failed:
            return 1
        if held:
            self.say(f"{len(held)} cell(s) held by another study were left to it: run the "
                     "same command again after it ends to check")
        return 0

    def say(self, line: str) -> None:
        """A progress line (above the bar on a terminal); the bar shows cells done."""
        if self.bar is None:
            say(line)
            return
        self.bar.write(f"{time.strftime('%H:%M:%S')} {line}")
        self.bar.n = self.done
        self.bar.set_postfix_str(", ".join(r.cell.name for r in self.running.values()))

    def _start(self, cell: Cell, slot: int, env: dict[str, str]) -> str:
        """Claim and launch `cell`: "running", "held" (another study has it) or what it was
        ("done before")."""
        claim = contextlib.ExitStack()
        lock = self.work_dir / "locks" / (cell.name.replace("/", "--") + ".lock")
        if not claim.enter_context(file_lock(lock, blocking=False)):
            claim.close()
            return "held"
        run_dir = self.run_dir(cell)
        if finished(run_dir, cell.epochs):  # finished by another study since we looked
            claim.close()
            return "done before"
        with file_lock(run_dir / ".lock", timeout=LOCK_WAIT_S) as free:
            if not free:  # a Cifar/main.py run of someone else's in this folder
                claim.close()
                return "held"
            if (run_dir / "last.pt").exists():
                where, outcome = ["--resume", str(run_dir)], "resumed"
            else:
                clear_unsaved_start(run_dir)
                where, outcome = ["--run-name", run_dir.name], "trained"
        argv = [*cell.argv, "--out-dir", str(run_dir.parent.parent), *where,
                "--threads", str(self.packing.threads)]
        out = self.output_file(cell)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as log:
            log.write(f"$ python Cifar/main.py {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, str(ENTRY), *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    preexec_fn=_die_with_parent)
        self.running[proc.pid] = Running(cell, proc, slot, claim, time.monotonic(), outcome)
        doing = "resuming" if outcome == "resumed" else "training"
        self.say(f"{cell.name}: {doing} (slot {slot + 1})")
        return "running"

    def _wait(self) -> list[tuple[int, Running]]:
        """Block until at least one cell's process has ended; returns the ended ones."""
        while True:
            ended = [(pid, r) for pid, r in self.running.items() if r.proc.poll() is not None]
            if ended:
                return ended
            time.sleep(0.2)

    def _finish(self, run: Running) -> str:
        """Record how `run` ended and release its claim; returns the outcome."""
        code, run_dir = run.proc.returncode, self.run_dir(run.cell)
        try:
            if code == 3:
                (run_dir / DIVERGED).write_text("the run diverged (exit 3); its log.csv holds "
                                                "the epochs before\n")
                outcome = "diverged"
            elif code == 0 and finished(run_dir, run.cell.epochs):
                outcome = run.outcome
                self.durations.append(time.monotonic() - run.started)
            elif code > 128 or code < 0:
                self.stop_signal = self.stop_signal or (code - 128 if code > 128 else -code)
                return "stopped"
            else:
                return f"ended with exit {code} ({_last_line(self.output_file(run.cell))})"
            if not self.keep_checkpoints:
                strip_finished(run_dir)
            return outcome
        finally:
            run.claim.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        """Stop: every running cell saves its checkpoint and ends, no new cell starts."""
        self.stop_signal = signum
        for run in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                run.proc.send_signal(signal.SIGTERM)

    def _eta(self, todo: deque) -> str:
        """`; running: ...; about T left` from the cells trained so far in this command."""
        running = ", ".join(r.cell.name for r in self.running.values())
        text = f"; running: {running}" if running else ""
        if self.durations and (todo or self.running):
            mean = sum(self.durations) / len(self.durations)
            left = mean * (len(todo) + 0.5 * len(self.running)) / self.packing.jobs
            text += f"; about {_duration(left)} left"
        return text


def say(line: str) -> None:
    """A progress line, with its time of day."""
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def progress_bar(total: int, done: int) -> object | None:
    """A tqdm bar of cells done when stdout is a terminal and tqdm is installed, else None."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="cell", dynamic_ncols=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _last_line(path: Path) -> str:
    """The last non-empty line of a cell's output."""
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()[:300]
    return "no output"


def select(cells: list[Cell], names: list[str] | None) -> list[Cell]:
    """The cells `--cells` names (all without it); StudyError for a name not in the study."""
    if names is None:
        return cells
    known = {c.name: c for c in cells}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StudyError(f"--cells: not cells of this study: {' '.join(unknown)} (it has "
                         f"{', '.join(list(known)[:4])}{', ...' if len(known) > 4 else ''})")
    return [known[n] for n in dict.fromkeys(names)]


def cell_commands(study: Study, command: list[str]) -> list[str]:
    """One shell line per unfinished cell: `command` (the study's own command line, without its
    selection and dispatch flags) for that cell alone."""
    return [shlex.join([*command, "--cells", cell.name, "--jobs", "1"])
            for cell in study.unfinished()]


def dispatch_command(prog: list[str], argv: list[str]) -> list[str]:
    """`prog argv` without --print-commands, --cells and --jobs (each printed line sets its
    own), and without what follows `--` when nothing does."""
    out, skip = [*prog], False
    for arg in argv:
        if arg == "--print-commands" or arg.startswith(("--cells=", "--jobs=")):
            continue
        if arg in ("--cells", "--jobs"):
            skip = True
            continue
        if skip and not arg.startswith("-"):
            continue
        skip = False
        out.append(arg)
    return out


def run_from_args(args: argparse.Namespace, argv: list[str], module: str,
                  make_cells: Callable[[Path], list[Cell]]) -> int:
    """What a study command does with its flags: `make_cells(work_dir)` (which may raise
    StudyError), then print their lines (`--print-commands`) or train them. Returns the exit
    code; bad input is one `error:` line (2), an unwritable study folder too (1)."""
    try:
        work = work_dir_of(args.out_dir)
        study = Study(select(make_cells(work), args.cells), args.out_dir / "runs", work,
                      packing_of(args), args.keep_checkpoints)
        command = dispatch_command(["python", "-m", module], argv)
        if args.print_commands:
            for line in cell_commands(study, command):
                print(line)
            return 0
        study.unfinished()  # refuses a folder of another setting before anything is written
        if args.cells is None:
            (args.out_dir / "command.txt").write_text(shlex.join(command) + "\n")
        return study.run()
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the study folder {args.out_dir}: {e.strerror or e}",
              file=sys.stderr)
        return 1


# --- data -------------------------------------------------------------------------------------


def extracted_tree(source: Path, work_dir: Path) -> Path:
    """The ImageFolder root (with train/ and test/) of `source`, a directory or a .tar.gz,
    extracted once under `work_dir` however many studies ask at once."""
    if source.is_dir():
        return source
    if not source.is_file():
        raise StudyError(f"--source {source}: no such file or folder")
    target = work_dir / "extracted"
    done = target / ".complete"
    with file_lock(work_dir / "extract.lock"):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            try:
                with tarfile.open(source) as tar:
                    tar.extractall(target, filter="data")
            except (tarfile.TarError, EOFError, OSError) as e:
                shutil.rmtree(target, ignore_errors=True)
                raise StudyError(f"--source {source}: not a readable .tar.gz "
                                 f"({_tar_problem(e)})") from None
            done.touch()
    roots = [p.parent for p in target.glob("*/train")]
    if len(roots) != 1:
        raise StudyError(f"{source} holds no single <root>/train ImageFolder tree")
    return roots[0]


def _tar_problem(error: Exception) -> str:
    """One line on why a tar archive cannot be read (tarfile lists every compression it tried,
    one per line, when none fits)."""
    lines = str(error).splitlines()
    if len(lines) != 1:
        return "not a tar archive, compressed or not" if lines else type(error).__name__
    return lines[0]


def subset_tree(root: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """`dest`/{train,test}/<class>/ with symlinks to the first `per_class[split]` images of each
    class of `root` in file-name order (0: all of them); built once, whoever asks at once."""
    with file_lock(dest.parent / f"{dest.name}.lock"):
        for split in SPLITS:
            if not (root / split).is_dir():
                raise StudyError(f"{root} has no {split}/ folder")
            for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                files = sorted(p for p in class_dir.iterdir() if p.is_file())
                files = files[: per_class[split]] if per_class[split] else files
                out = dest / split / class_dir.name
                out.mkdir(parents=True, exist_ok=True)
                for f in files:
                    link = out / f.name
                    if not link.is_symlink():
                        link.symlink_to(f.resolve())
    return dest


def work_dir_of(out_dir: Path) -> Path:
    """`<out>/.work`: claims, cell outputs and data, never committed (it ignores itself)."""
    work = out_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    ignore = work / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return work
