"""dynamicid.locks: one writer per folder, re-entrant within a process, taken over from a killed holder."""

import json
import os
import subprocess
import sys

import pytest

from dynamicid.locks import LOCK_NAME, FolderInUse, hold_folder


def test_nested_holds_in_one_process_and_any_spelling_of_the_folder(tmp_path):
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")
    with hold_folder(tmp_path / "out", "OUT_DIR out"):
        with hold_folder(tmp_path.parent / f"{tmp_path.name}-link" / "out", "OUT_DIR out"):
            assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
        (tmp_path / "out" / "written").touch()
        assert (tmp_path / "out" / LOCK_NAME).read_text()  # still held by the outer block
    assert (tmp_path / "out" / LOCK_NAME).read_text() == ""  # released; the folder stays, it holds a file


def test_a_folder_made_for_nothing_is_removed(tmp_path):
    with pytest.raises(ValueError), hold_folder(tmp_path / "out", "OUT_DIR out"):
        raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_another_process_is_refused_until_the_holder_is_killed(tmp_path):
    code = f"from dynamicid.locks import hold_folder\nwith hold_folder({str(tmp_path)!r}, 'x'):\n print(1, flush=True)\n input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "1\n"
        refused = rf"^OUT_DIR x is in use by another command \(pid {holder.pid} on "
        with pytest.raises(FolderInUse, match=refused), hold_folder(tmp_path, "OUT_DIR x"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with hold_folder(tmp_path, "OUT_DIR x"):  # the killed holder's lock: taken over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
