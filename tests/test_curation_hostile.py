"""Hostile photo folders and unlucky operators: links out of PHOTOS_DIR, names that are not UTF-8, a killed or
terminated build, two builds into one OUT_DIR (real photos, real face models)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dynamicid.curation.cli import main

BUILD = [sys.executable, "-m", "dynamicid.curation.cli", "build"]


def all_output_bytes(out: Path, *texts: str) -> bytes:
    """Every byte OUT_DIR holds (work folder included) and the command's output, for searching."""
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()) + "".join(texts).encode()


@pytest.fixture(scope="module")
def hostile_photos(identity_photos) -> Path:
    """rose_leslie's 2 real photos, plus links out of PHOTOS_DIR (to a folder, to a file, to the parent holding
    OUT_DIR) and 3 copies of a photo under names that are not UTF-8 or hold a control character."""
    photos = identity_photos("rose_leslie")
    outside = photos.parent / "outside-secret"
    (outside / "inner").mkdir(parents=True)
    shutil.copy(photos / "rose_leslie" / "img1.jpg", outside / "inner" / "outside-secret-photo.jpg")
    os.symlink(outside, photos / "rose_leslie" / "elsewhere")
    os.symlink(outside / "inner" / "outside-secret-photo.jpg", photos / "rose_leslie" / "linked.jpg")
    os.symlink("..", photos / "up")
    image = (photos / "rose_leslie" / "img2.jpg").read_bytes()
    root = os.fsencode(photos)
    for name in (b"rose_leslie/x_\xff\xfe.jpg", b"Jos\xe9/a.jpg", b"rose_leslie/new\nline.jpg"):
        os.makedirs(os.path.dirname(root + b"/" + name), exist_ok=True)
        with open(root + b"/" + name, "wb") as f:
            f.write(image)
    return photos


def test_links_out_of_photos_dir_are_rejected_unread(hostile_photos):
    out = hostile_photos.parent / "out"  # reachable through the link `up`
    runs = [CliRunner().invoke(main, ["build", str(hostile_photos), str(out), "--no-progress", "--json"])]
    runs.append(CliRunner().invoke(main, ["build", str(hostile_photos), str(out), "--no-progress", "--json"]))
    for result in runs:
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["scanned"] == 8 and summary["kept"] == 2  # the same count each run
        assert summary["rejected_by_reason"]["outside_photos_dir"] == 3
    rejects = {r["source_path"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    for link in ("rose_leslie/elsewhere", "rose_leslie/linked.jpg", "up"):
        assert rejects[link]["reason"] == "outside_photos_dir" and "--follow-links" in rejects[link]["detail"]
    # Nothing under the links' targets was named (or read: the photo there would be a duplicate_of reject).
    found = all_output_bytes(out, *(r.output for r in runs))
    assert b"outside-secret" not in found and str(hostile_photos.parent).encode() + b"/out/" not in found
    assert not [p for p in rejects if p.startswith("up/")]


def test_names_that_are_not_utf8_are_rejected_and_shown_escaped(hostile_photos, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(hostile_photos), str(out), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rejected_by_reason"]["bad_file_name"] == 3
    rejects = {r["source_path"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    escaped = ["rose_leslie/x_\\xff\\xfe.jpg", "Jos\\xe9/a.jpg", "rose_leslie/new\\nline.jpg"]
    assert all(rejects[name] == "bad_file_name" for name in escaped)
    report = (out / "report.html").read_text()
    assert "x_\\xff\\xfe.jpg" in report and "new\\nline.jpg" in report


def test_follow_links_reads_outside_targets_but_never_out_dir(hostile_photos):
    out = hostile_photos.parent / "out-followed"
    result = CliRunner().invoke(
        main, ["build", str(hostile_photos), str(out), "--no-progress", "--json", "--follow-links"]
    )
    assert result.exit_code == 0, result.output
    rejects = {r["source_path"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    # The outside photo was read: a copy of rose_leslie/img1.jpg, reached through two links (one copy is kept).
    copies = ["rose_leslie/img1.jpg", "rose_leslie/linked.jpg", "rose_leslie/elsewhere/inner/outside-secret-photo.jpg"]
    assert sorted(rejects[p]["reason"].split(":")[0] for p in copies if p in rejects) == ["duplicate_of"] * 2
    assert rejects["up/out-followed"] == {
        "source_path": "up/out-followed",
        "stage": "scan",
        "reason": "outside_photos_dir",
        "detail": "leads into OUT_DIR or the work folder: not read",
    }
    assert not [p for p in rejects if p.startswith("up/out-followed/")]


# ---- killed and terminated builds, two builds into one OUT_DIR ----


def _children(pid: int) -> dict[int, str]:
    """pid -> start time (clock ticks) of the processes whose parent is `pid` (start time: pids are reused)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found[int(entry.name)] = fields[19]
    return found


def _alive(processes: dict[int, str]) -> list[int]:
    alive = []
    for pid, started in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == started and fields[0] != "Z":
            alive.append(pid)
    return alive


def _start_with_workers(command: list[str]) -> tuple[subprocess.Popen, dict[int, str]]:
    """Start a `--workers 2` build; returns it and its worker processes once both run."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        workers = {
            pid: started
            for pid, started in _children(process.pid).items()
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        }
        if len(workers) == 2:
            return process, workers
        time.sleep(0.05)
    raise AssertionError(f"the build did not start 2 workers: {process.communicate()}")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_a_killed_or_terminated_build(signum, identity_photos, tmp_path):
    photos, out = identity_photos("obama", "rose_leslie"), tmp_path / "out"
    command = [*BUILD, str(photos), str(out), "--workers", "2", "--no-progress"]
    process, workers = _start_with_workers(command)
    try:
        deadline = time.monotonic() + 120  # the workers have loaded the face models, OUT_DIR is marked as ours
        while not (out / ".dynamicid-curate").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the build ended before it could be stopped"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers)
    finally:
        for pid in _alive(workers):  # orphans of a failed test: not left running
            os.kill(pid, signal.SIGKILL)
    if signum == signal.SIGTERM:
        assert process.returncode == 143
        assert stderr.splitlines() == [
            "terminated: finished work is kept in the work folder; rerun the same command to resume"
        ]
    else:
        assert process.returncode == -signal.SIGKILL
    # The rerun takes over the lock the ended build held, finishes, and clears the temporary files of writers
    # killed mid-write (named as `curation.tables` names them).
    stale = [out / ".work" / ".detect.parquet.99999.tmp", out / "data" / ".train-00000-of-00001.parquet.99998.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1")
    rerun = subprocess.run([*command[:-3], "--no-progress"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "summary.json").read_text())["kept"] > 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_second_build_into_one_out_dir_stops_at_once_naming_the_first(identity_photos, tmp_path):
    photos, out = identity_photos("obama", "rose_leslie"), tmp_path / "out"
    first = subprocess.Popen(
        [*BUILD, str(photos), str(out), "--no-progress", "--json"], stdout=subprocess.PIPE, text=True
    )
    lock = out / ".dynamicid.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = json.loads(lock.read_text())
    second = CliRunner().invoke(main, ["build", str(photos), str(out), "--no-progress", "--per-identity", "3"])
    assert first.poll() is None  # the second stopped while the first was still running
    assert second.exit_code == 2
    assert second.stderr.splitlines() == [
        f"error: OUT_DIR {out} is in use by another command (pid {first.pid} on {holder['host']}, started "
        f"{holder['started']}: {holder['command']}); wait for it to end, or stop it and rerun (a killed "
        "command's lock is taken over)"
    ]
    assert holder["pid"] == first.pid and holder["command"].startswith("cli.py build ")
    stdout, _ = first.communicate(timeout=300)
    assert first.returncode == 0
    summary = json.loads(stdout)
    assert summary["config"]["per_identity"] == 35 and summary["kept"] + summary["rejected"] == summary["scanned"]
    assert summary == json.loads((out / "summary.json").read_text())


def test_max_pixels_sets_the_largest_photo_decoded(identity_photos, tmp_path):
    """A 15000x15000 PNG (225 MP) declared in its header, over the default limit; its pixel data is absent, so
    once the limit allows it, decoding it fails instead: the limit is what refused it before."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    photos = identity_photos("rose_leslie")
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0))
    (photos / "rose_leslie" / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    details = []
    for extra in ([], ["--max-pixels", "300000000"]):
        result = CliRunner().invoke(main, ["build", str(photos), str(tmp_path / "out"), "--no-progress", *extra])
        assert result.exit_code == 0, result.output
        rejects = {r["source_path"]: r for r in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()}
        assert rejects["rose_leslie/huge.png"]["reason"] == "undecodable"
        details.append(rejects["rose_leslie/huge.png"]["detail"])
    assert "15000x15000 pixels is over the 200000000-pixel limit" in details[0]
    assert "pixel limit" not in details[1] and "bomb" not in details[1]
