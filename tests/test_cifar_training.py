"""In-process CIFAR training on generated data: every MimicNorm model, exact resume, --evaluate."""
import csv

import pytest
import torch

import models
import training
from Cifar.data_loader import CifarData
from Cifar.utils import get_args_parser
from tests.recipes import STABLE_LR

CBN_MODELS = [name for name in models.list_models("cifar") if name.endswith("_cbn")]


def _run(tmp_path, *flags: str) -> training.RunResult:
    args = get_args_parser().parse_args([
        "-ds", "synthetic", "--synthetic-size", "8", "2", "-b", "4", "-lr", str(STABLE_LR), "-j",
        "0", "--gpu", "-1", "--no-progress", "--out-dir", str(tmp_path), *flags])
    return training.run(args, CifarData())


def _log(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.numerics
@pytest.mark.parametrize("arch", CBN_MODELS)
def test_every_mimicnorm_model_trains_a_few_steps(tmp_path, arch):
    result = _run(tmp_path, "-a", arch, "--weight", "mean", "--epochs", "1", "--max-steps", "2")
    assert sorted(p.name for p in result.run_dir.iterdir()) == [
        ".lock", "args.json", "best.pt", "last.pt", "log.csv"]
    (row,) = _log(result.run_dir)
    assert row["epoch"] == "1" and all(v != "" for v in row.values())
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    for w in models.centred_conv_weights(result.model, models.CIFAR_RULE):
        assert w.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    ckpt = training.load_checkpoint(result.run_dir / "last.pt", {"arch": arch, "num_classes": 100})
    assert ckpt.epoch == 1 and ckpt.scheduler["last_epoch"] == 2


def test_amp_and_channels_last_on_cpu(tmp_path):
    result = _run(tmp_path, "-a", "squeezenet_cbn", "--epochs", "1", "--max-steps", "2", "--amp",
                  "--channels-last")
    losses = torch.tensor([result.metrics["train_loss"], result.metrics["test_loss"]])
    assert torch.isfinite(losses).all()
    assert result.model.last_bn.bn.running_var.dtype == torch.float32


@pytest.mark.numerics
@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = ["-a", "squeezenet_cbn", "--weight", "mean", "--synthetic-size", "12", "4",
              "--max-steps", "2", "--warm", "1", "--milestones", "2", "3"]
    straight = _run(tmp_path, *common, "--epochs", "4", "--run-name", "straight")
    first = _run(tmp_path, *common, "--epochs", "2", "--run-name", "split")
    resumed = _run(tmp_path, *common, "--epochs", "4", "--resume", str(first.run_dir / "last.pt"))

    assert resumed.run_dir == first.run_dir
    a = torch.load(straight.run_dir / "last.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["epoch"] == b["epoch"] == 4
    assert [r["epoch"] for r in _log(resumed.run_dir)] == ["1", "2", "3", "4"]
    assert [r["lr"] for r in _log(resumed.run_dir)] == [r["lr"] for r in _log(straight.run_dir)]

    evaluated = _run(tmp_path, "-a", "squeezenet_cbn", "--synthetic-size", "12", "4", "--evaluate",
                     "--resume", str(resumed.run_dir / "last.pt"))
    last = _log(resumed.run_dir)[-1]
    assert evaluated.metrics["acc1"] == pytest.approx(float(last["test_acc1"]), rel=1e-5)
    assert evaluated.metrics["loss"] == pytest.approx(float(last["test_loss"]), rel=1e-5)
