"""The experiment's data subset and reduced-width architecture (no training here)."""
from __future__ import annotations

import torch

import models
from experiments import lr_robustness


def test_subset_tree_links_the_first_images_of_each_class(tmp_path) -> None:
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "src" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                (folder / f"{i:04d}.jpg").write_bytes(b"x")
    dest = lr_robustness.subset_tree(tmp_path / "src", tmp_path / "sub", {"train": 3, "test": 0})
    linked = sorted(p.name for p in (dest / "train" / "dog").iterdir())
    assert linked == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert len(list((dest / "test" / "cat").iterdir())) == 4
    source = tmp_path / "src" / "train" / "cat" / "0001.jpg"
    assert (dest / "train" / "cat" / "0001.jpg").resolve() == source.resolve()


def test_reduced_vgg_is_registered_with_divided_widths() -> None:
    name = lr_robustness.register_reduced_vgg("vgg11", 8)
    assert name == "vgg11_div8" and lr_robustness.register_reduced_vgg("vgg11", 8) == name
    net = models.create_model(name + "_cbn", num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert models.is_mimicnorm(net) and net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
