"""Image trees ``ROOT/<class>/.../<image>`` listed as torchvision's ImageFolder lists them (same
classes, labels, extensions and sample order), but walked safely, and the decoding every image path
shares.

The walk lists each file once and cannot loop: a symbolic link that resolves inside the tree (to a
sibling class, its own folder, the root) or to a folder that contains the tree is skipped, as is a
folder reached a second time through links, a broken link (dangling or a link loop) and a hidden
name (starting with "."). Links that lead out of the tree, to files or folders, are followed. What
was skipped is said in one note line on stderr: how many of each kind, with an example path.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

# PIL modes of 16-bit greyscale images (PNG, TIFF; "I" for 16-bit PGM): values 0..65535
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# Why an entry was left out, in the words of the note.
HIDDEN = "hidden names (starting with '.')"
INTO_TREE = "links back into the tree"
BROKEN = "broken links (dangling or looping)"
TWICE = "folders reached a second time through links"


@dataclass
class Skipped:
    """How many entries were left out for one reason, and the first of them."""

    count: int = 0
    example: str = ""


@dataclass
class TreeListing:
    """A tree's class names (label order), its ``(path, label)`` samples and what was skipped."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: dict[str, Skipped] = field(default_factory=dict)

    def note(self) -> str | None:
        """The one-line note on what the walk left out (None when nothing was)."""
        if not self.skipped:
            return None
        parts = [f"{why}: {s.count} (e.g. {s.example})" for why, s in self.skipped.items()]
        return f"note: {self.root}: skipped {'; '.join(parts)}"


class _Walk:
    """One walk of a tree: the folders seen so far and what was skipped."""

    def __init__(self, root: str) -> None:
        self.real_root = os.path.realpath(root)
        self.seen: set[tuple[int, int]] = set()
        self.skipped: dict[str, Skipped] = {}

    def skip(self, why: str, path: str) -> None:
        entry = self.skipped.setdefault(why, Skipped(example=path))
        entry.count += 1

    def entries(self, folder: str) -> tuple[list[str], list[str]]:
        """The folders and image files directly in `folder` that the walk keeps, sorted."""
        folders, files = [], []
        with os.scandir(folder) as it:
            for entry in sorted(it, key=lambda e: e.name):
                kind = self.kind(entry)
                if kind == "folder":
                    folders.append(entry.path)
                elif kind == "file":
                    files.append(entry.path)
        return folders, files

    def kind(self, entry: os.DirEntry) -> str | None:
        """What the walk does with `entry`: "folder" (descend), "file" (an image), None (leave
        it out)."""
        into_tree = False
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not os.path.exists(target):  # dangling, or a loop of links
                self.skip(BROKEN, entry.path)
                return None
            into_tree = _within(target, self.real_root) or _within(self.real_root, target)
        is_dir = entry.is_dir()
        wanted = is_dir or entry.name.lower().endswith(IMG_EXTENSIONS)
        if entry.name.startswith(".") or into_tree:
            if wanted:
                self.skip(HIDDEN if entry.name.startswith(".") else INTO_TREE, entry.path)
            return None
        if is_dir:
            return "folder" if self.first_visit(entry.path) else None
        return "file" if wanted and entry.is_file() else None

    def first_visit(self, folder: str) -> bool:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in self.seen:
            self.skip(TWICE, folder)
            return False
        self.seen.add((st.st_dev, st.st_ino))
        return True

    def images(self, folder: str) -> list[str]:
        """Every image under `folder`, in the order of torchvision's sorted os.walk."""
        found: list[tuple[str, str]] = []
        pending = [folder]
        while pending:
            current = pending.pop()
            folders, files = self.entries(current)
            found += [(current, os.path.basename(f)) for f in files]
            pending += folders
        return [os.path.join(d, name) for d, name in sorted(found)]


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def list_image_tree(root: str | os.PathLike) -> TreeListing:
    """Classes and samples of the tree at `root` (see the module docstring for what is skipped).

    Raises FileNotFoundError, with a one-line message naming `root`, for a tree without class
    folders or with a class folder without images; OSError when a folder cannot be read.
    """
    root = os.fspath(root)
    walk = _Walk(root)
    walk.first_visit(root)
    class_folders, _ = walk.entries(root)
    if not class_folders:
        raise FileNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    classes = [os.path.basename(f) for f in class_folders]
    samples: list[tuple[str, int]] = []
    empty = []
    for label, folder in enumerate(class_folders):
        images = walk.images(folder)
        samples += [(path, label) for path in images]
        if not images:
            empty.append(classes[label])
    if empty:
        raise FileNotFoundError(f"no images in the class folder(s) {', '.join(empty)} of {root} "
                                f"(image extensions: {' '.join(IMG_EXTENSIONS)})")
    return TreeListing(root, classes, samples, walk.skipped)


def data_note(message: str) -> None:
    """Print `message` on stderr, once per run: not in the other processes of a torchrun job."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        print(message, file=sys.stderr, flush=True)


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB; 16-bit greyscale is scaled from 0..65535 to 0..255 (PIL's own
    conversion clips it at 255, which turns almost every such image white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip((values + 128) // 257, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """The image file at `path` decoded to 8-bit RGB (`rgb_image`)."""
    with open(path, "rb") as f, Image.open(f) as image:
        return rgb_image(image)


class ImageTree(Dataset):
    """An image tree as a dataset with ImageFolder's attributes (``classes``, ``class_to_idx``,
    ``samples``, ``targets``), listed by `list_image_tree`, whose note it prints; images are read
    by `loader` (default `load_rgb`), then `transform`."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None,
                 loader: Callable[[str], Any] = load_rgb) -> None:
        listing = list_image_tree(root)
        self.root = Path(root)
        self.classes = listing.classes
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        self.samples = listing.samples
        self.targets = [label for _, label in self.samples]
        self.transform, self.loader = transform, loader
        note = listing.note()
        if note:
            data_note(note)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.root)!r}, {len(self)} images, "
                f"{len(self.classes)} classes)")
