"""Fault injection on CPU: stop signals, SIGKILL (also mid-write), divergence, bad checkpoints and
output folders. Each fault must cost at most the work since the last save, leave every complete
checkpoint loadable, and end in one line on stderr with its exit code."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import training
from Cifar.data_loader import CifarData
from Cifar.main import main
from Cifar.utils import get_args_parser
from tests.recipes import HOT_LR, STABLE_LR, TINY, TINY_STEPS
from tests.helpers import (CLASSES, assert_same_training_state, log_without_timings,
                           make_image_folder, stderr_lines)
from training.checkpoint import load_checkpoint
from training.engine import loader_batches
from training.rng import CUBLAS_WORKSPACE, deterministic_algorithms

REPO = Path(__file__).resolve().parents[1]
EXPECT = {"arch": "squeezenet_cbn", "num_classes": 100, "dataset": "synthetic"}


def _args(out: Path, *flags: str):
    return get_args_parser().parse_args([*TINY, "--out-dir", str(out), *flags])


# --- stop signals ---------------------------------------------------------------------------

class _SignalOnRead(Dataset):
    """Sends `signum` to the training process when sample `index` is first read (in any process:
    the claim on `flag` makes it fire once)."""

    def __init__(self, base: Dataset, index: int, flag: Path, signum: int) -> None:
        self.base, self.index, self.flag, self.signum = base, index, flag, signum
        self.trainer_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == self.index:
            try:
                self.flag.unlink()
            except FileNotFoundError:
                pass
            else:
                os.kill(self.trainer_pid, self.signum)
        return self.base[i]


class _SignalledCifar(CifarData):
    def __init__(self, index: int, flag: Path, signum: int) -> None:
        self.index, self.flag, self.signum = index, flag, signum

    def load(self, args, train):
        data, classes = super().load(args, train)
        return (_SignalOnRead(data, self.index, self.flag, self.signum) if train else data), classes


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("workers, signum", [(0, signal.SIGTERM), (2, signal.SIGINT)])
def test_stop_signal_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, workers,
                                                                         signum):
    flags = ["--epochs", "3", "-j", str(workers)]
    straight = training.run(_args(tmp_path, *flags, "--run-name", "straight"), CifarData())

    order = torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    flag = tmp_path / "armed"
    flag.touch()
    data = _SignalledCifar(order[9], flag, signum)  # read for step 3 of 6 of the first epoch
    with pytest.raises(training.errors.RunInterrupted) as info:
        training.run(_args(tmp_path, *flags, "--run-name", "stopped"), data)
    run_dir = tmp_path / "squeezenet_cbn" / "stopped"
    assert info.value.exit_code == 128 + signum
    assert f"continue with --resume {run_dir / 'last.pt'}" in str(info.value)
    stopped = load_checkpoint(run_dir / "last.pt", EXPECT)
    assert stopped.epoch == 0 and 1 <= stopped.step < TINY_STEPS
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back

    resumed = training.run(_args(tmp_path, *flags, "--resume", str(run_dir)), CifarData())
    assert_same_training_state(straight.run_dir / "last.pt", resumed.run_dir / "last.pt")
    assert log_without_timings(resumed.run_dir) == log_without_timings(straight.run_dir)


def test_second_signal_aborts_at_once():
    with training.guard.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received is signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)


def _start(tmp_path: Path, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv, "--out-dir", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_training(proc: subprocess.Popen) -> None:
    """Block until the run prints its start line (set-up done, training begins)."""
    for line in proc.stdout:
        if "steps per epoch" in line:
            return


@pytest.mark.slow
def test_ctrl_c_with_workers_stops_cleanly_and_resumes_from_the_folder(tmp_path):
    argv = ["Cifar/main.py", *TINY, "--synthetic-size", "64", "4", "-j", "2", "--epochs", "50",
            "--run-name", "ctrl-c"]
    proc = _start(tmp_path, argv, start_new_session=True)
    _wait_for_training(proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the workers get it too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped: SIGINT")
    run_dir = tmp_path / "squeezenet_cbn" / "ctrl-c"
    ckpt = load_checkpoint(run_dir / "last.pt", EXPECT)

    finish = ["Cifar/main.py", *TINY, "--synthetic-size", "64", "4", "-j", "2",
              "--epochs", str(ckpt.epoch + 1), "--resume", str(run_dir)]
    done = _start(tmp_path, finish)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert f"resumed from {run_dir / 'last.pt'}" in out
    assert load_checkpoint(run_dir / "last.pt", EXPECT).epoch == ckpt.epoch + 1


# --- SIGKILL ----------------------------------------------------------------------------------

KILL_IN_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    real_save, calls = torch.save, [0]

    def save_then_die(obj, f, *args, **kwargs):  # dies half-way through write number N
        calls[0] += 1
        if calls[0] == int(os.environ["DIE_IN_SAVE"]):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    torch.save = save_then_die
    sys.argv = ["Cifar/main.py", *sys.argv[1:]]
    sys.path.insert(0, os.getcwd())
    from Cifar.main import main
    sys.exit(main())
""")


def _newest_recovery_step(run_dir: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in run_dir.glob("step-*.pt")), default=0)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_loses_only_the_unsaved_steps(tmp_path, seed):
    """3 epochs of 6 steps with a recovery file every step: SIGKILL inside a checkpoint write,
    then at 3 random moments (a random delay after a random step's save), then run to the end."""
    flags = [*TINY, "-j", "0", "--epochs", "3", "--save-every", "1", "--keep-recovery", "2"]
    straight = training.run(_args(tmp_path, *flags[len(TINY):], "--run-name", "straight"),
                            CifarData())
    run_dir = tmp_path / "squeezenet_cbn" / "killed"

    def attempt(kill_after_step: int | None = None, delay: float = 0.0,
                die_in_save: int = 0) -> int:
        where = ["--resume", str(run_dir)] if (run_dir / "last.pt").exists() else [
            "--run-name", "killed"]
        script = ["-c", KILL_IN_SAVE] if die_in_save else ["Cifar/main.py"]
        proc = _start(tmp_path, [*script, *flags, *where],
                      env=dict(os.environ, DIE_IN_SAVE=str(die_in_save)))
        if kill_after_step is not None:
            while _newest_recovery_step(run_dir) < kill_after_step and proc.poll() is None:
                time.sleep(0.002)
            time.sleep(delay)
            proc.kill()
        proc.communicate(timeout=300)
        return proc.returncode

    def position() -> int:
        ckpt = load_checkpoint(run_dir / "last.pt", EXPECT)
        return ckpt.epoch * TINY_STEPS + ckpt.step

    assert attempt(die_in_save=4) == -signal.SIGKILL
    assert list(run_dir.glob(".*.tmp*")), "the kill should land inside a checkpoint write"
    assert position() == 3  # the last complete save
    rng = random.Random(seed)
    for step in sorted(rng.sample([s for s in range(5, 16) if s % 6], 3)):
        assert attempt(kill_after_step=step, delay=rng.uniform(0.0, 0.05)) == -signal.SIGKILL
        assert step <= position() < 18
        for path in run_dir.glob("*.pt"):  # every visible checkpoint is complete
            load_checkpoint(path, EXPECT)
    assert attempt() == 0
    assert not list(run_dir.glob(".*.tmp*"))  # stale partial writes are cleared
    assert len(list(run_dir.glob("step-*.pt"))) == 2
    assert_same_training_state(straight.run_dir / "last.pt", run_dir / "last.pt")
    assert log_without_timings(run_dir) == log_without_timings(straight.run_dir)


# --- divergence ---------------------------------------------------------------------------------

@pytest.mark.numerics
def test_divergence_exits_3_and_keeps_the_good_checkpoints(tmp_path, capsys):
    argv = [*TINY, "-a", "squeezenet_nobn", "--weight", "none", "-j", "0", "--epochs", "2",
            "-lr", str(HOT_LR), "--save-every", "1", "--out-dir", str(tmp_path),
            "--run-name", "hot"]
    assert main(argv) == 3
    (line,) = stderr_lines(capsys)
    assert line.startswith("error: training diverged: non-finite loss at epoch 1 step ")
    assert "(lr " in line and f"lower -lr (it is {HOT_LR})" in line
    assert "-a squeezenet_cbn --weight mean" in line
    run_dir = tmp_path / "squeezenet_nobn" / "hot"
    bad_step = int(line.split(" step ")[1].split()[0])
    last = load_checkpoint(run_dir / "last.pt", {"arch": "squeezenet_nobn"})
    assert last.step == bad_step - 1 and f"{run_dir / 'last.pt'}" in line
    assert all(torch.isfinite(t).all() for t in last.model.values())

    twin = [*argv[:-1], "twin", "-a", "squeezenet_cbn", "--weight", "mean"]
    assert main(twin) == 0  # MimicNorm trains at the same learning rate


def test_non_finite_state_behind_a_finite_loss_is_never_saved(tmp_path, capsys, monkeypatch):
    """A last BN keeps the loss finite while the network blows up (seen with squeezenet_cbn at
    a high -lr): the check before each save catches it. Here step 3 leaves a NaN momentum buffer."""
    real_step, calls = torch.optim.SGD.step, []

    def step_then_poison(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.state[self.param_groups[0]["params"][0]]["momentum_buffer"].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step_then_poison)
    argv = [*TINY, "-j", "0", "--epochs", "1", "--save-every", "2", "--out-dir", str(tmp_path),
            "--run-name", "nan"]
    assert main(argv) == 3
    run_dir = tmp_path / "squeezenet_cbn" / "nan"
    (line,) = stderr_lines(capsys)
    lr_now = STABLE_LR * 5 / TINY_STEPS  # warm-up after 4 steps
    assert line == ("error: training diverged: the weights or momentum are no longer finite at "
                    f"epoch 1 step 4 (lr now {lr_now:.4g}); {run_dir / 'last.pt'} (epoch 1, "
                    f"step 2/6) is the last good checkpoint; lower -lr (it is {STABLE_LR})")
    assert load_checkpoint(run_dir / "last.pt", EXPECT).step == 2


def test_guard_reports_the_first_non_finite_loss_and_saves_nothing_after():
    saves = []
    with training.guard.StopSignals() as signals:
        guard = training.guard.StepGuard(signals, lambda s: saves.append(s.step), lambda: "hint",
                                   check_every=4, save_every=2)
        state = training.engine.EpochState(epoch=1, steps=10)
        losses = [1.0, 2.0, float("nan"), 3.0, float("inf")]
        with pytest.raises(training.errors.TrainingDiverged,
                           match=r"epoch 2 step 3 \(lr 0.3\); hint"):
            for step, loss in enumerate(losses, 1):
                state.step = step
                guard(state, torch.tensor(loss), lr=0.1 * step)
    assert saves == [2]  # the save at step 4 was refused: step 3 had diverged


# --- bad checkpoints and output folders -------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good")
    training.run(_args(out, "-j", "0", "--epochs", "1", "--max-steps", "3", "--save-every", "2",
                       "--run-name", "good"), CifarData())
    return out / "squeezenet_cbn" / "good"


def _truncated(fraction: float):
    def make(good: Path, path: Path) -> None:
        data = (good / "last.pt").read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return make


def _edited(**changes):
    def make(good: Path, path: Path) -> None:
        ckpt = torch.load(good / "last.pt", weights_only=True)
        torch.save({**ckpt, **changes}, path)
    return make


@pytest.mark.parametrize("make, flags, message", [
    (_truncated(0.0), [], "the file is empty or truncated"),
    (_truncated(0.3), [], "cannot read checkpoint"),
    (_truncated(0.999), [], "cannot read checkpoint"),
    (lambda good, p: p.write_bytes(random.Random(0).randbytes(5000)), [], "cannot read checkpoint"),
    (lambda good, p: torch.save({"model": {}}, p), [], "is not a mimicnorm training checkpoint"),
    (_edited(version=1), [], "has format version 1, this code reads versions 2, 3"),
    (_edited(), ["-a", "squeezenet"], "arch squeezenet_cbn, this run has arch squeezenet"),
    (_edited(num_classes=10), [], "num_classes 10, this run has num_classes 100"),
    (_edited(dataset="cifar10"), [], "dataset cifar10, this run has dataset synthetic"),
    (lambda good, p: (p.unlink(), os.link(next(good.glob("step-*.pt")), p)), ["-b", "12"],
     "stops mid-epoch at step 2 of 3 with 1 process(es); this run has 2 steps per epoch"),
])
def test_bad_checkpoint_is_one_line_and_changes_nothing(good_checkpoint, tmp_path, capsys, make,
                                                        flags, message):
    path = tmp_path / "run" / "bad.pt"
    path.parent.mkdir()
    path.touch()
    make(good_checkpoint, path)
    before = path.read_bytes()
    argv = [*TINY, "-j", "0", "--epochs", "2", "--max-steps", "3", "--resume", str(path), *flags]
    assert main(argv) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("error: ") and message in line
    assert path.read_bytes() == before and sorted(path.parent.iterdir()) == [path]


def test_missing_output_folders_are_created(tmp_path):
    result = training.run(_args(tmp_path / "a" / "b", "-j", "0", "--epochs", "1", "--max-steps",
                                "1", "--run-name", "new"), CifarData())
    assert (result.run_dir / "last.pt").is_file()


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert main([*TINY, "-j", "0", "--out-dir", str(blocker)]) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"error: cannot write the run folder {blocker}/squeezenet_cbn/")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main([*TINY, "-j", "0", "--out-dir", str(tmp_path)]) == 2
    finally:
        tmp_path.chmod(0o700)
    (line,) = stderr_lines(capsys)
    assert "cannot write the run folder" in line and "Permission denied" in line


def test_denied_output_folder_is_one_line_even_as_root(tmp_path, capsys, monkeypatch):
    def deny(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "mkdir", deny)
    assert main([*TINY, "-j", "0", "--out-dir", str(tmp_path)]) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"error: cannot write the run folder {tmp_path}/squeezenet_cbn/")
    assert line.endswith(": Permission denied")


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    argv = [*TINY, "-j", "0", "--epochs", "1", "--save-every", "1", "--out-dir", str(tmp_path),
            "--run-name", "full"]
    assert main(argv) == 1
    (line,) = stderr_lines(capsys)
    assert line == (f"error: cannot write a checkpoint in {tmp_path / 'squeezenet_cbn' / 'full'}: "
                    "No space left on device; the checkpoints already there are intact")
    run_dir = tmp_path / "squeezenet_cbn" / "full"
    assert load_checkpoint(run_dir / "last.pt", EXPECT).step == 2
    assert not list(run_dir.glob(".*.tmp*"))


# --- determinism and the data path --------------------------------------------------------------

@pytest.mark.numerics
def test_deterministic_runs_repeat_with_workers_and_restore_the_settings(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    runs = [training.run(_args(tmp_path, "-j", "2", "--epochs", "1", "--deterministic",
                               "--run-name", name), CifarData()) for name in ("one", "two")]
    assert_same_training_state(runs[0].run_dir / "last.pt", runs[1].run_dir / "last.pt")
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize("cuda_started", [False, True], ids=["fresh", "cuda-started"])
def test_deterministic_sets_the_cublas_workspace_once_and_says_when_too_late(
        monkeypatch, capsys, cuda_started):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts: set later, it has no effect."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_started)
    with deterministic_algorithms(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE  # for later runs too
    note = capsys.readouterr().err
    assert ("CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment" in note) == cuda_started


def test_augmentation_depends_on_seed_epoch_and_index_only():
    from torchvision import transforms
    base = training.SyntheticImages(8, 2, 8, transform=transforms.RandomCrop(8, padding=4))
    data = training.SeededSamples(base, seed=3)
    forward = [data[0, i][0] for i in range(8)]
    backward = [data[0, i][0] for i in reversed(range(8))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert all(torch.equal(a, data[i][0]) for i, a in enumerate(forward))  # a plain index: epoch 0
    assert not all(torch.equal(a, data[1, i][0]) for i, a in enumerate(forward))


def test_sampler_skips_whole_batches_of_the_same_order():
    sampler = training.ResumableSampler(range(20), batch_size=3, num_replicas=1, rank=0, seed=5)
    sampler.set_epoch(4)
    full = list(sampler)
    assert {epoch for epoch, _ in full} == {4} and sorted(i for _, i in full) == list(range(20))
    sampler.set_epoch(4, skip=2)
    assert list(sampler) == full[6:] and len(sampler) == 14


class _Unreadable(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if i == 5:
            raise OSError("image file is truncated (3 bytes not processed)")
        return torch.zeros(3, 4, 4), 0


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_sample_is_one_line_with_or_without_workers(workers):
    loader = torch.utils.data.DataLoader(training.SeededSamples(_Unreadable(), seed=0),
                                         batch_size=4, num_workers=workers)
    with pytest.raises(training.DataError) as info, loader_batches(loader) as batches:
        list(batches)
    assert str(info.value) == "cannot read sample 5: image file is truncated (3 bytes not processed)"


def test_a_corrupt_image_with_workers_exits_without_hanging(tmp_path):
    """The run used to print its error and then wait forever for its data workers at exit."""
    make_image_folder(tmp_path / "data" / "train")
    make_image_folder(tmp_path / "data" / "test", seed=1)
    corrupt = tmp_path / "data" / "train" / CLASSES[0] / "002.jpg"
    corrupt.write_bytes(b"not an image")
    argv = ["Cifar/main.py", *TINY, "-ds", "folder", "--data-dir", str(tmp_path / "data"),
            "-j", "2"]
    proc = _start(tmp_path, argv)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        f"error: cannot read {corrupt}: not a decodable image (unknown format)"]
