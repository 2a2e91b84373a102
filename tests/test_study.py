"""The study engine (`experiments.grid`) through `experiments.table1`: cells as processes give the
same numbers however they are packed, survive SIGKILL and SIGTERM, skip committed cells, print
cluster lines that train once, share a folder between two studies, and refuse a folder of
another setting."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import grid, table1

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--synthetic-size", "512", "16", "--archs", "squeezenet",
        "--variants", "bn", "mimicnorm", "--extra", "squeezenet:nonorm", "--seeds", "0",
        "--width", "0.25", "--epochs", "3", "--batch", "8", "--lr", "0.02"]
CELLS = ("squeezenet/bn-s0", "squeezenet_cbn/mimicnorm-s0", "squeezenet_nobn/nonorm-s0")
TIMING = ("epoch_seconds", "images_per_second", "peak_memory_mb")


def _study(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.table1", *TINY, *extra,
                             "--out-dir", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _logs(out: Path) -> dict[str, list[list[str]]]:
    """Every cell's log.csv without its timing columns."""
    logs = {}
    for log in sorted((out / "runs").glob("*/*/log.csv")):
        rows = [line.split(",") for line in log.read_text().splitlines()]
        keep = [i for i, c in enumerate(rows[0]) if c not in TIMING]
        logs[log.parent.relative_to(out / "runs").as_posix()] = [[r[i] for i in keep]
                                                                 for r in rows]
    return logs


def _wait_for(paths: list[Path], proc: subprocess.Popen) -> None:
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The tiny study, one cell at a time, checkpoints kept."""
    out = tmp_path_factory.mktemp("straight")
    _finish(_study(out, "--jobs", "1", "--keep-checkpoints"))
    return out


@pytest.mark.slow
@pytest.mark.numerics
def test_two_cells_at_once_give_the_numbers_of_one_at_a_time(straight, tmp_path):
    out = _finish(_study(tmp_path, "--jobs", "2", "--keep-checkpoints"))
    assert "cells 2 at once, 1 torch thread(s) each" in out
    assert "[3/3]" in out and (tmp_path / "table.md").is_file()
    assert _logs(tmp_path) == _logs(straight) and len(_logs(straight)) == 3
    for cell in CELLS:
        ours = torch.load(tmp_path / "runs" / cell / "last.pt", weights_only=True)["model"]
        theirs = torch.load(straight / "runs" / cell / "last.pt", weights_only=True)["model"]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
@pytest.mark.numerics
def test_sigkill_with_two_cells_training_then_restart_resumes_both(straight, tmp_path):
    proc = _study(tmp_path, "--jobs", "2")
    cut = [tmp_path / "runs" / c for c in CELLS[:2]]
    _wait_for([c / "last.pt" for c in cut], proc)
    os.killpg(proc.pid, signal.SIGSTOP)  # freeze study and cells: both are mid-training
    assert not any(grid.finished(c, 3) for c in cut)
    proc.kill()  # SIGKILL the study; its cells die with it
    os.killpg(proc.pid, signal.SIGCONT)
    proc.communicate(timeout=60)
    out = _finish(_study(tmp_path, "--jobs", "2"))
    assert f"{CELLS[0]}: resuming" in out and f"{CELLS[1]}: resuming" in out
    assert f"{CELLS[2]}: training" in out
    assert _logs(tmp_path) == _logs(straight)
    for cell in CELLS:  # a finished cell keeps only what the summarizer reads
        assert sorted(p.name for p in (tmp_path / "runs" / cell).iterdir()) == [
            "args.json", "log.csv"]


@pytest.mark.slow
@pytest.mark.numerics
def test_sigterm_stops_the_study_with_143_and_the_same_command_continues(straight, tmp_path):
    proc = _study(tmp_path, "--jobs", "1")
    _wait_for([tmp_path / "runs" / CELLS[0] / "last.pt"], proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    _finish(_study(tmp_path, "--jobs", "1"))
    assert _logs(tmp_path) == _logs(straight)


def _committed_copy(straight: Path, dest: Path, cells: tuple[str, ...]) -> None:
    """What a commit of finished cells holds: args.json and log.csv of each."""
    for cell in cells:
        (dest / "runs" / cell).mkdir(parents=True)
        for name in ("args.json", "log.csv"):
            shutil.copy(straight / "runs" / cell / name, dest / "runs" / cell / name)


@pytest.mark.slow
def test_committed_cells_are_skipped_and_a_printed_line_trains_its_cell_once(straight,
                                                                              tmp_path):
    _committed_copy(straight, tmp_path, CELLS[:2])
    before = {c: (tmp_path / "runs" / c / "log.csv").read_bytes() for c in CELLS[:2]}
    printed = subprocess.run([sys.executable, "-m", "experiments.table1", *TINY, "--out-dir",
                              str(tmp_path), "--print-commands"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert len(printed) == 1 and f"--cells {CELLS[2]} --jobs 1" in printed[0]
    line = shlex.split(printed[0])
    assert line[:3] == ["python", "-m", "experiments.table1"]
    runs = [subprocess.run([sys.executable, *line[1:]], cwd=REPO, capture_output=True,
                           text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert f"{CELLS[2]}: training" in runs[0].stdout
    assert "1 of 1 cells done before; 0 to train" in runs[1].stdout
    assert _logs(tmp_path) == _logs(straight)
    assert before == {c: (tmp_path / "runs" / c / "log.csv").read_bytes() for c in CELLS[:2]}


@pytest.mark.slow
def test_a_cell_held_by_another_study_is_skipped_and_two_studies_share_a_folder(tmp_path):
    held = tmp_path / "held"
    lock = held / ".work" / "locks" / (CELLS[0].replace("/", "--") + ".lock")
    with grid.file_lock(lock) as taken:
        assert taken
        out = _finish(_study(held, "--jobs", "1", "--cells", *CELLS[:2]))
    assert f"{CELLS[0]}: held by another study; skipped" in out
    assert not (held / "runs" / CELLS[0]).exists()
    assert grid.finished(held / "runs" / CELLS[1], 3)

    both = tmp_path / "both"
    studies = [_study(both, "--jobs", "1") for _ in range(2)]
    outs = [_finish(s) for s in studies]
    for cell in CELLS:
        assert sum(o.count(f"{cell}: training") for o in outs) == 1, outs
        epochs = [r.split(",")[0] for r in
                  (both / "runs" / cell / "log.csv").read_text().splitlines()[1:]]
        assert epochs == ["1", "2", "3"]


def test_a_folder_of_another_setting_is_refused_and_kept(straight, tmp_path, capsys):
    _committed_copy(straight, tmp_path, CELLS)
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    for change, named in ((["--epochs", "4"], "epochs 3 (this study: 4)"),
                          (["--width", "0.5"], "width 0.25 (this study: 0.5)"),
                          (["--lr", "0.05"], "lr 0.02 (this study: 0.05)")):
        argv = [*TINY, *change, "--out-dir", str(tmp_path)]
        assert table1.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, err
    assert before == {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert not (tmp_path / "command.txt").exists()


def test_packing_gives_each_cell_its_threads_and_its_own_gpu():
    slots = grid.Packing(jobs=4, threads=2, gpus=(0, 3), per_gpu=2).slots()
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "3", "3"]
    assert {s["OMP_NUM_THREADS"] for s in slots} == {"2"}
    scheduled = grid.Packing(jobs=2, threads=1, gpus=(1,), per_gpu=2).slots(visible="4,6")
    assert [s["CUDA_VISIBLE_DEVICES"] for s in scheduled] == ["6", "6"]  # the 2nd it was given
    with pytest.raises(grid.StudyError, match="sees only 2 GPU"):
        grid.Packing(jobs=1, threads=1, gpus=(2,)).slots(visible="4,6")
    assert grid.Packing(jobs=2, threads=1).slots() == [{"OMP_NUM_THREADS": "1",
                                                        "MKL_NUM_THREADS": "1"}] * 2
    args = table1.get_args_parser().parse_args(["--gpus", "1", "2", "--per-gpu", "3"])
    assert grid.packing_of(args) == grid.Packing(6, 1, (1, 2), 3)
    assert grid.device_flags(args) == ["--gpu", "0", "--channels-last"]  # its own GPU only
    no_cl = table1.get_args_parser().parse_args(["--no-channels-last"])
    assert grid.device_flags(no_cl) == ["--gpu", "-1"]


def test_dispatch_lines_drop_selection_and_packing_flags():
    line = grid.dispatch_command(["python", "-m", "m"], ["--jobs", "2", "--epochs", "3",
                                                         "--print-commands", "--cells", "a/b",
                                                         "c/d", "--jobs=4", "--seeds", "1"])
    assert line == ["python", "-m", "m", "--epochs", "3", "--seeds", "1"]
    with pytest.raises(grid.StudyError, match="not cells of this study: x/y"):
        grid.select([grid.Cell("a/b", (), 1)], ["x/y"])


def test_the_slurm_array_script_runs_its_line_of_the_cell_list(tmp_path):
    cells = tmp_path / "cells.txt"
    cells.write_text("echo one > first.txt\necho 'two words' > second.txt\n")
    script = REPO / "scripts" / "slurm_study.sh"
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_ARRAY_TASK_ID": "2"}
    subprocess.run(["bash", str(script), str(cells)], env=env, check=True)
    assert (tmp_path / "second.txt").read_text() == "two words\n"
    assert not (tmp_path / "first.txt").exists()
    missing = subprocess.run(["bash", str(script), str(cells)], capture_output=True, text=True,
                             env={**env, "SLURM_ARRAY_TASK_ID": "3"})
    assert missing.returncode == 2 and "has no line 3" in missing.stderr
