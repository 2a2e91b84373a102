"""Convert an ImageFolder tree (``src/<class>/<image>``) into one LMDB file.

    python ImageNet/folder2lmdb.py --src /data/imagenet/train --dst /data/imagenet/train.lmdb

Images are stored byte for byte and labelled exactly as torchvision's ImageFolder labels them
(sorted class folders, same extensions); the format is described in `lmdb_format.py`. The output
is built in ``<dst>.partial``, committed every ``--commit-every`` images, verified, and only then
renamed to ``<dst>``: ``<dst>`` never exists half-written, and running the same command again after
an interruption (Ctrl-C, kill, crash) resumes where the last commit left off. Every image is
decoded once while it is copied (JPEGs at 1/8 scale, which is cheap) so that an unreadable or
truncated file stops the conversion with its name; the partial output is then deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as `python ImageNet/folder2lmdb.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from ImageNet.lmdb_format import (
    LABEL_DTYPE,
    LABELS_KEY,
    LMDB_ERRORS,
    MAX_RECORDS,
    META_KEY,
    PROGRESS_KEY,
    Index,
    LMDBFormatError,
    check_file_size,
    encode_index,
    load_index,
    read_index,
    lmdb,
    record_key,
    require_lmdb,
)
from training.cli import positive_int
from training.engine import progress_bar
from training.image_tree import list_image_tree

INITIAL_MAP_SIZE = 1 << 30  # doubled whenever it fills up


class ConversionError(RuntimeError):
    """A conversion that cannot go on; the message is one line meant for the user."""


def partial_path(dst: Path) -> Path:
    """Where the database is built before it is complete."""
    return dst.with_name(dst.name + ".partial")


def list_images(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(path, label)`` pairs in torchvision ImageFolder order, walked as
    `training.image_tree.list_image_tree` walks (no loops, no duplicates, no hidden names); what
    the walk skipped is said in one note line on stderr."""
    if not src.is_dir():
        raise ConversionError(f"source folder not found: {src}")
    try:
        listing = list_image_tree(src)
    except FileNotFoundError as exc:  # no class folders, or one without images
        raise ConversionError(str(exc)) from exc
    except OSError as exc:
        raise ConversionError(f"cannot read the tree {src}: {exc}") from exc
    note = listing.note()
    if note:
        print(note, file=sys.stderr, flush=True)
    return listing.classes, listing.samples


def fingerprint(src: Path, classes: list[str], samples: list[tuple[str, int]]) -> str:
    """SHA-256 of the classes and of every (label, size, relative path): names a conversion.

    Names are hashed as the file system's bytes (surrogateescape), so a name that is not UTF-8
    works too."""
    digest = hashlib.sha256(_fs_bytes(json.dumps(classes, ensure_ascii=False)))
    for path, label in samples:
        line = f"{label}\t{os.path.getsize(path)}\t{os.path.relpath(path, src)}\n"
        digest.update(_fs_bytes(line))
    return digest.hexdigest()


def _fs_bytes(text: str) -> bytes:
    """`text` as UTF-8, with the surrogates a non-UTF-8 file name decodes to as its own bytes."""
    return text.encode("utf-8", "surrogateescape")


def read_image_file(path: str) -> bytes:
    """The file's bytes, once they are known to decode (JPEGs decoded at 1/8 scale, for speed)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Image.UnidentifiedImageError as exc:
        raise ConversionError(f"corrupt image {path}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ConversionError(f"corrupt image {path}: {exc}") from exc
    return data


def convert(
    src: Path, dst: Path, commit_every: int = 1000, workers: int = 8, progress: bool = True
) -> Index:
    """Write the ImageFolder ``src`` into the LMDB ``dst``, resuming an interrupted run.

    Returns the index. A ``dst`` that already holds exactly this image list is left as it is.
    """
    src, dst = Path(src), Path(dst)
    classes, samples = list_images(src)
    if len(samples) >= MAX_RECORDS:
        raise ConversionError(f"{src}: {len(samples)} images, more than one database holds")
    labels = np.array([label for _, label in samples], dtype=LABEL_DTYPE)
    index = Index(classes, labels, str(src.resolve()), fingerprint(src, classes, samples))
    if dst.exists():
        return _check_existing(dst, index)
    if not dst.parent.is_dir():
        raise ConversionError(f"output folder not found: {dst.parent}")

    partial = partial_path(dst)
    env = _open_for_writing(partial)
    try:
        done = _resume_point(env, partial, index)
        try:
            paths = [path for path, _ in samples]
            _write_records(env, paths, done, index, commit_every, workers, progress)
            _verify_records(env, len(index), partial)
        except ConversionError:
            env.close()
            _remove_database(partial)
            raise
        _commit(env, encode_index(index), delete=(PROGRESS_KEY,))
    finally:
        env.close()
    os.replace(partial, dst)
    _remove_database(partial)  # only its lock file is left
    return index


def _check_existing(dst: Path, index: Index) -> Index:
    try:
        existing = load_index(dst)
    except (LMDBFormatError, OSError) as exc:
        raise ConversionError(f"{dst} exists and is not a complete database ({exc})") from exc
    if existing.source_sha256 != index.source_sha256:
        raise ConversionError(f"{dst} already exists with another image list; remove it first")
    return existing


def _open_for_writing(path: Path) -> lmdb.Environment:
    require_lmdb()
    try:
        env = lmdb.open(
            str(path), subdir=False, map_size=INITIAL_MAP_SIZE, readahead=False, meminit=False
        )
    except lmdb.Error as exc:
        raise ConversionError(f"{path}: cannot open for writing ({exc})") from exc
    try:
        check_file_size(env, path)  # a truncated partial file would end in SIGBUS
    except LMDBFormatError as exc:
        env.close()
        raise ConversionError(f"{exc}; delete it to start the conversion over") from None
    return env


def _resume_point(env: lmdb.Environment, path: Path, index: Index) -> int:
    """How many records an earlier run committed; refuses a file from another conversion."""
    with env.begin() as txn:
        progress = txn.get(PROGRESS_KEY)
        if progress is not None:
            state = json.loads(progress)
            sha, done = state["source_sha256"], state["done"]
        elif txn.get(META_KEY) is not None:  # stopped between the final commit and the rename
            sha, done = read_index(txn, path).source_sha256, len(index)
        elif env.stat()["entries"]:
            raise ConversionError(f"{path}: not a resumable conversion; delete it to start over")
        else:
            return 0
    if sha != index.source_sha256:
        raise ConversionError(f"{path} was begun from another image list; delete it to start over")
    return done


def _write_records(
    env: lmdb.Environment,
    paths: list[str],
    start: int,
    index: Index,
    commit_every: int,
    workers: int,
    progress: bool,
) -> None:
    """Copy ``paths[start:]`` in batches; each batch commits together with the new resume point."""
    pool = ThreadPoolExecutor(workers)
    bar = progress_bar(progress, total=len(paths), initial=start, unit="img")
    try:
        for first in range(start, len(paths), commit_every):
            blobs = list(pool.map(read_image_file, paths[first : first + commit_every]))
            items = {record_key(first + k): blob for k, blob in enumerate(blobs)}
            done = {"source_sha256": index.source_sha256, "done": first + len(blobs)}
            items[PROGRESS_KEY] = json.dumps(done).encode()
            _commit(env, items)
            bar.update(len(blobs))
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)


def _verify_records(env: lmdb.Environment, count: int, path: Path) -> None:
    """Check that the records are exactly ``0 .. count-1``."""
    found = 0
    with env.begin() as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            if key in (PROGRESS_KEY, META_KEY, LABELS_KEY):
                continue
            if key != record_key(found):
                raise ConversionError(f"{path}: unexpected record key {key!r} (corrupt output)")
            found += 1
    if found != count:
        raise ConversionError(f"{path}: {found} records written, {count} expected")


def _commit(
    env: lmdb.Environment, items: dict[bytes, bytes], delete: tuple[bytes, ...] = ()
) -> None:
    """Put ``items`` and delete ``delete`` in one transaction, growing the map when it is full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items.items():
                    txn.put(key, value)
                for key in delete:
                    txn.delete(key)
            return
        except lmdb.MapFullError:
            env.set_mapsize(2 * env.info()["map_size"])


def _remove_database(path: Path) -> None:
    for leftover in (path, Path(f"{path}-lock")):
        leftover.unlink(missing_ok=True)


def get_args_parser() -> argparse.ArgumentParser:
    """The converter's command line."""
    parser = argparse.ArgumentParser(description="Convert an ImageFolder tree into one LMDB file.")
    parser.add_argument(
        "--src", type=Path, required=True, help="ImageFolder root: SRC/<class>/<image>"
    )
    parser.add_argument("--dst", type=Path, required=True, help="output file, e.g. train.lmdb")
    parser.add_argument(
        "--commit-every", type=positive_int, default=1000, help="images per commit"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="reader threads"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter; errors are one line on stderr and exit code 2."""
    args = get_args_parser().parse_args(argv)
    existed = args.dst.exists()
    try:
        index = convert(
            args.src, args.dst, args.commit_every, args.workers, progress=not args.quiet
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: run the same command again to resume ({partial_path(args.dst)} is kept)",
            file=sys.stderr,
        )
        return 130
    except (ConversionError, LMDBFormatError, OSError, *LMDB_ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = " (already complete, nothing to do)" if existed else ""
    print(f"{args.dst}: {len(index)} images, {len(index.classes)} classes{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
