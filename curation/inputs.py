"""The checks of the user's folders that come before any work, and the error every curation entry point raises
for a bad input (exit code 2 on the command line). A light module: the command line runs these checks, and
catches the error, before it imports the pipeline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynamicid.locks import LOCK_NAME, hold_folder

MARKER = ".dynamicid-curate"  # written into OUT_DIR first: later runs may overwrite a folder that has it
TOOL = "dynamicid-curate"


class CurationError(Exception):
    """A problem with the inputs the user gave: one line naming the file, folder or flag and what to do."""


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR must be new, empty, or an earlier output of this tool; anything else is refused, never overwritten."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CurationError(f"OUT_DIR {out_dir} exists and is not a folder; choose another path")
    if (out_dir / MARKER).exists() or not any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        return
    raise CurationError(
        f"OUT_DIR {out_dir} already holds files that dynamicid-curate did not write; "
        "choose a new or empty folder (nothing was changed)"
    )


def mark_out_dir(out_dir: Path) -> None:
    """Create OUT_DIR (checked by `check_out_dir`) with the marker that lets later runs overwrite it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text(f"{TOOL} output folder; safe for dynamicid-curate to overwrite\n")


def check_folders(photos_dir: Path, out_dir: Path, work_dir: Path | None) -> tuple[Path, Path, Path]:
    """PHOTOS_DIR, OUT_DIR and the work folder (default OUT_DIR/.work) as absolute paths, once they pass the checks."""
    photos_dir, out_dir = Path(photos_dir).absolute(), Path(out_dir).absolute()
    if not photos_dir.is_dir():
        raise CurationError(f"PHOTOS_DIR {photos_dir} does not exist or is not a folder")
    work_root = Path(work_dir).absolute() if work_dir else out_dir / ".work"
    for name, folder in (("OUT_DIR", out_dir), ("--work-dir", work_root)):
        if folder == photos_dir or photos_dir in folder.parents:
            raise CurationError(
                f"{name} {folder} is inside PHOTOS_DIR {photos_dir}: its files would be scanned as photos"
            )
    check_out_dir(out_dir)
    return photos_dir, out_dir, work_root


@contextmanager
def writing(out_dir: Path) -> Iterator[None]:
    """Hold OUT_DIR for the block (`dynamicid.locks`: one writer at a time), after clearing the temporary files
    (`*.tmp`) that a killed run left in it: with the lock held, no other process is writing them."""
    with hold_folder(out_dir, f"OUT_DIR {out_dir}"):
        for folder, _, files in os.walk(out_dir):
            for name in files:
                if name.endswith(".tmp"):
                    Path(folder, name).unlink(missing_ok=True)
        yield
