"""Stage `scan`: list every file under PHOTOS_DIR, hash its bytes, and account for the ones that cannot be read.

Every file found is one row of the scan table; the later stages only ever remove rows from the set of
candidates by writing a reject, so `kept + rejected == scanned` holds by construction.

The scan never leaves PHOTOS_DIR: a symbolic link (to a file or a folder) whose target lies outside it is an
`outside_photos_dir` reject and is not read (`follow_links` allows such targets), and nothing inside OUT_DIR or
the work folder is read either way. A name that is not UTF-8 (or holds control characters) is a
`bad_file_name` reject, shown with backslash escapes (`x_\\xff.jpg`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from dynamicid.curation.stages import ORDER
from dynamicid.curation.store import ResultStore
from dynamicid.schemas import RejectReason

SCAN_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),  # relative to PHOTOS_DIR, '/' separated
        ("identity", pa.string()),  # the top-level folder ("" in --cluster mode, decided by `identify`)
        ("sha256", pa.string()),  # null when the file could not be read
        ("size", pa.int64()),
        ("reason", pa.string()),  # null when the file can go on to `detect`
        ("detail", pa.string()),
    ]
)

# Store of file hashes keyed by path + size + mtime, so unchanged files are not read again on the next run.
HASH_STORE_SCHEMA = pa.schema([("key", pa.string()), ("sha256", pa.string())])
CHUNK = 4096  # files looked up and hashed at a time


@dataclass(frozen=True)
class ScannedFile:
    path: Path
    relative: str  # readable: escaped when the name is not (see `readable_name`)
    error: str | None  # why the file cannot be read (symlink loop, permission, a link out of PHOTOS_DIR, its name)
    reason: RejectReason = RejectReason.UNREADABLE  # the reject reason that goes with `error`


def shard_of(identity: str, shard_count: int) -> int:
    """Shards split the identities (a stable hash of the name), so each shard holds whole identities."""
    return int(hashlib.sha256(identity.encode()).hexdigest()[:8], 16) % shard_count


def readable_name(name: str) -> str:
    """A file name as text that any table, report or terminal shows: bytes that are not UTF-8 (decoded by Python
    as surrogates) and control characters as backslash escapes (`\\xff`, `\\n`); other names unchanged."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" else c for c in text)


def walk(photos_dir: Path, *, follow_links: bool = False, fenced: Iterable[Path] = ()) -> Iterator[ScannedFile]:
    """All files under `photos_dir` (following folder links once each); unlistable folders are reported.

    Links whose target is outside `photos_dir` are reported, not followed (followed with `follow_links`); nothing
    under a `fenced` folder (OUT_DIR, the work folder) is read, however it is reached. One folder's entries at a
    time: memory holds the folders being walked, not the files found.
    """
    root = Path(os.path.realpath(photos_dir))
    # A fenced folder that holds PHOTOS_DIR (the demo's OUT_DIR/.demo-photos) fences only its other contents.
    fenced = [f for f in map(Path, map(os.path.realpath, fenced)) if f != root and f not in root.parents]
    seen_dirs: set[tuple[int, int]] = set()

    def refused(path: Path) -> str | None:
        """Why the target of `path` (a link, or a folder reached through links) may not be read, or None."""
        target = Path(os.path.realpath(path))
        if any(target == f or f in target.parents for f in fenced):
            return "leads into OUT_DIR or the work folder: not read"
        if not follow_links and target != root and root not in target.parents:
            return "symbolic link to a target outside PHOTOS_DIR: not read (give --follow-links to include it)"
        return None

    def visit(folder: Path) -> Iterator[ScannedFile]:
        relative = _relative(folder, photos_dir)
        if why := refused(folder):  # OUT_DIR or the work folder, reached inside a followed link
            yield ScannedFile(folder, relative, why, RejectReason.OUTSIDE_PHOTOS_DIR)
            return
        try:
            st = folder.stat()
        except OSError as e:
            yield ScannedFile(folder, relative, _os_reason(e))
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return  # a folder link back to a folder already walked (a loop): its files are counted once
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield ScannedFile(folder, relative + "/", f"folder not listable: {_os_reason(e)}")
            return
        for entry in entries:
            path = Path(entry.path)
            relative = _relative(path, photos_dir)
            if entry.is_symlink() and (why := refused(path)):
                yield ScannedFile(path, relative, why, RejectReason.OUTSIDE_PHOTOS_DIR)
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError as e:
                yield ScannedFile(path, relative, _os_reason(e))
                continue
            if is_dir:
                yield from visit(path)
            elif relative != path.relative_to(photos_dir).as_posix():
                yield ScannedFile(path, relative, BAD_NAME, RejectReason.BAD_FILE_NAME)
            else:
                yield ScannedFile(path, relative, None)

    yield from visit(Path(photos_dir))


BAD_NAME = "the file name is not UTF-8 or holds control characters (shown escaped): rename it, e.g. with convmv"


def _relative(path: Path, root: Path) -> str:
    return readable_name(path.relative_to(root).as_posix()) if path != root else ""


def _os_reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT:
        return "broken symbolic link or file removed during the scan"
    if error.errno == errno.EISDIR:
        return "not a regular file (a pipe, socket or device): nothing to read"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (check the file's read permission)"
    return f"{error.strerror or type(error).__name__} (errno {error.errno})"


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def identity_of(relative: str, cluster: bool) -> str | None:
    """The identity folder of a file; None for a file at the top level in folder mode."""
    if cluster:
        return ""
    head, sep, _ = relative.partition("/")
    return head if sep else None


def _chunks(items: Iterator[ScannedFile], size: int) -> Iterator[list[ScannedFile]]:
    chunk: list[ScannedFile] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stat_row(item: ScannedFile, cluster: bool) -> dict:
    """The scan row of one file, before hashing: identity, size, and why it cannot go on (if it cannot)."""
    identity = identity_of(item.relative, cluster)
    row = {"source_path": item.relative, "identity": identity or "", "sha256": None, "size": 0, "stat_key": None}
    reason, detail = None, None
    if item.error is not None:
        reason, detail = item.reason.value, item.error
    else:
        try:
            st = item.path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file (a pipe, socket or device)")
            row["size"] = st.st_size
            row["stat_key"] = f"{item.relative}\x1f{st.st_size}\x1f{st.st_mtime_ns}"
        except OSError as e:
            reason, detail = RejectReason.UNREADABLE.value, _os_reason(e)
    row["reason"], row["detail"] = reason, detail
    return row


def scan(
    photos_dir: Path,
    *,
    cluster: bool,
    shard_index: int,
    shard_count: int,
    hash_store: ResultStore,
    follow_links: bool = False,
    fenced: Iterable[Path] = (),
) -> tuple[pa.Table, int]:
    """The scan table (one row per file of this shard, with its sha256 or a reject reason; sorted by identity,
    then path) and how many files were hashed (the others' hashes came from `hash_store`). `follow_links` and
    `fenced` (OUT_DIR, the work folder): see `walk`."""
    hashed = 0
    tables = []
    for chunk in _chunks(walk(photos_dir, follow_links=follow_links, fenced=fenced), CHUNK):
        rows = []
        for item in chunk:
            identity = identity_of(item.relative, cluster)
            # Files outside any identity folder are counted (rejected) once, by the shard of the name "".
            if shard_count > 1 and shard_of(identity or "", shard_count) != shard_index:
                continue
            rows.append(_stat_row(item, cluster))
        keyed = [r for r in rows if r["stat_key"] is not None]
        found, known = hash_store.get([r["stat_key"] for r in keyed])
        known_sha = dict(zip(known.column("key").to_pylist(), known.column("sha256").to_pylist(), strict=True))
        new = []
        for row, there in zip(keyed, found.tolist(), strict=True):
            if not there:
                try:
                    known_sha[row["stat_key"]] = hash_file(Path(photos_dir) / row["source_path"])
                except OSError as e:
                    row["reason"], row["detail"] = RejectReason.UNREADABLE.value, _os_reason(e)
                    continue
                new.append({"key": row["stat_key"], "sha256": known_sha[row["stat_key"]]})
            row["sha256"] = known_sha[row["stat_key"]]
        hashed += len(new)
        hash_store.put(pa.Table.from_pylist(new, schema=HASH_STORE_SCHEMA))
        for row in rows:
            if row["reason"] is None and row["size"] == 0:
                row["reason"], row["detail"] = RejectReason.UNDECODABLE.value, "0-byte file"
            if row["reason"] is None and identity_of(row["source_path"], cluster) is None:
                row["reason"] = RejectReason.NO_IDENTITY.value
                row["detail"] = "file is directly in PHOTOS_DIR: put it in PHOTOS_DIR/<identity>/ or use --cluster"
        tables.append(pa.Table.from_pylist(rows, schema=SCAN_SCHEMA))
    table = pa.concat_tables(tables) if tables else SCAN_SCHEMA.empty_table()
    return table.sort_by(ORDER), hashed
