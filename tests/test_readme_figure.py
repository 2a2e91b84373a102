"""scripts/readme_figure.py: the README's figure reads the committed results it says it reads."""
from __future__ import annotations

import shutil
import struct

import pandas as pd
import pytest

from scripts import readme_figure
from tests.helpers import REPO

TABLE1_RUNS = REPO / "results/table1/runs.parquet"
# written by the summarizer of the study's commit, which named the last epoch "final"
TABLE1_SUMMARY = REPO / "results/table1/summary.csv"
MEMORY = REPO / "results/memory/memory_cifar.csv"


def _copy_results(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)


def test_figure_data_are_the_committed_results(tmp_path):
    """The bars are the last-epoch means the study's own summary.csv holds, recomputed by the
    current summarizer from the committed runs.parquet."""
    _copy_results(tmp_path, "results/table1/runs.parquet", "results/memory/memory_cifar.csv")
    data = readme_figure.figure_data(tmp_path)
    summary = pd.read_csv(TABLE1_SUMMARY)
    expected = summary[summary["variant"].isin(["BN", "MimicNorm"])]
    assert data.accuracy_source == "results/table1/runs.parquet"
    drawn = {(a.arch, a.variant) for a in data.accuracy}
    assert drawn == set(zip(expected["arch"], expected["variant"]))
    assert len(data.accuracy) == 12  # six networks, BN and MimicNorm; NoNorm is not drawn
    for a in data.accuracy:
        row = expected[(expected["arch"] == a.arch) & (expected["variant"] == a.variant)].iloc[0]
        assert a.n == row["n"]
        assert (a.mean, a.std) == pytest.approx((row["final_mean"], row["final_std"]), abs=1e-9)
    resnet18_bn = next(a for a in data.accuracy if (a.arch, a.variant) == ("resnet18", "BN"))
    assert resnet18_bn.mean == pytest.approx(46.02, abs=0.01)
    memory = pd.read_csv(MEMORY)
    assert data.memory_ratio == dict(zip(memory["arch"], memory["saved_cbn/plain"]))
    assert data.memory_ratio["resnet18"] == pytest.approx(0.477, abs=1e-3)


def test_eight_epochs_are_labelled_early_training(tmp_path):
    _copy_results(tmp_path, "results/table1/runs.parquet", "results/memory/memory_cifar.csv")
    title = readme_figure.figure_data(tmp_path).accuracy_title
    assert title == ("CIFAR-10, 500 train images/class, width 0.25, 8 epochs: "
                     "early training, not convergence")


def test_a_converged_study_is_preferred(tmp_path):
    _copy_results(tmp_path, "results/table1/runs.parquet", "results/memory/memory_cifar.csv")
    converged = pd.read_parquet(TABLE1_RUNS)
    converged["setting"] = converged["setting"].str.replace("epochs=8", "epochs=60")
    converged["test_acc1"] += 10
    (tmp_path / "results/table1_converged").mkdir()
    converged.to_parquet(tmp_path / "results/table1_converged/runs.parquet")
    data = readme_figure.figure_data(tmp_path)
    assert data.accuracy_source == "results/table1_converged/runs.parquet"
    assert "60 epochs" in data.accuracy_title and "early training" not in data.accuracy_title
    resnet18_bn = next(a for a in data.accuracy if (a.arch, a.variant) == ("resnet18", "BN"))
    assert resnet18_bn.mean == pytest.approx(56.02, abs=0.01)


def test_runs_of_several_settings_are_refused(tmp_path):
    runs = pd.read_parquet(TABLE1_RUNS)
    first = runs["run"] == runs["run"].iloc[0]
    runs.loc[first, "setting"] = runs.loc[first, "setting"].str.replace("epochs=8", "epochs=9")
    runs.to_parquet(tmp_path / "runs.parquet")
    with pytest.raises(ValueError, match="expected one setting, found 2"):
        readme_figure.read_accuracy(tmp_path / "runs.parquet")


def test_the_committed_figure_is_the_scripts_png(tmp_path):
    """Same pixel size as a fresh drawing (the pixels themselves are not compared)."""
    readme_figure.plot(readme_figure.figure_data(REPO), tmp_path / "figure.png")

    def size(path):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        return struct.unpack(">II", header[16:24])

    assert size(REPO / "results/figure.png") == size(tmp_path / "figure.png") == (990, 342)
