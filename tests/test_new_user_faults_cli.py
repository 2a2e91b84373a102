"""What a new user broke on the command line (issue 23), each now one line with its exit code and
nothing saved lost: run names outside the run folder, batches of one under a last BN, unreadable
--resume paths, resumes with changed flags (batch size, recipe, method, an older checkpoint),
seeds, memory, warm-up, a diverged evaluation and --sync-lastbn."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import training
from Cifar.main import main as cifar_main
from Cifar.utils import get_args_parser as cifar_parser
from experiments import summarize
from ImageNet.main import main as imagenet_main
from ImageNet.utils import get_args_parser as imagenet_parser
from tests.helpers import REPO, error_line
from tests.recipes import STABLE_LR, TINY, TINY_STEPS
from training.distributed import Runtime, SyncedBatchNorm1d
from training.runner import check_last_bn_batch
from training.schedule import lr_factor
from training.trainer import Trainer

IMAGENET = ["-a", "resnet18_cbn", "--weight", "mean", "--width", "0.25", "-ds", "synthetic",
            "--synthetic-size", "8", "4", "--image-size", "32", "-b", "4", "--epochs", "1",
            "--max-steps", "1", "-j", "0", "--gpu", "-1", "--no-progress"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 1-epoch TINY run folder (last.pt and best.pt are the same state)."""
    out = tmp_path_factory.mktemp("runs")
    assert cifar_main([*TINY, "-j", "0", "--epochs", "1", "--out-dir", str(out),
                       "--run-name", "r"]) == 0
    return out / "squeezenet_cbn" / "r"


def _copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / "squeezenet_cbn" / "r"
    shutil.copytree(run, target)
    return target


# --- 2. --run-name is one folder name ----------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "..", ".", "/abs", "a/b", ""])
def test_a_run_name_that_is_not_one_folder_name_writes_nothing(tmp_path, capsys, name):
    out = tmp_path / "deep" / "out"
    cifar = [*TINY, "-j", "0", "--epochs", "1"]
    for main, argv in ((cifar_main, cifar), (imagenet_main, IMAGENET)):
        assert main([*argv, "--out-dir", str(out), "--run-name", name]) == 2
        error_line(capsys, f"--run-name {name!r} is not a folder name",
                    "the run goes to OUT_DIR/ARCH/RUN_NAME")
    assert list(tmp_path.rglob("*")) == []


# --- 3. a batch of one under the last BN ------------------------------------------------------

def test_a_batch_of_one_on_a_mimicnorm_net_is_one_line_before_anything_is_written(tmp_path):
    result = subprocess.run(
        [sys.executable, "Cifar/main.py", "-a", "resnet18_cbn", "--weight", "mean", "-ds",
         "synthetic", "--synthetic-size", "64", "32", "-b", "1", "--epochs", "1", "--max-steps",
         "3", "-j", "0", "--no-progress", "--gpu", "-1", "--width", "0.25", "--out-dir",
         str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: -b 1 is one image per step; use -b 2 or more: the last BN of resnet18_cbn "
        "normalises the logits with batch statistics, which need at least two images"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batch, runtime, sync, refused", [
    (2, Runtime(torch.device("cuda", 0), [0, 1]), False, "split over 2 GPUs (DataParallel)"),
    (3, Runtime(torch.device("cuda", 0), [0, 1]), False, "split over 2 GPUs (DataParallel)"),
    (5, Runtime(torch.device("cuda", 0), [0, 1, 2, 3]), False, "use -b 8 or more"),
    (4, Runtime(torch.device("cuda", 0), [0, 1]), False, None),
    (6, Runtime(torch.device("cuda", 0), [0, 1, 2, 3]), False, None),  # chunks of 2, 3 GPUs
    (1, Runtime(torch.device("cpu"), [], 0, 2, True), False, "each torchrun process one image"),
    (1, Runtime(torch.device("cpu"), [], 0, 2, True), True, None),  # synced: 2 images
    (2, Runtime(torch.device("cpu"), [], 1, 2, True), False, None),
])
def test_replicas_with_one_image_are_refused(batch, runtime, sync, refused):
    args = cifar_parser().parse_args(["-a", "resnet18_cbn", "-b", str(batch)]
                                     + ["--sync-lastbn"] * sync)
    if refused is None:
        check_last_bn_batch(args, runtime)
        return
    with pytest.raises(training.UsageError, match="normalises the logits") as info:
        check_last_bn_batch(args, runtime)
    assert refused in str(info.value) and info.value.exit_code == 2


def test_evaluation_in_batches_of_one_is_allowed(tiny_run, capsys):
    """Evaluation normalises with the running statistics: a batch of one is fine there."""
    assert cifar_main([*TINY, "-j", "0", "-b", "1", "--evaluate", "--resume", str(tiny_run)]) == 0
    assert "on 8 synthetic test images" in capsys.readouterr().out


def test_a_last_batch_of_one_is_dropped(tmp_path, capsys):
    """17 images in batches of 8: the incomplete last batch (one image) is never trained on, with
    either loader."""
    for loader in ("pil", "device"):
        argv = [*TINY, "--synthetic-size", "17", "8", "-b", "8", "--epochs", "1", "-j", "0",
                "--loader", loader, "--out-dir", str(tmp_path), "--run-name", loader]
        assert cifar_main(argv) == 0
        assert "17 train / 8 test images, 100 classes, 2 steps per epoch" in (
            capsys.readouterr().out)


def test_a_body_batchnorm_on_one_value_is_one_line(tmp_path, capsys):
    """ImageNet resnet18 (BN twin) at 32 px: layer4 runs at 1x1, so -b 1 gives its BatchNorms a
    single value per channel."""
    argv = [*IMAGENET, "-a", "resnet18", "--weight", "none", "-b", "1", "--out-dir",
            str(tmp_path)]
    assert imagenet_main(argv) == 2
    error_line(capsys, "a BatchNorm layer of resnet18 got a single value per channel",
                "-b 1", "use a larger -b or --image-size")
    assert not list(tmp_path.rglob("*.pt"))


# --- 4. unreadable --resume paths -------------------------------------------------------------

def _loop(d: Path) -> Path:
    (d / "l1").symlink_to("l2")
    (d / "l2").symlink_to("l1")
    return d / "l1"


def _denied(d: Path, monkeypatch) -> Path:
    path = d / "locked.pt"
    path.write_bytes(b"x")

    def denied_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)
    monkeypatch.setattr("training.resume.open", denied_open, raising=False)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d, mp: _loop(d), "cannot read checkpoint {p}: Too many levels of symbolic links"),
    (lambda d, mp: _denied(d, mp), "cannot read checkpoint {p}: Permission denied"),
    (lambda d, mp: (d / "empty").mkdir() or d / "empty", "--resume {p}: the folder holds no "
                                                         "last.pt"),
    (lambda d, mp: (d / "notes.pt").write_text("hello") and d / "notes.pt",
     "cannot read checkpoint {p}"),
    (lambda d, mp: (d / "zero.pt").write_bytes(b"") or d / "zero.pt",
     "cannot read checkpoint {p}"),
    (lambda d, mp: torch.save({"weights": torch.ones(1)}, d / "w.pt") or d / "w.pt",
     "{p} is not a mimicnorm training checkpoint"),
])
@pytest.mark.parametrize("evaluate", [False, True])
def test_an_unreadable_resume_path_is_one_line(tmp_path, capsys, monkeypatch, make, message,
                                               evaluate):
    path = make(tmp_path, monkeypatch)
    argv = [*TINY, "-j", "0", "--out-dir", str(tmp_path / "out"), "--resume", str(path)]
    assert cifar_main(argv + ["--evaluate"] * evaluate) == 2
    error_line(capsys, message.format(p=path))
    assert not (tmp_path / "out").exists()


# --- 5. another -b at an epoch end: the schedule continues in epochs --------------------------

def _recorded_lrs(monkeypatch) -> list[float]:
    """The lr of every optimizer step of the runs that follow (what the engine hands the guard)."""
    lrs: list[float] = []
    original = Trainer._after_step

    def after_step(self, guard):
        inner = original(self, guard)

        def record(state, loss, lr):
            lrs.append(lr)
            return inner(state, loss, lr)
        return record
    monkeypatch.setattr(Trainer, "_after_step", after_step)
    return lrs


@pytest.mark.numerics
def test_another_batch_size_at_an_epoch_end_follows_the_new_schedule(tmp_path, capsys,
                                                                     monkeypatch):
    out = ["-j", "0", "--out-dir", str(tmp_path), "--run-name", "r", "--milestones", "3"]
    assert cifar_main([*TINY, *out, "--epochs", "2"]) == 0  # -b 4: 6 steps per epoch
    run_dir = tmp_path / "squeezenet_cbn" / "r"
    lrs = _recorded_lrs(monkeypatch)
    capsys.readouterr()
    assert cifar_main([*TINY, *out, "--epochs", "4", "-b", "2", "--resume", str(run_dir)]) == 0
    steps = 2 * TINY_STEPS  # -b 2
    expected = [STABLE_LR * lr_factor(k, steps, 1, [3], 0.1) for k in range(2 * steps, 4 * steps)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[:steps] == pytest.approx([STABLE_LR] * steps)  # the milestone is not early
    assert (f"note: resumed with {steps} steps per epoch (-b 4 -> 2), the checkpoint's run had "
            f"{TINY_STEPS}: the lr schedule, defined in epochs, continues from epoch 2") in (
        capsys.readouterr().out)
    recorded = json.loads((run_dir / "args.json").read_text())
    assert recorded["batch_size"] == 2 and recorded["milestones"] == [3]


def test_another_batch_size_mid_epoch_is_refused(tiny_run, tmp_path, capsys):
    """Both batch sizes give 3 steps (--max-steps), but step 1 of -b 4 is other images than
    step 1 of -b 2."""
    run_dir = _copy_run(tiny_run, tmp_path)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["args"]["max_steps"] = 3
    torch.save({**ckpt, "epoch": 0, "step": 1, "steps_per_epoch": 3, "row": None}, run_dir / "l.pt")
    (run_dir / "last.pt").unlink()
    (run_dir / "best.pt").unlink()
    before = _files(run_dir)
    argv = [*TINY, "-j", "0", "--max-steps", "3", "-b", "2", "--resume", str(run_dir / "l.pt")]
    assert cifar_main(argv) == 2
    error_line(capsys, "stops mid-epoch at step 1 of 3 with -b 4; this run has -b 2: resume it "
                        "with -b 4")
    assert _files(run_dir) == before


# --- 6. a resumed run records what it did -----------------------------------------------------

def test_a_resumed_run_records_and_is_grouped_by_what_it_did(tiny_run, tmp_path, capsys):
    run_dir = _copy_run(tiny_run, tmp_path)
    changed = ["-lr", "0.05", "--milestones", "5", "--momentum", "0.5"]
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", *changed, "--resume",
                       str(run_dir)]) == 0
    assert ("note: resumed with changed recipe flags, not applied: -lr 0.05 (kept 0.02); "
            "--momentum 0.5 (kept 0.9); --milestones 5 (kept 2): the checkpoint's optimizer and "
            "schedule continue, and args.json records their values") in capsys.readouterr().out
    recorded = json.loads((run_dir / "args.json").read_text())
    assert (recorded["lr"], recorded["momentum"], recorded["milestones"]) == (
        STABLE_LR, 0.9, [2])
    assert recorded["epochs"] == 2  # applied
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--out-dir", str(tmp_path / "runs"),
                       "--run-name", "fresh"]) == 0
    runs, problems = summarize.load_runs(tmp_path / "runs")
    assert problems == []
    (row,) = summarize.summarize(runs).itertuples()  # one setting, one arch and variant
    assert (row.n, row.variant) == (2, "MimicNorm")
    assert summarize.parse_setting(row.setting)["lr"] == STABLE_LR


@pytest.mark.parametrize("flag, old, new", [("--weight", "mean", "none"), ("--seed", "0", "1")])
def test_another_method_or_seed_on_resume_is_refused(tiny_run, tmp_path, capsys, flag, old,
                                                     new):
    run_dir = _copy_run(tiny_run, tmp_path)
    before = _files(run_dir)
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", flag, new, "--resume",
                       str(run_dir)]) == 2
    error_line(capsys, f"{run_dir / 'last.pt'} was trained with {flag} {old}, this run asks for "
                        f"{flag} {new}", f"resume with {flag} {old}, or start a new run")
    assert _files(run_dir) == before


# --- minor ------------------------------------------------------------------------------------

@pytest.mark.parametrize("parser", [cifar_parser, imagenet_parser])
def test_seeds_are_32_bit(parser, capsys):
    assert parser().parse_args(["-a", "resnet18_cbn", "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    for seed in (2**32, 2**64, -1):
        with pytest.raises(SystemExit) as info:
            parser().parse_args(["-a", "resnet18_cbn", "--seed", str(seed)])
        assert info.value.code == 2
        assert f"argument --seed: must be in 0..4294967295, got {seed}" in capsys.readouterr().err


CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000 "
           "bytes. Error code 12 (Cannot allocate memory)")
CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
            "79.19 GiB of which 3.12 GiB is free.")


def test_out_of_memory_is_one_line_and_keeps_the_checkpoint(tiny_run, tmp_path, capsys,
                                                            monkeypatch):
    def no_memory_to_build(*args, **kwargs):
        raise RuntimeError(CPU_OOM)
    with monkeypatch.context() as m:
        m.setattr("models.create_model", no_memory_to_build)
        assert cifar_main([*TINY, "-j", "0", "--width", "1000", "--out-dir",
                           str(tmp_path / "new")]) == 1
    error_line(capsys, "out of CPU memory: an allocation of 3725.3 GiB failed; lower -b (it is "
                        "4) or --width (it is 1000); checkpoints already on disk are intact")

    run_dir = _copy_run(tiny_run, tmp_path)
    before = _files(run_dir)

    def no_memory_to_step(self, *args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)
    monkeypatch.setattr(torch.optim.SGD, "step", no_memory_to_step)
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--resume", str(run_dir)]) == 1
    error_line(capsys, "out of GPU memory: an allocation of 20.00 GiB failed")
    assert {k: v for k, v in _files(run_dir).items() if k != "args.json"} == {
        k: v for k, v in before.items() if k != "args.json"}


def test_a_warm_up_longer_than_the_run_is_noted(tmp_path, capsys):
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--warm", "3", "--max-steps", "1",
                       "--out-dir", str(tmp_path), "--run-name", "long"]) == 0
    assert (f"note: --warm 3 is longer than --epochs 2: the lr rises to 67% of its peak "
            f"{STABLE_LR:g} only") in capsys.readouterr().out
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--warm", "2", "--max-steps", "1",
                       "--out-dir", str(tmp_path), "--run-name", "exact"]) == 0
    assert "--warm" not in capsys.readouterr().out


@pytest.mark.numerics
def test_a_non_finite_test_loss_is_a_divergence(tmp_path, capsys):
    argv = ["-a", "resnet18_cbn", "--weight", "mean", "--width", "0.25", "-ds", "synthetic",
            "--synthetic-size", "64", "32", "-b", "8", "--epochs", "1", "--max-steps", "2", "-j",
            "0", "--no-progress", "--gpu", "-1", "--momentum", "1e9", "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert cifar_main(argv) == 3
    error_line(capsys, "training diverged: non-finite test loss (nan) after epoch 1",
                "no epoch had been evaluated", "--momentum (it is 1e+09; below 1 converges)")
    run_dir = tmp_path / "resnet18_cbn" / "r"
    assert not (run_dir / "best.pt").exists()
    assert (run_dir / "log.csv").read_text().count("\n") == 1  # the header only


def test_an_older_checkpoint_is_not_resumed_over_a_newer_last(tiny_run, tmp_path, capsys):
    run_dir = _copy_run(tiny_run, tmp_path)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 2}, run_dir / "last.pt")  # as if a second epoch had run
    before = _files(run_dir)
    best = run_dir / "best.pt"
    assert cifar_main([*TINY, "-j", "0", "--epochs", "3", "--resume", str(best)]) == 2
    error_line(capsys, f"{run_dir / 'last.pt'} (2 epochs done) is newer than {best} (1 epochs "
                        "done): resuming it here would overwrite last.pt",
                "with a new --run-name")
    assert _files(run_dir) == before
    # what the message offers: continue best.pt in a new folder
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--resume", str(best), "--out-dir",
                       str(tmp_path / "runs"), "--run-name", "again"]) == 0
    assert _files(run_dir) == before
    assert (run_dir.parent / "again" / "last.pt").exists()


def test_resuming_best_when_it_is_last_continues(tiny_run, tmp_path):
    """best.pt of the last epoch is the same state as last.pt: nothing newer is overwritten."""
    run_dir = _copy_run(tiny_run, tmp_path)
    assert cifar_main([*TINY, "-j", "0", "--epochs", "2", "--resume",
                       str(run_dir / "best.pt")]) == 0
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2


def test_sync_lastbn_is_silent_and_dropping_it_on_resume_is_noted(tmp_path, capsys,
                                                                  monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # take the synced path
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = SyncedBatchNorm1d(3).train()(torch.arange(6.0).reshape(2, 3))
    finally:
        dist.destroy_process_group()
    assert torch.allclose(out, torch.tensor([[-1.0] * 3, [1.0] * 3]), atol=1e-4)

    argv = [*TINY, "-j", "0", "--max-steps", "1", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert cifar_main([*argv, "--epochs", "1", "--sync-lastbn"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "squeezenet_cbn" / "r"
    assert cifar_main([*argv, "--epochs", "2", "--resume", str(run_dir)]) == 0
    assert ("note: the checkpoint's run was trained with --sync-lastbn; this run computes the "
            "last BN's batch statistics per process") in capsys.readouterr().out
