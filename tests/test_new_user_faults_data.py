"""What a new user broke in the data paths (issue 23), each through the entry point a user runs:
symbolic-link loops and other links in image trees, names that are not UTF-8, hidden folders,
16-bit PNGs, single-class data, a wrong image size with --loader device, a corrupt CIFAR archive
and an eval resize below the crop."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from Cifar.data_loader import CifarData
from Cifar.main import main as cifar_main
from Cifar.utils import NORMALIZATION, get_args_parser as cifar_parser
from ImageNet import folder2lmdb
from ImageNet.data_loader import IMAGENET_MEAN, IMAGENET_STD, LMDBImageFolder, val_transform
from ImageNet.main import ImageNetData, main as imagenet_main
from ImageNet.utils import get_args_parser as imagenet_parser
from tests.helpers import error_line, stderr_lines
from tests.recipes import TINY
from training.image_tree import list_image_tree

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET = ["-a", "resnet18_cbn", "--width", "0.25", "--weight", "mean", "--image-size", "32",
            "-b", "2", "--gpu", "-1", "--no-progress", "--epochs", "1", "--max-steps", "1",
            "-j", "0"]


def _image(path: Path, value: int, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)
    return path


def _plain_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2
                ) -> Path:
    for k, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"{i}.png", 60 * k + 10 * i)
    return root


# --- serious 1: links in an image tree ---------------------------------------------------------

def _tree_with_links(root: Path, outside: Path) -> list[tuple[str, int]]:
    """train/cat and train/dog, 2 images each, plus every kind of link and a hidden folder; returns
    the (path, label) samples a safe walk lists."""
    _plain_tree(root)
    _image(outside / "x.png", 200)
    (outside / "back").symlink_to(root)  # from outside back to the root
    (outside / "again").symlink_to(outside)  # a loop outside the tree
    _image(root / ".cache" / "thumb.png", 1)
    _image(root / "cat" / "._0.png", 2)  # a macOS resource fork
    for link, target in [("cat/up", ".."), ("cat/self", "."), ("cat/dogs", "../dog"),
                         ("kitty", "cat"), ("cat/gone.png", "missing.png"), ("cat/l1", "l2"),
                         ("cat/l2", "l1"), ("dog/outside", str(outside)),
                         ("dog/outside-again", str(outside)),
                         ("dog/linked.png", str(outside / "x.png"))]:
        (root / link).symlink_to(target)
    return [(str(root / p), label) for p, label in [
        ("cat/0.png", 0), ("cat/1.png", 0), ("dog/0.png", 1), ("dog/1.png", 1),
        ("dog/linked.png", 1), ("dog/outside/x.png", 1)]]


def _expected_note(root: Path) -> str:
    return (f"note: {root}: skipped hidden names (starting with '.'): 2 (e.g. {root}/.cache); "
            f"links back into the tree: 5 (e.g. {root}/kitty); broken links (dangling or "
            f"looping): 3 (e.g. {root}/cat/gone.png); folders reached a second time through "
            f"links: 2 (e.g. {root}/dog/outside-again)")


def test_links_in_a_tree_count_each_image_once_with_its_own_label(tmp_path, capsys):
    """Loops (to the root, the folder itself, between two links), a link to a sibling class, a
    class folder linking into the tree, dangling links, and links out of the tree (followed once),
    through every entry point that walks a tree."""
    data = tmp_path / "data"
    expected = _tree_with_links(data / "train", tmp_path / "outside")
    _plain_tree(data / "test")
    listing = list_image_tree(data / "train")
    assert (listing.classes, listing.samples) == (["cat", "dog"], expected)
    note = _expected_note(data / "train")
    assert listing.note() == note

    for loader in ("pil", "device"):
        args = cifar_parser().parse_args([*TINY, "-ds", "folder", "--data-dir", str(data),
                                          "--loader", loader, "-j", "0"])
        train, classes = CifarData().load(args, train=True)
        assert stderr_lines(capsys) == [note] and classes == ["cat", "dog"]
        if loader == "pil":
            assert train.samples == expected
        else:  # each decoded image is the file of its sample, with that sample's label
            assert train.labels.tolist() == [label for _, label in expected]
            red = [int(np.asarray(Image.open(path))[0, 0, 0]) for path, _ in expected]
            assert train.images[:, 0, 0, 0].tolist() == red

    argv = [*TINY, "-ds", "folder", "--data-dir", str(data), "-j", "0", "--epochs", "1",
            "--max-steps", "1", "-b", "2", "--out-dir", str(tmp_path / "runs")]
    assert cifar_main(argv) == 0
    assert "folder 6 train / " in capsys.readouterr().out

    (data / "val").symlink_to(data / "test")
    assert imagenet_main([*IMAGENET, "-ds", "folder", "--data-dir", str(data), "--out-dir",
                          str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert "folder 6 train / " in out and note in err.splitlines()

    dst = tmp_path / "train.lmdb"
    assert folder2lmdb.main(["--src", str(data / "train"), "--dst", str(dst), "--quiet"]) == 0
    assert stderr_lines(capsys) == [note]
    db = LMDBImageFolder(dst)
    assert db.classes == ["cat", "dog"] and list(db.targets) == [label for _, label in expected]


def test_folder2lmdb_on_a_self_link_ends_and_packs_each_image_once(tmp_path, capsys):
    """The reported cases, `ln -s . self` (61 -> 1261 images) and `ln -s .. up`."""
    src = _plain_tree(tmp_path / "src", per_class=3)
    (src / "cat" / "self").symlink_to(".")
    (src / "dog" / "up").symlink_to("..")
    dst = tmp_path / "train.lmdb"
    assert folder2lmdb.main(["--src", str(src), "--dst", str(dst), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{dst}: 6 images, 2 classes\n"
    assert err == f"note: {src}: skipped links back into the tree: 2 (e.g. {src}/cat/self)\n"


# --- serious 9: names that are not UTF-8 --------------------------------------------------------

def test_names_that_are_not_utf8_convert_and_read_back_as_the_folder_gives_them(tmp_path, capsys):
    src = os.fsencode(tmp_path / "src")
    for name in (b"caf\xe9", b"dog"):
        for file in (b"0.png", b"\xff.png"):
            path = os.path.join(src, name, file)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.new("RGB", (8, 8), (len(name), file[0], 0)).save(os.fsdecode(path))
    dst = tmp_path / "train.lmdb"
    argv = ["--src", os.fsdecode(src), "--dst", str(dst), "--quiet"]
    assert folder2lmdb.main(argv) == 0
    db = LMDBImageFolder(dst)
    assert [os.fsencode(c) for c in db.classes] == [b"caf\xe9", b"dog"]
    (tmp_path / "train").symlink_to(tmp_path / "src")
    args = cifar_parser().parse_args([*TINY, "-ds", "folder", "--data-dir", str(tmp_path),
                                      "-j", "0"])
    folder, classes = CifarData().load(args, train=True)
    assert classes == db.classes and list(db.targets) == folder.targets
    for i, (path, _) in enumerate(folder.samples):
        assert np.array_equal(np.asarray(db[i][0]), np.asarray(Image.open(path).convert("RGB")))
    capsys.readouterr()
    assert folder2lmdb.main(argv) == 0  # the same conversion: recognised, not "another list"
    assert "nothing to do" in capsys.readouterr().out


# --- minor items -------------------------------------------------------------------------------

def test_hidden_folders_are_not_classes(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "test"):
        _plain_tree(data / split)
        _image(data / split / ".cache" / "0.png", 3)
    args = cifar_parser().parse_args([*TINY, "-ds", "folder", "--data-dir", str(data), "-j", "0"])
    _, classes = CifarData().load(args, train=False)
    assert classes == ["cat", "dog"]
    assert stderr_lines(capsys) == [f"note: {data / 'test'}: skipped hidden names (starting with "
                                    f"'.'): 1 (e.g. {data / 'test' / '.cache'})"]
    assert folder2lmdb.main(["--src", str(data / "train"), "--dst", str(tmp_path / "t.lmdb"),
                             "--quiet"]) == 0
    assert LMDBImageFolder(tmp_path / "t.lmdb").classes == ["cat", "dog"]
    assert "skipped hidden names" in capsys.readouterr().err


def _sixteen_bit_tree(root: Path) -> Path:
    """cat/: a 16-bit greyscale PNG, rows 0, 65535, then 30000; dog/: a 16-bit PGM of 30000."""
    values = np.full((32, 32), 30000, dtype=np.uint16)
    values[0], values[1] = 0, 65535
    (root / "cat").mkdir(parents=True)
    Image.fromarray(values).save(root / "cat" / "a.png")
    (root / "dog").mkdir()
    pgm = np.full((32, 32), 30000, dtype=">u2").tobytes()
    (root / "dog" / "b.pgm").write_bytes(b"P5 32 32 65535\n" + pgm)
    assert Image.open(root / "cat" / "a.png").mode == "I;16"
    assert Image.open(root / "dog" / "b.pgm").mode == "I"
    return root


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    """30000 of 65535 is 117 of 255 (PIL's conversion made it 255: white), in every decoder."""
    data = tmp_path / "data"
    for split in ("train", "test", "val"):
        _sixteen_bit_tree(data / split)
    mid = 117 / 255
    args = cifar_parser().parse_args([*TINY, "-ds", "folder", "--data-dir", str(data), "-j", "0"])
    mean, std = (torch.tensor(v)[:, None, None] for v in NORMALIZATION["folder"])
    for loader in ("pil", "device"):
        args.loader = loader
        test_set, _ = CifarData().load(args, train=False)
        png, pgm = (test_set[i][0] * std + mean for i in (0, 1))
        assert torch.allclose(png[:, 0], torch.zeros(3, 32), atol=1e-6)
        assert torch.allclose(png[:, 1], torch.ones(3, 32), atol=1e-6)
        assert torch.allclose(png[:, 2:], torch.full((3, 30, 32), mid), atol=1e-6)
        assert torch.allclose(pgm, torch.full((3, 32, 32), mid), atol=1e-6)

    assert folder2lmdb.main(["--src", str(data / "val"), "--dst", str(data / "val.lmdb"),
                             "--quiet"]) == 0
    imagenet = imagenet_parser().parse_args([*IMAGENET, "--data-dir", str(data)])
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    for data_format in ("folder", "lmdb"):
        imagenet.dataset = data_format
        val, _ = ImageNetData().load(imagenet, train=False)
        image = val[1][0] * std + mean  # the uniform PGM: resize and crop keep its value
        assert torch.allclose(image, torch.full((3, 32, 32), mid), atol=1e-5), data_format


@pytest.mark.parametrize("entry", ["cifar folder", "imagenet lmdb"])
def test_single_class_data_is_refused(tmp_path, capsys, entry):
    data = tmp_path / "data"
    if entry == "cifar folder":
        for split in ("train", "test"):
            _plain_tree(data / split, ("cat",))
        argv = [*TINY, "-ds", "folder", "-j", "0"]
        main, dataset, split = cifar_main, "folder", "test"
    else:
        for split in ("train", "val"):
            src = _plain_tree(tmp_path / "src" / split, ("cat",))
            data.mkdir(exist_ok=True)
            assert folder2lmdb.main(["--src", str(src), "--dst", str(data / f"{split}.lmdb"),
                                     "--quiet"]) == 0
        argv = [*IMAGENET, "-ds", "lmdb"]
        main, dataset, split = imagenet_main, "lmdb", "val"
    capsys.readouterr()
    assert main([*argv, "--data-dir", str(data), "--out-dir", str(tmp_path / "runs")]) == 2
    assert error_line(capsys) == (f"error: -ds {dataset}: the {split} "
                                       "split has a single class (cat); a classifier needs at "
                                       "least 2")
    assert not (tmp_path / "runs").exists()


def test_device_loader_names_the_image_of_another_size(tmp_path, capsys):
    data = tmp_path / "data"
    _plain_tree(data / "train")
    _plain_tree(data / "test")
    odd = _image(data / "train" / "dog" / "wide.png", 9, size=(64, 48))
    argv = [*TINY, "-ds", "folder", "--data-dir", str(data), "--loader", "device", "-j", "0",
            "--out-dir", str(tmp_path / "runs")]
    assert cifar_main(argv) == 2
    assert error_line(capsys) == (f"error: --loader device needs 32x32 images, {odd} is "
                                       "64x48; use --loader pil")


@pytest.mark.parametrize("loader", ["pil", "device"])
def test_a_corrupt_cifar_archive_is_named_and_kept(tmp_path, capsys, loader):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really a tarball")
    argv = [*TINY, "-ds", "cifar10", "--data-dir", str(tmp_path), "--loader", loader, "-j", "0",
            "--out-dir", str(tmp_path / "runs")]
    assert cifar_main(argv) == 2
    assert error_line(capsys) == (f"error: {archive} is corrupt or incomplete (its MD5 "
                                       "checksum is not that of the cifar10 archive): copy it "
                                       "again, or delete it to download it")
    assert archive.read_bytes() == b"\x1f\x8b not really a tarball"
    assert not (tmp_path / "runs").exists()


def test_val_resize_below_the_crop_is_refused(tmp_path, capsys):
    flags = [*IMAGENET, "-ds", "synthetic", "--val-resize", "16", "--out-dir", str(tmp_path)]
    assert imagenet_main(flags) == 2
    assert error_line(capsys) == (
        "error: --val-resize 16 is smaller than --image-size 32: the centre crop would pad the "
        "validation images with black; give --val-resize 32 or more (default 37)")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="--val-resize 100 is smaller than --image-size 224"):
        val_transform(224, 100)
