"""Stage `scan`: list every file under PHOTOS_DIR, hash its bytes, and account for the ones that cannot be read.

Every file found is one row of the scan table; the later stages only ever remove rows from the set of
candidates by writing a reject, so `kept + rejected == scanned` holds by construction.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from dynamicid.curation.tables import ResultCache
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

# Cache of file hashes keyed by path + size + mtime, so unchanged files are not read again on the next run.
HASH_CACHE_SCHEMA = pa.schema([("stat_key", pa.string()), ("sha256", pa.string())])


@dataclass(frozen=True)
class ScannedFile:
    path: Path
    relative: str
    error: str | None  # why the file cannot even be listed/stat'ed (symlink loop, permission)


def shard_of(identity: str, shard_count: int) -> int:
    """Shards split the identities (a stable hash of the name), so each shard holds whole identities."""
    return int(hashlib.sha256(identity.encode()).hexdigest()[:8], 16) % shard_count


def walk(photos_dir: Path) -> list[ScannedFile]:
    """All files under `photos_dir` (following folder links once each), sorted; unlistable folders are reported."""
    found: list[ScannedFile] = []
    seen_dirs: set[tuple[int, int]] = set()

    def visit(folder: Path) -> None:
        try:
            st = folder.stat()
        except OSError as e:
            found.append(ScannedFile(folder, _relative(folder, photos_dir), _os_reason(e)))
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return  # a folder link back to a folder already walked (a loop): its files are counted once
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            found.append(
                ScannedFile(folder, _relative(folder, photos_dir) + "/", f"folder not listable: {_os_reason(e)}")
            )
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError as e:
                found.append(ScannedFile(path, _relative(path, photos_dir), _os_reason(e)))
                continue
            if is_dir:
                visit(path)
            else:
                found.append(ScannedFile(path, _relative(path, photos_dir), None))

    visit(photos_dir)
    return sorted(found, key=lambda f: f.relative)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


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


def scan(
    photos_dir: Path, *, cluster: bool, shard_index: int, shard_count: int, hash_cache: ResultCache
) -> tuple[pa.Table, int]:
    """The scan table (one row per file of this shard, with its sha256 or a reject reason) and how many files were hashed."""
    known = {k: v["sha256"] for k, v in hash_cache.load().items()}
    hashed = 0
    rows = []
    for item in walk(photos_dir):
        identity = identity_of(item.relative, cluster)
        # Files outside any identity folder are counted (rejected) once, by the shard of the name "".
        if shard_count > 1 and shard_of(identity or "", shard_count) != shard_index:
            continue
        row = {"source_path": item.relative, "identity": identity or "", "sha256": None, "size": 0}
        reason, detail = None, None
        if item.error is not None:
            reason, detail = RejectReason.UNREADABLE.value, item.error
        else:
            try:
                st = item.path.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file (a pipe, socket or device)")
                row["size"] = st.st_size
                stat_key = f"{item.relative}\x1f{st.st_size}\x1f{st.st_mtime_ns}"
                if stat_key not in known:
                    known[stat_key] = hash_file(item.path)
                    hashed += 1
                    hash_cache.add({"stat_key": stat_key, "sha256": known[stat_key]})
                row["sha256"] = known[stat_key]
            except OSError as e:
                reason, detail = RejectReason.UNREADABLE.value, _os_reason(e)
        if reason is None and row["size"] == 0:
            reason, detail = RejectReason.UNDECODABLE.value, "0-byte file"
        if reason is None and identity is None:
            reason = RejectReason.NO_IDENTITY.value
            detail = "file is directly in PHOTOS_DIR: put it in PHOTOS_DIR/<identity>/ or use --cluster"
        row["reason"], row["detail"] = reason, detail
        rows.append(row)
    hash_cache.compact()
    return pa.Table.from_pylist(rows, schema=SCAN_SCHEMA), hashed
