"""What a new user broke in the Python API and the experiment tools (issue 23): `models.convert`
keeping the eval-mode map, dtype, device, frozen parameters, modes and reference fan-ins;
LastBN in any dtype; weight mean and frozen weights; clear messages for wrong arguments;
`experiments.summarize` on odd run folders and logs; the experiment scripts run as files;
`experiments.table1` on a bad `--source` or an unwritable `--out-dir`; a cell stopped by SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import models
from experiments import grid, summarize, table1
from models.mimicnorm import CIFAR_RULE, LastBN, centred_conv_weights
from tests.helpers import REPO, calibrated, stderr_lines
from tests.test_summarize import CURVES, HEADER, write_run

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnet(block: type, num_classes: int = 5) -> nn.Module:
    """A torchvision ResNet with one block per stage (projections in stages 2-4, and in stage 1
    for bottlenecks)."""
    torch.manual_seed(0)
    narrow = {"width_per_group": 16} if block is Bottleneck else {}
    return ResNet(block, [1, 1, 1, 1], num_classes=num_classes, **narrow)


# --- 7. convert(init=False) keeps the eval-mode map in both families --------------------------

@pytest.mark.parametrize("family", ["cifar", "imagenet"])
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_kept_weights_keep_every_batchnorm_shift(block: type, family: str) -> None:
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bn_net = calibrated(tiny_resnet(block).double(), x)  # random BN statistics, scales, shifts
    converted = models.convert(bn_net, 5, family=family, init=False).eval()
    expected = bn_net(x)
    error = (converted.body(x) - expected).norm() / expected.norm()
    assert error < 1e-10  # a dropped projection shift gave 10 (bottleneck, cifar family)
    projection = converted.body.layer2[0].downsample[0]
    assert projection.bias is not None  # where the shift went


# --- 8. LastBN and convert follow the model's dtype and device --------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_mimicnorm_net_runs_in_the_dtype_it_is_cast_to(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = models.create_model("resnet18_cbn", 10, "cifar", width=0.25).to(dtype)
    stats = net.last_bn.bn.running_mean.dtype
    assert stats == (torch.float64 if dtype == torch.float64 else torch.float32)
    logits = net.train()(torch.randn(8, 3, 16, 16).to(dtype))
    assert logits.dtype == stats and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.mean(0), torch.zeros(10, dtype=stats), rtol=0, atol=1e-3)
    assert torch.isfinite(net.eval()(torch.randn(2, 3, 16, 16).to(dtype))).all()
    assert net.last_bn.bn.running_mean.dtype == stats  # still after the statistics update


def devices() -> list[str]:
    return ["meta", "cuda" if torch.cuda.is_available() else pytest.param(
        "cuda", marks=pytest.mark.skip(reason="no CUDA device"))]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("init", [True, False])
def test_convert_builds_its_modules_on_the_models_device(device: str, init: bool) -> None:
    with torch.device(device):
        net = torchvision.models.resnet18(num_classes=5)
    converted = models.convert(net, 5, init=init)
    tensors = [*converted.parameters(), *converted.buffers()]
    assert {t.device.type for t in tensors} == {device}


@pytest.mark.parametrize("init", [True, False])
def test_convert_of_a_double_model_is_double(init: bool) -> None:
    converted = models.convert(tiny_resnet(BasicBlock).double(), 5, init=init)
    floats = {t.dtype for t in (*converted.parameters(), *converted.buffers())
              if t.is_floating_point()}
    assert floats == {torch.float64}
    assert converted.train()(torch.randn(4, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64


# --- convert keeps what it keeps: frozen parameters, reference fan-ins, modes ------------------

@pytest.mark.parametrize("init", [True, False])
def test_convert_keeps_frozen_parameters_frozen(init: bool) -> None:
    net = tiny_resnet(Bottleneck)
    for p in (*net.conv1.parameters(), *net.bn1.parameters(), *net.layer1.parameters()):
        p.requires_grad_(False)
    net.layer2[0].bn1.requires_grad_(False)  # frozen BN affines, trainable conv
    converted = models.convert(net, 5, init=init)
    trainable = {name.removeprefix("body."): p.requires_grad
                 for name, p in converted.named_parameters()}
    frozen = {name for name, value in trainable.items() if not value}
    assert frozen == {name for name in trainable if name.startswith(("conv1.", "layer1."))} | {
        "layer2.0.conv1.bias"}
    assert trainable["layer2.0.conv1.weight"] and trainable["fc.weight"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_convert_of_a_narrow_registry_net_centres_the_cbn_nets_convs(arch: str) -> None:
    converted = models.convert(models.create_model(arch, 10, "cifar", width=0.25), 10,
                               family="cifar")
    ours = models.create_model(f"{arch}_cbn", 10, "cifar", width=0.25)
    centred = [tuple(w.shape) for w in centred_conv_weights(converted, CIFAR_RULE)]
    assert centred == [tuple(w.shape) for w in centred_conv_weights(ours, CIFAR_RULE)]
    narrow_1x1 = [s for s in centred if s[1:] == (16, 1, 1)]  # fan-in 16: centred at full width
    assert narrow_1x1


@pytest.mark.parametrize("training", [True, False])
def test_convert_returns_the_models_mode_throughout(training: bool) -> None:
    converted = models.convert(tiny_resnet(BasicBlock).train(training), 5)
    assert {m.training for m in converted.modules()} == {training}


# --- weight mean leaves what the optimizer does not move --------------------------------------

def test_attach_weight_mean_leaves_frozen_weights_with_a_warning() -> None:
    torch.manual_seed(0)
    net = models.create_model("resnet18_cbn", 10, "cifar", width=0.25)
    net.stages[0].requires_grad_(False)
    frozen = [w for w in centred_conv_weights(net, CIFAR_RULE) if not w.requires_grad]
    before = [w.detach().clone() for w in frozen]
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(UserWarning, match=f"{len(frozen)} conv weight\\(s\\) selected by the rule "
                                         "are not in the optimizer"):
        models.attach_weight_mean(optimizer, net, CIFAR_RULE)
    assert len(frozen) == 4 and all(torch.equal(w, b) for w, b in zip(frozen, before))
    trained = [w for w in centred_conv_weights(net, CIFAR_RULE) if w.requires_grad]
    assert max(w.detach().flatten(1).mean(1).abs().max() for w in trained) < 1e-7


# --- wrong arguments say what is wrong ---------------------------------------------------------

@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """A BN network, a MimicNorm one and an optimizer of the first."""
    net = torchvision.models.resnet18(num_classes=10)
    cbn = models.create_model("resnet18_cbn", 10, "cifar", width=0.25)
    return net, cbn, torch.optim.SGD(net.parameters(), lr=0.1)


WRONG_CALLS = {
    "convert 0 classes": (lambda net, cbn, opt: models.convert(net, 0), ValueError,
                          "num_classes must be positive, got 0"),
    "convert wrong classes": (lambda net, cbn, opt: models.convert(net, 7), ValueError,
                              r"num_classes is 7 but the network computes 10 outputs "
                              r"\('fc', Linear\)"),
    "LastBN 0": (lambda net, cbn, opt: LastBN(0), ValueError,
                 "num_classes must be positive, got 0"),
    "create swapped": (lambda net, cbn, opt: models.create_model("resnet18_cbn", "cifar", 10),
                       TypeError, "num_classes must be an int, got str 'cifar'"),
    "create width": (lambda net, cbn, opt: models.create_model("resnet18_cbn", 10, "cifar", "1"),
                     TypeError, "width must be a number, got str '1'"),
    "create None": (lambda net, cbn, opt: models.create_model(None), TypeError,
                    "a model name must be a str, got NoneType None"),
    "parse None": (lambda net, cbn, opt: models.parse_name(None), TypeError,
                   "a model name must be a str, got NoneType None"),
    "convert swapped": (lambda net, cbn, opt: models.convert(10, net), TypeError,
                        r"convert\(model, num_classes\): the model must be an nn.Module, got "
                        "int 10"),
    "attach swapped": (lambda net, cbn, opt: models.attach_weight_mean(net, opt), TypeError,
                       "optimizer must be a torch.optim.Optimizer, got ResNet"),
    "rule as a name": (lambda net, cbn, opt: models.attach_weight_mean(opt, net, "cifar"),
                       TypeError, r"rule must be a CentringRule .* got str 'cifar': use "
                                  r"models.centring_rule\('cifar'\)"),
    "weight_mean_ rule": (lambda net, cbn, opt: models.weight_mean_(net, "imagenet"), TypeError,
                          r"use models.centring_rule\('imagenet'\)"),
    "convert DataParallel": (lambda net, cbn, opt: models.convert(nn.DataParallel(net), 10),
                             ValueError, "not its DataParallel wrapper: pass model.module"),
    "convert compiled": (lambda net, cbn, opt: models.convert(torch.compile(net), 10),
                         ValueError, "not its torch.compile wrapper: pass model._orig_mod"),
    "fold DataParallel": (lambda net, cbn, opt: models.fold(nn.DataParallel(cbn)), ValueError,
                          "fold takes the network, not its DataParallel wrapper"),
    "fold compiled": (lambda net, cbn, opt: models.fold(torch.compile(cbn)), ValueError,
                      "pass model._orig_mod"),
}


@pytest.mark.parametrize("case", list(WRONG_CALLS))
def test_a_wrong_argument_is_named(nets, case: str) -> None:
    call, error, message = WRONG_CALLS[case]
    with pytest.raises(error, match=message):
        call(*nets)


# --- 9 and the summarize minors -----------------------------------------------------------------

def _three_seeds(root: Path) -> Path:
    for seed, accs in enumerate(CURVES[("resnet18", "none")]):
        write_run(root, "resnet18", "none", seed, accs)
    return root


def test_a_run_folder_named_in_no_encoding_is_summarised(tmp_path: Path, capsys) -> None:
    root = _three_seeds(tmp_path / "runs")
    odd = os.fsdecode(b"r\xff")  # a byte that is not UTF-8: a surrogate escape in Python
    write_run(root, "resnet18", "none", 3, [20, 30, 40], name=odd, data_dir=f"/data/{odd}")
    assert summarize.main([str(root)]) == 0
    assert capsys.readouterr().err == ""
    runs = pd.read_parquet(root / "runs.parquet")
    assert "resnet18/r\\xff" in set(runs["run"])
    assert runs["setting"].str.contains('data_dir="r\\\\xff"', regex=False).any()
    assert 'data_dir="r\\\\xff"' in (root / "table.md").read_text()  # a JSON string


def test_a_nan_last_accuracy_is_a_diverged_run_outside_the_means(tmp_path: Path,
                                                                  capsys) -> None:
    root = _three_seeds(tmp_path / "runs")
    folder = write_run(root, "resnet18", "none", 7, [20, 30, 40])
    (folder / "log.csv").write_text((folder / "log.csv").read_text().replace(",40,", ",nan,"))
    assert summarize.main([str(root)]) == 0
    assert stderr_lines(capsys) == [
        "run resnet18/s7: its last test top-1 is NaN: listed as diverged, not in the means"]
    row = pd.read_csv(root / "summary.csv").iloc[0]
    assert (row["n"], row["last_mean"], row["best_mean"]) == (3, 31.0, 32.0)
    assert ("- resnet18/s7: 3 of 3 epochs, diverged (last test top-1 is NaN)"
            in (root / "table.md").read_text())


@pytest.mark.parametrize("row, why", [
    ("2,0.1,1.5,50,1.2,31,90,2.5,1000,110", "log.csv has epoch 2 more than once"),
    ("4,0.1,1.5,50,1.2,inf,90,2.5,1000,110", "log.csv has test_acc1 outside 0-100 (inf)"),
    ("4,0.1,1.5,50,1.2,30,-inf,2.5,1000,110", "log.csv has test_acc5 outside 0-100 (-inf)"),
    ("4,0.1,1.5,250,1.2,30,90,2.5,1000,110", "log.csv has train_acc1 outside 0-100 (250)"),
])
def test_a_log_with_repeated_epochs_or_impossible_accuracies_is_skipped(
        tmp_path: Path, row: str, why: str, capsys) -> None:
    root = _three_seeds(tmp_path / "runs")
    folder = write_run(root, "resnet18", "none", 7, [20, 30, 40])
    with (folder / "log.csv").open("a") as log:
        log.write(row + "\n")
    assert summarize.main([str(root)]) == 0
    assert stderr_lines(capsys) == [f"skipped {folder}: {why}"]
    assert pd.read_csv(root / "summary.csv")["n"].tolist() == [3]


def test_runs_dir_that_is_a_file_is_named_as_such(tmp_path: Path, capsys) -> None:
    runs_file = tmp_path / "runs.csv"
    runs_file.write_text(HEADER + "\n")
    assert summarize.main([str(runs_file)]) == 2
    assert stderr_lines(capsys) == [f"error: RUNS_DIR {runs_file} is a file: give the folder "
                                    "holding the run folders"]


def test_the_experiment_scripts_run_as_files_from_anywhere(tmp_path: Path) -> None:
    # lr_robustness.py and diagnostics.py begin as table1.py does; summarize.py did not
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "experiments" / f"{name}.py"),
                                     "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name in ("summarize", "table1")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith(f"usage: {name}.py "), out


# --- experiments.table1: bad --source, unwritable --out-dir, a cell stopped by SIGTERM ---------

STUDY = ["--archs", "squeezenet", "--variants", "bn", "--extra", "--seeds", "0", "--epochs",
         "1", "--batch", "8", "--jobs", "1"]


@pytest.mark.parametrize("source, why", [
    ("missing.tar.gz", "no such file or folder"),
    ("text.tar.gz", "not a readable .tar.gz (not a tar archive, compressed or not)"),
    ("empty-folder", "has no train/ folder"),
])
def test_a_bad_study_source_is_one_line(tmp_path: Path, source: str, why: str, capsys) -> None:
    (tmp_path / "text.tar.gz").write_text("not an archive\n")
    (tmp_path / "empty-folder").mkdir()
    code = table1.main([*STUDY, "--source", str(tmp_path / source),
                        "--out-dir", str(tmp_path / "study")])
    (line,) = stderr_lines(capsys)
    assert code == 2 and line.startswith("error: ") and why in line


def _read_only(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_unwritable_study_folder_is_one_line_exit_1(tmp_path: Path, where: str,
                                                       capsys) -> None:
    if where == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "study"
    else:
        out = _read_only(tmp_path) / "study"
    code = table1.main([*STUDY, "--data", "synthetic", "--out-dir", str(out)])
    (line,) = stderr_lines(capsys)
    assert code == 1 and line.startswith(f"error: cannot write the study folder {out}: ")


@pytest.mark.parametrize("ending", ["killed by SIGTERM", "saved and exited 143"])
def test_a_cell_stopped_by_sigterm_stops_the_study_with_143(tmp_path: Path, ending: str,
                                                            monkeypatch, capsys) -> None:
    # The cell alone gets the signal (a scheduler's kill, not the study's Ctrl-C: that one is
    # tests/test_study.py::test_sigterm_stops_the_study_with_143_and_the_same_command_continues).
    entry = tmp_path / "cell.py"
    entry.write_text("import os, signal, sys\n" + (
        "os.kill(os.getpid(), signal.SIGTERM)\n" if ending == "killed by SIGTERM"
        else "sys.exit(128 + signal.SIGTERM)\n"))
    monkeypatch.setattr(grid, "ENTRY", entry)
    cells = [grid.Cell("squeezenet/bn-s0", ("-a", "squeezenet"), 1)]
    study = grid.Study(cells, tmp_path / "runs", tmp_path / ".work", grid.Packing(1, 1))
    assert study.run() == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().out
    assert not (tmp_path / "runs" / cells[0].name / summarize.DIVERGED).exists()
    assert not grid.finished(tmp_path / "runs" / cells[0].name, 1)
