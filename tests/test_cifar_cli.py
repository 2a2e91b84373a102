"""The command line's bad-input paths: one `error:` line on stderr, exit code 2, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from Cifar.main import main
from Cifar.utils import get_args_parser
from tests.helpers import checkpoint_dict, error_line

REPO = Path(__file__).resolve().parents[1]
QUICK = ["-a", "squeezenet_cbn", "-ds", "synthetic", "--synthetic-size", "4", "2", "-b", "2",
         "-j", "0", "--gpu", "-1", "--no-progress"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any download attempt fails at once, as on a machine without network."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def test_help_explains_every_flag():
    text = get_args_parser().format_help()
    for flag in ("--arch", "-b", "-lr", "-wd", "-ds", "--warm", "--resume", "--weight", "--epochs",
                 "--milestones", "--gamma", "--data-dir", "--out-dir", "--workers", "--seed",
                 "--gpu", "--amp", "--channels-last", "--compile", "--sync-lastbn", "--evaluate",
                 "--max-steps", "--no-progress", "--synthetic-size", "--run-name", "--momentum"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, message", [
    (["-a", "resnet19_cbn"], "invalid choice: 'resnet19_cbn'"),
    (["-a", "resnet18_cbn", "-b", "0"], "must be a positive integer, got 0"),
    (["-a", "resnet18_cbn", "-lr", "-0.1"], "must be a positive number"),
    (["-a", "resnet18_cbn", "--weight", "median"], "invalid choice: 'median'"),
])
def test_argparse_rejects_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_cifar_offline_says_where_to_put_it(capsys, tmp_path):
    code = main(["-a", "resnet18_cbn", "-ds", "cifar100", "--data-dir", str(tmp_path)])
    line = error_line(capsys)
    assert code == 2
    assert f"cifar100 is not in {tmp_path}" in line and "cifar-100-python.tar.gz" in line
    assert "-ds folder" in line and "-ds synthetic" in line  # what works offline
    quick_start = (REPO / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    assert "-ds synthetic" in quick_start and "-ds folder" in quick_start


def test_missing_image_folder(capsys, tmp_path):
    assert main(["-a", "resnet18_cbn", "-ds", "folder", "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'test'}/<class>/<image>" in error_line(capsys)


def _checkpoint(path: Path, arch: str) -> Path:
    torch.save(checkpoint_dict(arch=arch), path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nowhere.pt", "checkpoint not found"),
    (lambda d: (d / "bad.pt").write_bytes(b"\x00" * 64) and d / "bad.pt", "cannot read checkpoint"),
    (lambda d: _checkpoint(d / "vgg.pt", "vgg11_cbn"),
     "arch vgg11_cbn, this run has arch squeezenet_cbn"),
])
@pytest.mark.parametrize("evaluate", [False, True])
def test_bad_checkpoints(capsys, tmp_path, make, message, evaluate):
    argv = QUICK + ["--out-dir", str(tmp_path), "--resume", str(make(tmp_path))]
    assert main(argv + ["--evaluate"] * evaluate) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "squeezenet_cbn").exists()


def test_refuses_to_overwrite_a_run(capsys, tmp_path):
    run_dir = tmp_path / "squeezenet_cbn" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    assert main(QUICK + ["--out-dir", str(tmp_path), "--run-name", "mine"]) == 2
    assert "already holds a run" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda(capsys, tmp_path):
    assert main(QUICK[:-3] + ["--gpu", "0", "--out-dir", str(tmp_path)]) == 2
    assert "CUDA is not available" in error_line(capsys)


@pytest.mark.parametrize("cwd, script", [(REPO, "Cifar/main.py"), (REPO / "Cifar", "main.py")])
def test_script_runs_from_repo_root_and_from_cifar(tmp_path, cwd, script):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, script, *QUICK, "--resume", str(bad),
                           "--out-dir", str(tmp_path)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot read checkpoint {bad}: ")
