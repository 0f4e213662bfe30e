"""Curation at growing photo counts: wall and CPU time, images/s, peak RSS of the whole process tree, disk.

    .venv/bin/python benchmarks/curation_scale.py --copies 1,9 --engines local --workers 2 [--code NAME=PYTHONPATH]

Builds PHOTOS folders from the test identities (../shared/data/faces/identities, 249 photos): copy 0 is the
folders as they are, every further copy re-encodes each photo (so its bytes differ) into a new identity
folder `<identity>__cN`, tinted by up to 3 % per channel so that its pixels differ too. Then runs `dynamicid-curate build` once per (size, engine, code) in a fresh OUT_DIR,
sampling the RSS of the driver and all its worker processes (psutil, every 0.2 s), and prints one line each:
the driver's own peak, the largest workers' own peaks, and the peak of their sum (which also grows with a run's
length for flat processes: more chances that they all peak at once). Then the peak-RSS slopes per photo
between the smallest and the largest size, of each of the three.
`--code NAME=PATH` (repeatable) runs the same build with PYTHONPATH=PATH, to compare two versions side by side
(runs are interleaved: size by size, code by code); without it the installed `dynamicid` runs.

`--fake-pack` runs the insightface backend on the tiny random ONNX models that tests/test_faces_insightface.py
generates (FAKE models, milliseconds per photo; about half the photos get fake faces): every other step
(decoding, crops, PNGs, tables, stores, shards, report) is real, so the memory and disk figures of the pipeline
are measured at sizes the real models would need hours for on a loaded machine. Its images/s mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from PIL import Image, PngImagePlugin

SAMPLE_SECONDS = 0.2


def make_photos(source: Path, target: Path, copies: int) -> int:
    """`copies` x the identity folders of `source` under `target` (re-encoded after the first); returns files."""
    count = 0
    for copy in range(copies):
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            name = folder.name if copy == 0 else f"{folder.name}__c{copy}"
            (target / name).mkdir(parents=True, exist_ok=True)
            for photo in sorted(p for p in folder.iterdir() if p.is_file()):
                out = target / name / photo.name
                if not out.exists():
                    if copy == 0:
                        shutil.copyfile(photo, out)
                    else:
                        reencode(photo, out, copy)
                count += 1
    return count


def reencode(photo: Path, out: Path, copy: int) -> None:
    """Decode, tint by up to 3 % per channel (seeded by the copy number) and encode again, so every copy's bytes
    and pixels differ: equal crops would let Parquet's encoding and zstd store them once in a row group, which
    distinct photos never allow."""
    with Image.open(photo) as image:
        image.load()
        gains = 1.0 + np.random.default_rng(copy).uniform(-0.03, 0.03, 3)
        pixels = np.asarray(image).astype(np.float32)
        if pixels.ndim == 2:
            pixels *= gains[0]
        else:
            pixels[..., :3] *= gains[: min(3, pixels.shape[2])]
        tinted = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        if image.format == "JPEG":
            tinted.save(buffer, format="JPEG", quality=95, comment=f"copy {copy}", exif=image.info.get("exif", b""))
        else:
            info = PngImagePlugin.PngInfo()
            info.add_text("copy", str(copy))
            tinted.save(buffer, format="PNG", pnginfo=info)
    out.write_bytes(buffer.getvalue())


def sample_tree(process: psutil.Process, cpu: dict[int, float], peaks: dict[int, int]) -> int:
    """RSS of the process and all its descendants (workers, Ray's processes), summed; 0 once it is gone.

    Also records each process's CPU seconds so far in `cpu` and its own peak RSS in `peaks` (by pid): Ray's
    workers are not children this script waits for, so `getrusage(RUSAGE_CHILDREN)` would miss them, and a
    process's own peak, unlike the peak of the sum, does not grow with the number of samples."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def fake_pack(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_faces_insightface import make_fake_pack

    return make_fake_pack(folder)


def run_build(
    photos: Path, out: Path, engine: str, workers: int, pythonpath: str | None, pack: Path | None, per_identity: int
) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if pack is not None:
        env["DYNAMICID_INSIGHTFACE_ROOT"] = str(pack)
    command = [sys.executable, "-m", "dynamicid.curation.cli", "build", str(photos), str(out), "--face-backend"]
    command += ["insightface" if pack else "embedded", "--workers", str(workers), "--no-progress", "--json"]
    command += ["--per-identity", str(per_identity)]
    if engine != "local":
        command += ["--engine", engine]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    peak, cpu_by_pid, peaks = 0, {}, {}
    driver_peak, driver_peak_at = 0, time.time()  # when the driver peaked: which stage holds its memory
    while process.poll() is None:
        peak = max(peak, sample_tree(watched, cpu_by_pid, peaks))
        if peaks.get(process.pid, 0) > driver_peak:
            driver_peak, driver_peak_at = peaks[process.pid], time.time()
        time.sleep(SAMPLE_SECONDS)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"build failed ({process.returncode}): {stderr.strip()[-2000:]}")
    at = 0 if stdout.startswith("{") else stdout.find("\n{") + 1  # Ray may print lines of its own around it
    try:
        summary = json.JSONDecoder().raw_decode(stdout[at:])[0]
    except json.JSONDecodeError:
        raise RuntimeError(f"build printed no JSON summary: {stdout[-1500:]!r} {stderr[-1500:]!r}") from None
    cpu = sum(cpu_by_pid.values())  # as last sampled (every 0.2 s): a process's final fraction is missed
    dataset = sum(
        folder_bytes(out / p.name) if p.is_dir() else p.stat().st_size for p in out.iterdir() if p.name != ".work"
    )
    return {
        "photos": summary["scanned"],
        "kept": summary["kept"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "images_per_s": round(summary["scanned"] / wall, 2),
        "peak_rss_mib": round(peak / 2**20, 1),
        "driver_peak_mib": round(peaks.get(process.pid, 0) / 2**20, 1),
        "worker_peaks_mib": sorted(
            (round(v / 2**20, 1) for pid, v in peaks.items() if pid != process.pid), reverse=True
        )[:4],
        "driver_peak_in": step_at(out / ".work", driver_peak_at),
        "work_mib": round(folder_bytes(out / ".work") / 2**20, 1),
        "dataset_mib": round(dataset / 2**20, 1),
        "dataset_png_mib": round(png_bytes(out) / 2**20, 1),
    }


def step_at(work: Path, moment: float) -> str:
    """The stage that was running at `moment`: the first whose table was written after it (else `write`)."""
    finished = sorted((p.stat().st_mtime, p.stem) for p in work.glob("*.parquet"))
    return next((name for when, name in finished if when >= moment), "write")


def png_bytes(out: Path) -> int:
    """The crops' PNG bytes in the dataset shards before Parquet's encoding and compression (from the footers):
    with the dataset's bytes, says how much Parquet saved on crops that repeat (copies with equal pixels)."""
    total = 0
    for shard in (out / "data").glob("*.parquet"):
        meta = pq.read_metadata(shard)
        for group in range(meta.num_row_groups):
            for column in range(meta.num_columns):
                chunk = meta.row_group(group).column(column)
                if chunk.path_in_schema == "image.bytes":
                    total += chunk.total_uncompressed_size
    return total


def slope(small: dict, large: dict, pick) -> float:
    """KiB of peak RSS per extra photo between two runs."""
    return (pick(large) - pick(small)) * 1024 / (large["photos"] - small["photos"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/faces/identities"
    )
    parser.add_argument("--copies", default="1,9", help="comma-separated copies of the identity folders per size")
    parser.add_argument("--engines", default="local", help="comma-separated: local,ray")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--code", action="append", default=[], metavar="NAME=PYTHONPATH")
    parser.add_argument("--tmp", type=Path, default=None, help="where the photo folders and outputs go")
    parser.add_argument("--fake-pack", action="store_true", help="FAKE tiny insightface models (see above)")
    parser.add_argument(
        "--per-identity", type=int, default=35, help="build's --per-identity (smaller: more faces cut by select)"
    )
    args = parser.parse_args()
    codes = [tuple(c.split("=", 1)) for c in args.code] or [("installed", None)]
    root = Path(tempfile.mkdtemp(prefix="curation-scale-", dir=args.tmp))
    pack = fake_pack(root / "fake_pack") if args.fake_pack else None
    results = []
    try:
        for copies in (int(c) for c in args.copies.split(",")):
            photos = root / f"photos_{copies}"
            make_photos(args.photos, photos, copies)
            for engine in args.engines.split(","):
                for name, pythonpath in codes:
                    out = root / f"out_{copies}_{engine}_{name}"
                    figures = run_build(photos, out, engine, args.workers, pythonpath, pack, args.per_identity)
                    backend = "FAKE-insightface" if pack else "embedded"
                    line = {"code": name, "engine": engine, "workers": args.workers, "backend": backend}
                    line = {**line, "per_identity": args.per_identity, **figures}
                    print(json.dumps(line), flush=True)
                    results.append(line)
                    shutil.rmtree(out)
        for engine in args.engines.split(","):
            for name, _ in codes:
                runs = sorted(
                    (r for r in results if r["engine"] == engine and r["code"] == name), key=lambda r: r["photos"]
                )
                if len(runs) >= 2:
                    small, large = runs[0], runs[-1]
                    ratio = large["work_mib"] / max(large["dataset_mib"], 1e-9)
                    slopes = ", ".join(
                        f"{label} {slope(small, large, pick):.1f}"
                        for label, pick in (
                            ("driver peak", lambda r: r["driver_peak_mib"]),
                            ("largest worker peak", lambda r: max(r["worker_peaks_mib"], default=0.0)),
                            ("peak of the sum", lambda r: r["peak_rss_mib"]),
                        )
                    )
                    print(
                        f"{name}/{engine}: peak-RSS slope (KiB/photo) between {small['photos']} and "
                        f"{large['photos']} photos: {slopes}; work/dataset bytes {ratio:.2f} at {large['photos']}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
