"""Failures a user causes, each one line and its exit code with nothing saved lost: truncated LMDB
files, stop signals and bad samples during evaluation, two runs on one folder, mismatched class
lists, a full disk, decompression bombs, foreign checkpoints, and the smaller command-line cases."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import training
from Cifar.data_loader import CifarData
from Cifar.main import main as cifar_main
from Cifar.utils import get_args_parser as cifar_parser
from ImageNet import folder2lmdb
from ImageNet.data_loader import decode_image
from ImageNet.main import main as imagenet_main
from ImageNet.utils import get_args_parser as imagenet_parser
from tests.helpers import (REPO, assert_same_training_state, log_without_timings,
                           error_line, make_image_folder, make_lmdb_data_dir, stderr_lines)
from tests.recipes import TINY
from training.checkpoint import load_checkpoint
from training.cli import available_cpus
from training.rundir import RunDirLock

IMAGENET = ["-a", "resnet18_cbn", "--weight", "mean", "--image-size", "32", "--val-resize", "36",
            "-b", "4", "--gpu", "-1", "--no-progress", "--epochs", "1"]
PAGE = 4096


def _run_script(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


# --- 1. truncated LMDB files -----------------------------------------------------------------

@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory) -> Path:
    return make_lmdb_data_dir(tmp_path_factory)


def _truncated_copy(lmdb_dir: Path, target: Path, split: str, keep: int) -> Path:
    """`lmdb_dir` copied to `target` with `split`.lmdb cut to its first `keep` bytes (negative:
    all but the last -keep)."""
    shutil.copytree(lmdb_dir, target)
    path = target / f"{split}.lmdb"
    size = path.stat().st_size
    os.truncate(path, keep if keep >= 0 else size + keep)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("split, keep, workers", [
    ("train", 2 * PAGE, "0"),  # only the two meta pages
    ("train", -PAGE, "0"),  # all but the last page
    ("train", -PAGE, "2"),
    ("val", 5 * PAGE, "2"),
    ("val", 100, "0"),  # not even the meta pages
])
def test_truncated_lmdb_is_one_line_not_a_bus_error(lmdb_dir, tmp_path, split, keep, workers):
    path = _truncated_copy(lmdb_dir, tmp_path / "data", split, keep)
    result = _run_script(["ImageNet/main.py", *IMAGENET, "--data-dir", str(path.parent),
                          "-j", workers, "--out-dir", str(tmp_path / "runs")])
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ")
    assert ("truncated LMDB file" in line) if keep > 2 * PAGE - 1 or keep < 0 else (
        "not a readable LMDB database" in line)
    assert not (tmp_path / "runs").exists()


def test_converter_refuses_a_truncated_destination(lmdb_dir, tmp_path):
    dst = _truncated_copy(lmdb_dir, tmp_path / "data", "train", -PAGE)
    tree = make_image_folder(tmp_path / "src")
    result = _run_script(["ImageNet/folder2lmdb.py", "--src", str(tree), "--dst", str(dst),
                          "--quiet"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {dst} exists and is not a complete database") and (
        "truncated LMDB file" in line)


def test_converter_refuses_a_truncated_partial_file(lmdb_dir, tmp_path):
    dst = tmp_path / "data" / "train.lmdb"
    partial = _truncated_copy(lmdb_dir, tmp_path / "data", "train", -PAGE)
    partial.rename(folder2lmdb.partial_path(dst))
    result = _run_script(["ImageNet/folder2lmdb.py", "--src", str(make_image_folder(
        tmp_path / "src")), "--dst", str(dst), "--quiet"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "truncated LMDB file" in line and line.endswith("delete it to start the conversion over")


# --- 2. stop signals and bad samples during evaluation ----------------------------------------

class _FaultOnTestRead(Dataset):
    """A test split whose first read (once `flag` exists) sends SIGTERM to this process or fails
    like a corrupt image; every read index is recorded in `reads`."""

    def __init__(self, base: Dataset, flag: Path, fault: str) -> None:
        self.base, self.flag, self.fault, self.reads = base, flag, fault, []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads.append(i)
        if self.flag.exists():
            self.flag.unlink()
            if self.fault == "sigterm":
                os.kill(os.getpid(), 15)
            else:
                raise OSError("image file is truncated (7 bytes not processed)")
        return self.base[i]


class _FaultyTestData(CifarData):
    def __init__(self, flag: Path, fault: str) -> None:
        self.flag, self.fault, self.test_sets = flag, fault, []

    def load(self, args, train):
        data, classes = super().load(args, train)
        if train:
            return data, classes
        self.test_sets.append(_FaultOnTestRead(data, self.flag, self.fault))
        return self.test_sets[-1], classes


def _tiny_args(out: Path, *flags: str):
    return cifar_parser().parse_args([*TINY, "-j", "0", "--out-dir", str(out), *flags])


EVAL_FAULT_FLAGS = ["--epochs", "2", "--synthetic-size", "24", "40", "--run-name", "r"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run folder of EVAL_FAULT_FLAGS trained without a fault."""
    out = tmp_path_factory.mktemp("straight")
    return training.run(_tiny_args(out, *EVAL_FAULT_FLAGS), CifarData()).run_dir


@pytest.mark.numerics
@pytest.mark.parametrize("fault, code", [("sigterm", 143), ("bad sample", 2)])
def test_a_fault_during_evaluation_loses_no_training(uninterrupted, tmp_path, capsys, fault,
                                                     code):
    flags = EVAL_FAULT_FLAGS

    flag = tmp_path / "fault"
    flag.touch()
    data = _FaultyTestData(flag, fault)
    assert training.main(_tiny_args(tmp_path / "cut", *flags), data) == code
    line = stderr_lines(capsys)[-1]
    if fault == "sigterm":
        assert line.startswith("stopped: SIGTERM during the evaluation of epoch 1")
        assert len(data.test_sets[0].reads) == 4  # one batch, not the 40 images
    else:
        assert line == "error: cannot read sample 0: image file is truncated (7 bytes not processed)"
    run_dir = tmp_path / "cut" / "squeezenet_cbn" / "r"
    saved = load_checkpoint(run_dir / "last.pt", {})
    assert (saved.epoch, saved.step) == (1, 0) and saved.pending_eval is not None
    assert log_without_timings(run_dir)[1:] == []

    resumed = training.run(_tiny_args(tmp_path / "cut", *flags, "--resume", str(run_dir)),
                           CifarData())
    assert_same_training_state(uninterrupted / "last.pt", resumed.run_dir / "last.pt")
    assert log_without_timings(resumed.run_dir) == log_without_timings(uninterrupted)


def test_a_run_cut_before_its_log_line_gets_the_row_back(tmp_path, capsys):
    flags = ["--epochs", "2", "--run-name", "r"]
    result = training.run(_tiny_args(tmp_path, *flags), CifarData())
    log = result.run_dir / "log.csv"
    full = log.read_text()
    log.write_text("".join(full.splitlines(keepends=True)[:-1]))  # cut between save and log
    before = (result.run_dir / "last.pt").read_bytes()
    assert cifar_main([*TINY, "-j", "0", "--out-dir", str(tmp_path), *flags, "--resume",
                       str(result.run_dir)]) == 0
    assert log.read_text() == full
    assert (result.run_dir / "last.pt").read_bytes() == before
    assert "has all 2 epochs done, nothing to train" in capsys.readouterr().out


# --- 3. one process per run folder -----------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "squeezenet_cbn" / "r"
    argv = [*TINY, "-j", "0", "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from training.rundir import RunDirLock\n"
         f"with RunDirLock({str(run_dir)!r}):\n print('locked', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert cifar_main(argv) == 2
        error_line(capsys, f"{run_dir} is in use by process {holder.pid} on ")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock, nothing stale is left
        holder.wait()
    assert cifar_main(argv) == 0
    assert (run_dir / "last.pt").is_file()


def test_a_second_resume_of_a_running_folder_is_refused(tmp_path, capsys):
    argv = [*TINY, "-j", "0", "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert cifar_main(argv) == 0
    run_dir = tmp_path / "squeezenet_cbn" / "r"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with RunDirLock(run_dir):
        assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--resume", str(run_dir)]) == 2
    error_line(capsys, f"{run_dir} is in use by process {os.getpid()}")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


# --- 4. class lists ----------------------------------------------------------------------------

def _class_tree(root: Path, classes: tuple[str, ...], size: int = 32) -> Path:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (size, size), (40 * k, 10 * i, 0)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("loader", ["pil", "device"])
def test_cifar_folder_splits_with_other_classes(tmp_path, capsys, loader):
    _class_tree(tmp_path / "data" / "train", ("cat", "dog"))
    _class_tree(tmp_path / "data" / "test", ("bird", "cat"))
    argv = [*TINY, "-ds", "folder", "--data-dir", str(tmp_path / "data"), "-j", "0",
            "--loader", loader, "--out-dir", str(tmp_path / "runs")]
    assert cifar_main(argv) == 2
    error_line(capsys, "-ds folder: the train and test splits have different classes (2 "
                            "classes in train, 2 in test; only train has 1: dog; only test has "
                            "1: bird)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("data_format", ["folder", "lmdb"])
def test_imagenet_splits_with_other_classes(tmp_path, capsys, data_format):
    data = tmp_path / "data"
    trees = {"train": ("ant", "bee", "cat"), "val": ("ant", "bee")}
    for split, classes in trees.items():
        tree = _class_tree(tmp_path / "src" / split if data_format == "lmdb" else data / split,
                           classes)
        if data_format == "lmdb":
            data.mkdir(exist_ok=True)
            assert folder2lmdb.main(["--src", str(tree), "--dst", str(data / f"{split}.lmdb"),
                                     "--quiet"]) == 0
    argv = [*IMAGENET, "-ds", data_format, "--data-dir", str(data), "-j", "0", "--out-dir",
            str(tmp_path / "runs")]
    assert imagenet_main(argv) == 2
    error_line(capsys, f"-ds {data_format}: the train and val splits have different classes "
                            "(3 classes in train, 2 in val; only train has 1: cat)")


def test_class_difference_names_what_differs():
    assert training.data.class_difference(["a", "b"], ["a", "b"], "x", "y") is None
    assert training.data.class_difference(["ant", "bee"], ["bee", "ant"], "train", "val") == (
        "train and val have the same classes in another label order")
    many = [f"c{i}" for i in range(8)]
    assert training.data.class_difference(many, [], "train", "val") == (
        "8 classes in train, 0 in val; only train has 8: c0, c1, c2, c3, c4, ...")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    assert cifar_main([*TINY, "-j", "0", "--epochs", "1", "--out-dir", str(out),
                       "--run-name", "r"]) == 0
    return out / "squeezenet_cbn" / "r" / "last.pt"


def _folder_argv(tmp_path: Path, classes: tuple[str, ...], *flags: str) -> list[str]:
    _class_tree(tmp_path / "data" / "train", classes)
    _class_tree(tmp_path / "data" / "test", classes)
    return [*TINY, "-ds", "folder", "--data-dir", str(tmp_path / "data"), "-j", "0",
            "--out-dir", str(tmp_path / "runs"), *flags]


@pytest.mark.parametrize("evaluate", [False, True])
def test_a_checkpoint_of_other_classes_is_refused(tmp_path, capsys, evaluate):
    classes = ("cat", "dog")
    first = _folder_argv(tmp_path / "a", classes, "--epochs", "1", "--run-name", "r")
    assert cifar_main(first) == 0
    checkpoint = tmp_path / "a" / "runs" / "squeezenet_cbn" / "r" / "last.pt"
    before = checkpoint.read_bytes()
    flags = ["--evaluate"] if evaluate else ["--epochs", "2"]
    argv = _folder_argv(tmp_path / "b", ("cat", "fox"), "--resume", str(checkpoint), *flags)
    capsys.readouterr()
    assert cifar_main(argv) == 2
    error_line(capsys, f"checkpoint {checkpoint} was trained on other classes: 2 classes in "
                            "the checkpoint, 2 in this run's data; only the checkpoint has 1: "
                            "dog; only this run's data has 1: fox")
    assert checkpoint.read_bytes() == before


def test_a_checkpoint_of_the_other_family_or_width_is_one_line(tmp_path, capsys):
    """A CIFAR resnet18_cbn checkpoint handed to ImageNet/main.py (same arch name), or resumed
    with another --width: the state dict would not fit, which used to end in a traceback."""
    cifar = ["-a", "resnet18_cbn", "--width", "0.25", *TINY[2:], "-j", "0", "--epochs", "1",
             "--max-steps", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert cifar_main(cifar) == 0
    checkpoint = tmp_path / "resnet18_cbn" / "r" / "last.pt"
    imagenet = ["-a", "resnet18_cbn", "--width", "0.25", "-ds", "synthetic", "--image-size", "32",
                "--gpu", "-1", "-j", "0"]
    cases = [(imagenet_main, imagenet, "was made with family cifar, this run has family imagenet"),
             (cifar_main, [*cifar[:-4], "--width", "0.5"],
              "was made with width 0.25, this run has width 0.5")]
    capsys.readouterr()
    for main, argv, message in cases:
        for evaluate in ([], ["--evaluate"]):
            flags = ["--resume", str(checkpoint), "--out-dir", str(tmp_path / "other"), *evaluate]
            assert main([*argv, *flags]) == 2
            assert stderr_lines(capsys) == [f"error: checkpoint {checkpoint} {message}"]


def test_a_version_2_checkpoint_still_resumes(tiny_checkpoint, tmp_path):
    old = torch.load(tiny_checkpoint, weights_only=True)
    for key in ("family", "width", "classes", "pending_eval", "row"):
        del old[key]
    run_dir = tmp_path / "squeezenet_cbn" / "r"
    run_dir.mkdir(parents=True)
    torch.save({**old, "version": 2}, run_dir / "last.pt")
    result = training.run(_tiny_args(tmp_path, "--epochs", "2", "--resume", str(run_dir)),
                          CifarData())
    assert result.metrics["epoch"] == 2
    assert load_checkpoint(run_dir / "last.pt", {}).family == "cifar"


# --- 5. full disk, decompression bombs --------------------------------------------------------

_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
sys.argv = ["Cifar/main.py", *sys.argv[1:]]
from Cifar.main import main
sys.exit(main())
"""


def test_a_checkpoint_write_cut_by_the_file_system_keeps_the_last_one(tmp_path):
    """A real failed write: torch's zip writer reports it as a RuntimeError, not an OSError."""
    argv = [*TINY, "-j", "0", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert cifar_main([*argv, "--epochs", "1"]) == 0
    run_dir = tmp_path / "squeezenet_cbn" / "r"
    before = (run_dir / "last.pt").read_bytes()
    assert len(before) > 1_000_000
    result = _run_script(["-c", _FILE_SIZE_LIMIT, *argv, "--epochs", "2", "--resume",
                          str(run_dir)])
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot write a checkpoint in {run_dir}: the file could not be written "
        "completely (is the disk full?); the checkpoints already there are intact")
    assert (run_dir / "last.pt").read_bytes() == before
    assert not list(run_dir.glob(".*.tmp*"))


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header claiming `width` x `height` pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line(tmp_path, capsys):
    argv = _folder_argv(tmp_path, ("cat", "dog"), "--epochs", "1")
    bomb = tmp_path / "data" / "train" / "dog" / "2.png"
    bomb.write_bytes(_bomb_png())
    assert cifar_main(argv) == 2
    error_line(capsys, f"cannot read {bomb}: Image size (400000000 pixels) exceeds limit")
    with pytest.raises(training.DataError, match="record 3: not a decodable image"):
        decode_image(_bomb_png(), "train.lmdb record 3")


# --- 6. the smaller items ------------------------------------------------------------------------

def test_workers_default_to_at_most_the_cpus_available():
    for parser in (cifar_parser(), imagenet_parser()):
        args = parser.parse_args(["-a", "resnet18_cbn"])
        assert args.workers == min(4, available_cpus())


def test_max_steps_also_bounds_evaluation(tmp_path, capsys):
    flag = tmp_path / "no-fault"  # never created: the dataset only records reads
    data = _FaultyTestData(flag, "none")
    args = _tiny_args(tmp_path, "--epochs", "1", "--max-steps", "2", "--synthetic-size", "24",
                      "40")
    training.run(args, data)
    assert data.test_sets[0].reads == list(range(8))  # 2 batches of 4, not 40 images
    assert "24 train / the first 2 batches (--max-steps) of 40 test images" in (
        capsys.readouterr().out)


def test_imagenet_image_size_too_small_for_the_networks(capsys):
    with pytest.raises(SystemExit) as info:
        imagenet_parser().parse_args(["-a", "vgg11_cbn", "--image-size", "16"])
    assert info.value.code == 2
    assert "--image-size: must be at least 32 (the networks downsample by 32), got 16" in (
        capsys.readouterr().err)


def test_imagenet_help_names_the_val_folder():
    help_text = " ".join(imagenet_parser().format_help().split())
    assert "train/ and val/ ImageFolder trees" in help_text
    assert "train/ and test/ ImageFolder trees" in " ".join(cifar_parser().format_help().split())


def test_args_json_records_the_run_name_used(tmp_path):
    result = training.run(_tiny_args(tmp_path, "--epochs", "1", "--max-steps", "1"), CifarData())
    recorded = json.loads((result.run_dir / "args.json").read_text())
    assert recorded["run_name"] == result.run_dir.name and result.run_dir.name.startswith(
        "synthetic-mean-s0-")


def test_epochs_not_above_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(tiny_checkpoint.parent, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    base = [*TINY, "-j", "0", "--resume", str(run_dir)]
    assert cifar_main([*base, "--epochs", "1"]) == 0
    assert "has all 1 epochs done, nothing to train: pass --epochs N (N > 1)" in (
        capsys.readouterr().out)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "args.json"} == {
        k: v for k, v in before.items() if k != "args.json"}
    torch.save({**torch.load(run_dir / "last.pt", weights_only=True), "epoch": 3},
               run_dir / "last.pt")
    assert cifar_main([*base, "--epochs", "2"]) == 2
    error_line(capsys, "has 3 epochs done, more than --epochs 2")


def test_short_mimicnorm_runs_explain_their_test_loss(tmp_path, capsys):
    training.run(_tiny_args(tmp_path, "--epochs", "1", "--max-steps", "2"), CifarData())
    assert "after only 2 optimizer steps the last BN's running statistics" in (
        capsys.readouterr().out)
    training.run(_tiny_args(tmp_path, "-a", "squeezenet", "--weight", "none", "--epochs", "1",
                            "--max-steps", "2"), CifarData())
    assert "last BN" not in capsys.readouterr().out



def test_a_file_system_without_flock_is_one_line(tmp_path, capsys, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr("training.rundir.fcntl.flock", no_flock)
    assert cifar_main([*TINY, "-j", "0", "--epochs", "1", "--out-dir", str(tmp_path)]) == 2
    error_line(capsys, "cannot lock the run folder", "Operation not supported",
                    "use an --out-dir on a file system with flock")
