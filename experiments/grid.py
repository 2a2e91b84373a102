"""Running a grid of trainings that can be stopped at any moment and started again: each cell is
one `Cifar/main.py` run in its own folder, trained to its end across restarts."""
from __future__ import annotations

import shlex
import shutil
import tarfile
from pathlib import Path

from Cifar.main import main as cifar_main
from experiments.summarize import DIVERGED  # the run diverged (exit 3): a result, not retried

SPLITS = ("train", "test")


def finished(run_dir: Path, epochs: int) -> bool:
    """Whether the run in `run_dir` is done: `epochs` rows logged, or diverged."""
    if (run_dir / DIVERGED).exists():
        return True
    log = run_dir / "log.csv"
    return log.is_file() and len(log.read_text().strip().splitlines()) - 1 >= epochs


def run_to_end(run_dir: Path, argv: list[str], epochs: int, keep_checkpoints: bool = False
               ) -> str:
    """Train `Cifar/main.py argv` in `run_dir` until its `epochs` are done: skipped when done,
    resumed from its last checkpoint when cut, started afresh otherwise. Returns what happened
    ("done before", "resumed", "trained" or "diverged"). Other failures raise SystemExit."""
    if finished(run_dir, epochs):
        return "done before"
    if (run_dir / "last.pt").exists():
        where, outcome = ["--resume", str(run_dir)], "resumed"
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a start that saved nothing
        where, outcome = ["--run-name", run_dir.name], "trained"
    full = [*argv, "--out-dir", str(run_dir.parent.parent), *where]
    print("python Cifar/main.py " + shlex.join(full), flush=True)
    code = cifar_main(full)
    if code == 3:
        (run_dir / DIVERGED).write_text("the run diverged (exit 3); its log.csv holds the epochs "
                                        "before\n")
        outcome = "diverged"
    elif code != 0:
        raise SystemExit(f"stopped: {run_dir} ended with exit {code}; run the same command again "
                         "to continue")
    if not keep_checkpoints:
        for checkpoint in run_dir.glob("*.pt"):
            checkpoint.unlink()
    return outcome


def extracted_tree(source: Path, work_dir: Path) -> Path:
    """The ImageFolder root (with train/ and test/) of `source`, a directory or a .tar.gz."""
    if source.is_dir():
        return source
    target = work_dir / "extracted"
    done = target / ".complete"
    if not done.exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tarfile.open(source) as tar:
            tar.extractall(target, filter="data")
        done.touch()
    roots = [p.parent for p in target.glob("*/train")]
    if len(roots) != 1:
        raise SystemExit(f"{source} holds no single <root>/train ImageFolder tree")
    return roots[0]


def subset_tree(root: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """`dest`/{train,test}/<class>/ with symlinks to the first `per_class[split]` images of each
    class of `root` in file-name order (0: all of them)."""
    for split in SPLITS:
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())
            files = files[: per_class[split]] if per_class[split] else files
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dest
