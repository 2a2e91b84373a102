"""ImageFolder -> LMDB converter and the ImageNet datasets, on a tiny generated image tree."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from ImageNet import folder2lmdb
from ImageNet.data_loader import LMDBImageFolder, default_val_resize, load_split
from ImageNet.lmdb_format import LMDBFormatError, load_index, shared_env
from tests.helpers import CLASSES, PER_CLASS, make_image_folder

lmdb = pytest.importorskip("lmdb")  # skipped, not a collection error, without it

REPO = Path(__file__).resolve().parent.parent


def db_items(path: Path) -> dict[bytes, bytes]:
    with shared_env(path).begin() as txn:
        return dict(txn.cursor())


def pixel_key(image: Image.Image | torch.Tensor) -> str:
    tensor = image if isinstance(image, torch.Tensor) else pil_to_tensor(image.convert("RGB"))
    return hashlib.sha1(tensor.numpy().tobytes()).hexdigest()


def convert(src: Path, dst: Path, *extra: str) -> int:
    return folder2lmdb.main(["--src", str(src), "--dst", str(dst), "--quiet", *extra])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder") / "train")


@pytest.fixture(scope="module")
def db(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("lmdb") / "train.lmdb"
    assert convert(tree, dst, "--commit-every", "4") == 0
    return dst


def test_bytes_labels_and_classes_round_trip(tree: Path, db: Path) -> None:
    folder = ImageFolder(str(tree))
    items = db_items(db)
    for i, (path, label) in enumerate(folder.samples):
        assert items[b"%08d" % i] == Path(path).read_bytes()
    index = load_index(db)
    assert index.classes == folder.classes == list(CLASSES)
    assert index.labels.tolist() == folder.targets
    assert not Path(f"{db}-lock").exists() and not folder2lmdb.partial_path(db).exists()

    dataset = LMDBImageFolder(db)
    assert len(dataset) == len(folder) and dataset.class_to_idx == folder.class_to_idx
    for i in (0, 7, -1):
        image, label = dataset[i]
        expected_image, expected_label = folder[i]
        assert image.mode == "RGB" and label == expected_label
        assert pixel_key(image) == pixel_key(expected_image)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_resume_after_ctrl_c_gives_the_same_database(
    tree: Path,
    db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    dst = tmp_path / "train.lmdb"
    read, calls = folder2lmdb.read_image_file, []

    def interrupted_read(path: str) -> bytes:
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return read(path)

    monkeypatch.setattr(folder2lmdb, "read_image_file", interrupted_read)
    assert convert(tree, dst, "--commit-every", "4", "--workers", "1") == 130
    assert "resume" in capsys.readouterr().err
    partial = folder2lmdb.partial_path(dst)
    assert not dst.exists() and partial.exists()
    with pytest.raises(LMDBFormatError, match="incomplete database.*after 8 images.*folder2lmdb"):
        LMDBImageFolder(partial)

    resumed: list[str] = []
    monkeypatch.setattr(folder2lmdb, "read_image_file", lambda p: resumed.append(p) or read(p))
    assert convert(tree, dst, "--commit-every", "4") == 0
    assert len(resumed) == len(CLASSES) * PER_CLASS - 8  # only the images not committed before
    assert db_items(dst) == db_items(db)
    assert not partial.exists() and not Path(f"{partial}-lock").exists()


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_database(tree: Path, db: Path, tmp_path: Path) -> None:
    dst = tmp_path / "train.lmdb"
    killed_at_seventh_image = (
        "import os, signal, sys\n"
        "from ImageNet import folder2lmdb as f\n"
        "read, calls = f.read_image_file, []\n"
        "def read_then_die(path):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 7: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return read(path)\n"
        "f.read_image_file = read_then_die\n"
        "f.main(sys.argv[1:])\n"
    )
    args = ["--src", str(tree), "--dst", str(dst), "--commit-every", "2", "--workers", "1"]
    killed = subprocess.run([sys.executable, "-c", killed_at_seventh_image, *args], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL and not dst.exists()
    resumed = subprocess.run(
        [sys.executable, "ImageNet/folder2lmdb.py", *args], cwd=REPO, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert db_items(dst) == db_items(db)


def test_rerun_on_a_complete_database(tree: Path, db: Path, tmp_path: Path, capsys) -> None:
    before = db_items(db)
    assert convert(tree, db) == 0
    assert "nothing to do" in capsys.readouterr().out and db_items(db) == before
    other = make_image_folder(tmp_path / "other")
    (other / "ant" / "000.jpg").unlink()
    assert convert(other, db) == 2
    assert "already exists" in capsys.readouterr().err and db_items(db) == before


def test_two_workers_yield_every_sample_once_per_epoch(tree: Path, db: Path) -> None:
    dataset = LMDBImageFolder(db, transform=pil_to_tensor)
    dataset[0]  # open the database in the parent: forked workers must reopen it, not share it
    samples = ImageFolder(str(tree)).samples
    expected = Counter((pixel_key(Image.open(path)), label) for path, label in samples)
    assert len(expected) == len(dataset)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    for _ in range(2):
        seen = Counter()
        for images, labels in loader:
            seen.update((pixel_key(image), int(label)) for image, label in zip(images, labels))
        assert seen == expected

    clone = pickle.loads(pickle.dumps(dataset))  # what spawn / forkserver workers receive
    assert pixel_key(clone[3][0]) == pixel_key(dataset[3][0])

    ranks = [list(DistributedSampler(dataset, num_replicas=2, rank=r)) for r in (0, 1)]
    assert set(ranks[0]) | set(ranks[1]) == set(range(len(dataset)))


@pytest.mark.parametrize("data_format", ["lmdb", "folder"])
def test_load_split(tree: Path, db: Path, tmp_path: Path, data_format: str) -> None:
    (tmp_path / "train.lmdb").symlink_to(db)
    (tmp_path / "val.lmdb").symlink_to(db)
    (tmp_path / "train").symlink_to(tree, target_is_directory=True)
    (tmp_path / "val").symlink_to(tree, target_is_directory=True)
    train, val = (load_split(tmp_path, data_format, split, image_size=24) for split in (True, False))
    assert train.classes == val.classes == list(CLASSES)
    assert len(train) == len(val) == len(CLASSES) * PER_CLASS
    assert list(train.targets) == ImageFolder(str(tree)).targets
    (x, y), (v, _) = train[0], val[0]
    assert x.shape == v.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 0
    assert default_val_resize(224) == 256 and default_val_resize(24) == 27


def test_load_split_errors(tree: Path, db: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_split(tmp_path / "nope", "lmdb", True)
    with pytest.raises(FileNotFoundError, match="train.lmdb: no such LMDB database"):
        load_split(tmp_path, "lmdb", True)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ant").mkdir()
    with pytest.raises(FileNotFoundError, match="val"):
        load_split(tmp_path, "folder", False)


def _assert_clean_error(code: int, err: str, *expected: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err


def test_converter_errors_are_one_line_and_leave_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "train.lmdb"

    _assert_clean_error(convert(tmp_path / "missing", dst), capsys.readouterr().err, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_error(convert(empty, dst), capsys.readouterr().err, "no class folders")
    (empty / "ant").mkdir()
    _assert_clean_error(convert(empty, dst), capsys.readouterr().err, "ant")
    assert list(out.iterdir()) == []

    tree = make_image_folder(tmp_path / "broken")
    bad = tree / "cat" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: the last class, after several commits
    code = convert(tree, dst, "--commit-every", "2")
    _assert_clean_error(code, capsys.readouterr().err, "corrupt image", str(bad))
    assert list(out.iterdir()) == []


def test_script_errors_without_traceback(tmp_path: Path) -> None:
    args = ["--src", str(tmp_path / "x"), "--dst", str(tmp_path / "y")]
    result = subprocess.run(
        [sys.executable, "ImageNet/folder2lmdb.py", *args], cwd=REPO, capture_output=True, text=True
    )
    _assert_clean_error(result.returncode, result.stderr, "source folder not found")
    assert list(tmp_path.iterdir()) == []


def test_reader_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such LMDB database"):
        LMDBImageFolder(tmp_path / "missing.lmdb")
    garbage = tmp_path / "garbage.lmdb"
    garbage.write_bytes(os.urandom(20000))
    with pytest.raises(LMDBFormatError, match="not a readable LMDB database"):
        LMDBImageFolder(garbage)
    foreign = tmp_path / "foreign.lmdb"
    env = lmdb.open(str(foreign), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    with pytest.raises(LMDBFormatError, match="not a complete mimicnorm-lmdb database"):
        LMDBImageFolder(foreign)
