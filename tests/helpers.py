"""Helpers the test modules share: a tiny image tree, training-state and log comparisons."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ImageNet import folder2lmdb
from training.checkpoint import TrainingState

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 5
SIZE = 40


def make_image_folder(root: Path, seed: int = 0) -> Path:
    """CLASSES x PER_CLASS random-noise images, SIZE x SIZE; one PNG among the JPEGs."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(PER_CLASS):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            fmt = "png" if (label, k) == (1, 2) else "jpg"
            Image.fromarray(pixels).save(root / name / f"{k:03d}.{fmt}")
    return root


def make_lmdb_data_dir(tmp_path_factory) -> Path:
    """A --data-dir with train.lmdb and val.lmdb converted from two `make_image_folder` trees."""
    root = tmp_path_factory.mktemp("imagenet")
    for split, seed in (("train", 0), ("val", 1)):
        tree = make_image_folder(tmp_path_factory.mktemp(split) / split, seed=seed)
        assert folder2lmdb.main(["--src", str(tree), "--dst", str(root / f"{split}.lmdb"),
                                 "--quiet"]) == 0
    return root


def assert_same_training_state(path_a: Path, path_b: Path) -> None:
    """Two checkpoints hold the same position, weights, momentum, schedule and best top-1."""
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["best_acc1"] == b["best_acc1"]


def log_without_timings(run_dir: Path) -> list[list[str]]:
    """log.csv's cells without the columns that measure time or memory."""
    rows = [line.split(",") for line in (run_dir / "log.csv").read_text().splitlines()]
    timing = {rows[0].index(c) for c in ("epoch_seconds", "images_per_second", "peak_memory_mb")}
    return [[v for i, v in enumerate(row) if i not in timing] for row in rows]


def stderr_lines(capsys) -> list[str]:
    """What the code under test printed on stderr since the last read, line by line."""
    return capsys.readouterr().err.strip().splitlines()


def error_line(capsys, *expected: str) -> str:
    """The one line the code under test printed on stderr since the last read: an `error: ` line
    holding every text of `expected`."""
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` in eval mode with random BN affines and every BN's statistics those of batch `x`."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average: one batch sets the batch's statistics
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        model.train()(x)
    return model.eval()


def checkpoint_dict(**fields) -> dict:
    """A complete checkpoint of an untrained CIFAR resnet18_cbn on -ds synthetic, with `fields`
    changed: the file contents `TrainingState.to_dict` writes."""
    state = TrainingState(
        family="cifar", arch="resnet18_cbn", width=1.0, dataset="synthetic", num_classes=100,
        classes=[f"synthetic-{i}" for i in range(100)], epoch=0, step=0, steps_per_epoch=1,
        world_size=1, epoch_totals=[0.0] * 3, epoch_seconds=0.0, pending_eval=None, row=None,
        best_acc1=None, model={"w": torch.ones(2)}, optimizer={}, scheduler={}, scaler=None,
        rng=[], args={})
    return {**state.to_dict(), **fields}
