"""The image LMDB format shared by `folder2lmdb.py` (writer) and `data_loader.py` (reader).

One LMDB environment stored as a single file (``subdir=False``; a directory holding ``data.mdb``
is read as well) with these keys:

- ``b"00000000"``, ``b"00000001"``, ...: record *i* is the image file's bytes exactly as they were
  on disk (no re-encoding, no header); keys are the index zero-padded to 8 digits so that they sort
  in index order.
- ``b"__labels__"``: the label of every record, little-endian int32, in record order.
- ``b"__meta__"``: UTF-8 JSON ``{"format": "mimicnorm-lmdb", "version": 1, "count", "classes",
  "source", "source_sha256"}``; ``classes[label]`` is the class (folder) name. Written as ASCII
  with ``\\u`` escapes, so that a name that is not UTF-8 (its undecodable bytes are ``\\udcXX``
  surrogates in Python, as ``os.fsdecode`` gives them) is stored too and reads back the same.
- ``b"__progress__"``: present only while a conversion is unfinished: JSON
  ``{"source_sha256", "done"}``.

The index (meta and labels) is written in the last transaction, the one that deletes the progress
key, so a database without ``__meta__`` is incomplete. No pickle anywhere: JSON, int32 and raw bytes
can be read by any language for as long as LMDB exists.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import lmdb
except ModuleNotFoundError:  # only reading or writing a database needs it: `require_lmdb`
    lmdb = None

FORMAT = "mimicnorm-lmdb"
VERSION = 1
META_KEY = b"__meta__"
LABELS_KEY = b"__labels__"
PROGRESS_KEY = b"__progress__"
MAX_RECORDS = 10**8  # keys have 8 digits
LABEL_DTYPE = np.dtype("<i4")


class LMDBFormatError(ValueError):
    """A database that is unreadable, incomplete or not in this format."""


# py-lmdb's own errors, for `except` clauses (none without the package: nothing can raise them)
LMDB_ERRORS: tuple[type[Exception], ...] = (lmdb.Error,) if lmdb is not None else ()


def require_lmdb() -> None:
    """Raise LMDBFormatError (one line) when the lmdb package is not installed."""
    if lmdb is None:
        raise LMDBFormatError("the lmdb package is not installed (pip install lmdb); only LMDB "
                              "datasets and folder2lmdb.py need it")


@dataclass(frozen=True)
class Index:
    """What a reader needs without touching the records: class names and every label."""

    classes: list[str]
    labels: np.ndarray
    source: str
    source_sha256: str

    def __len__(self) -> int:
        return len(self.labels)


def record_key(i: int) -> bytes:
    """Key of record ``i``."""
    return b"%08d" % i


def encode_index(index: Index) -> dict[bytes, bytes]:
    """The ``{key: value}`` pairs that store ``index``."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": len(index),
        "classes": index.classes,
        "source": index.source,
        "source_sha256": index.source_sha256,
    }
    return {
        META_KEY: json.dumps(meta).encode(),  # ASCII: \u escapes, surrogates included
        LABELS_KEY: np.asarray(index.labels, dtype=LABEL_DTYPE).tobytes(),
    }


def read_index(txn: lmdb.Transaction, path: Path) -> Index:
    """Load and check the index; errors name ``path`` and say what to do, in one line."""
    raw = txn.get(META_KEY)
    if raw is None:
        progress = txn.get(PROGRESS_KEY)
        if progress is not None:
            done = json.loads(progress)["done"]
            raise LMDBFormatError(
                f"{path}: incomplete database (conversion stopped after {done} images); "
                "re-run folder2lmdb.py to finish it"
            )
        raise LMDBFormatError(
            f"{path}: no {META_KEY.decode()} key, so not a complete {FORMAT} database; "
            "re-run folder2lmdb.py"
        )
    try:
        meta = json.loads(raw)
        fmt, version = meta["format"], meta["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LMDBFormatError(f"{path}: unreadable {META_KEY.decode()} ({exc})") from exc
    if fmt != FORMAT or version != VERSION:
        raise LMDBFormatError(
            f"{path}: format {fmt!r} version {version}; this code reads {FORMAT!r} v{VERSION}"
        )
    labels = np.frombuffer(txn.get(LABELS_KEY) or b"", dtype=LABEL_DTYPE)
    classes = list(meta["classes"])
    in_range = len(labels) == 0 or (labels.min() >= 0 and labels.max() < len(classes))
    if len(labels) != meta["count"] or not in_range:
        raise LMDBFormatError(f"{path}: label index does not match the metadata (corrupt database)")
    return Index(classes, labels, meta["source"], meta["source_sha256"])


def open_readonly(path: Path) -> lmdb.Environment:
    """A new read-only handle without locks or read-ahead; most callers want `shared_env`."""
    require_lmdb()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LMDB database")
    try:
        env = lmdb.open(
            str(path),
            subdir=path.is_dir(),
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
        )
    except lmdb.Error as exc:
        raise LMDBFormatError(f"{path}: not a readable LMDB database ({exc})") from exc
    try:
        check_file_size(env, path)
    except LMDBFormatError as exc:
        env.close()
        raise LMDBFormatError(f"{exc}; copy it again or re-run folder2lmdb.py") from None
    return env


def check_file_size(env: lmdb.Environment, path: Path) -> None:
    """Refuse a database file shorter than its own header says (a truncated or half-copied file).

    LMDB maps the file into memory, so reading a page past the end of a truncated file kills the
    process with SIGBUS; the header's last page number times the page size is the size it needs.
    """
    data_file = path / "data.mdb" if path.is_dir() else path
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = os.path.getsize(data_file)
    if actual < needed:
        raise LMDBFormatError(
            f"{data_file}: truncated LMDB file ({actual} of the {needed} bytes its header "
            "requires)"
        )


# py-lmdb allows one handle per database file and process, and a handle must not be used across a
# fork. So every reader in a process shares one handle per file, and a forked child (a DataLoader
# worker) closes the handles it inherited before it opens its own.
_handles: dict[tuple[int, int], lmdb.Environment] = {}
_handles_pid = os.getpid()
_handles_lock = threading.Lock()


def shared_env(path: Path) -> lmdb.Environment:
    """This process's read-only handle on the database at ``path``, opened on first use."""
    global _handles_pid, _handles_lock
    if _handles_pid != os.getpid():
        for env in _handles.values():
            env.close()
        _handles.clear()
        _handles_pid, _handles_lock = os.getpid(), threading.Lock()
    path = Path(path)
    try:
        st = os.stat(path / "data.mdb" if path.is_dir() else path)
    except OSError:
        raise FileNotFoundError(f"{path}: no such LMDB database") from None
    key = (st.st_dev, st.st_ino)  # as py-lmdb does: a file re-created at the same path is new
    with _handles_lock:
        if key not in _handles:
            _handles[key] = open_readonly(path)
        return _handles[key]


def release_env(path: Path) -> None:
    """Close this process's shared handle on ``path``, if it has one."""
    path = Path(path)
    with _handles_lock:
        for key, env in list(_handles.items()):
            if Path(env.path()).resolve() == path.resolve():
                env.close()
                del _handles[key]


def load_index(path: Path) -> Index:
    """Read the index of the database at ``path``; a database that fails the checks is released."""
    try:
        with shared_env(path).begin() as txn:
            return read_index(txn, Path(path))
    except LMDBFormatError:
        release_env(path)
        raise
