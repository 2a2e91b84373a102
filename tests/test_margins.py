"""The shared tiny recipes stay far from the edge of divergence (see tests/recipes.py): if a
change to the models or the engine moves the edge, these fail on every machine, before the tests
that rely on the recipes start failing on some CPUs only."""
from __future__ import annotations

import pytest

from Cifar.main import main
from tests.recipes import MARGIN_LRS, STABLE_LR, TINY

pytestmark = pytest.mark.numerics


def _train(tmp_path, *flags: str) -> int:
    return main([*TINY, "-j", "0", "--epochs", "3", "--out-dir", str(tmp_path), *flags])


def test_mimicnorm_tiny_recipe_trains_ten_times_above_its_lr(tmp_path, capsys):
    lr = MARGIN_LRS["cbn_finite"]
    assert lr >= 10 * STABLE_LR
    assert _train(tmp_path, "-lr", str(lr)) == 0, capsys.readouterr().err


def test_unnormalised_tiny_recipe_diverges_five_times_below_the_hot_lr(tmp_path, capsys):
    assert _train(tmp_path, "-a", "squeezenet_nobn", "--weight", "none",
                  "-lr", str(MARGIN_LRS["nobn_diverges"])) == 3
    assert "training diverged" in capsys.readouterr().err
