"""End-to-end `dynamicid-curate build` of two checkouts (or worker counts) side by side: interleaved runs, CPU and wall.

    .venv/bin/python benchmarks/curation_compare.py --base "" --new ../pp-faces [--photos PHOTOS] [--repeats 2]
    .venv/bin/python benchmarks/curation_compare.py --base ../pp-x --new ../pp-x --new-workers 2
    .venv/bin/python benchmarks/curation_compare.py --base ../pp-0b1fd08 --new "" --new-args "--max-upscale 100"

`--base` and `--new` are PYTHONPATH values ("" is the installed package) so the same interpreter runs two versions
of the toolkit. Runs alternate base, new, base, new, ... each into a fresh output folder with `--no-resume` and
that side's `--workers`, pinned with `taskset` to as many cores as it has workers. Printed per run: user+sys CPU
seconds of the driver and of its worker processes, and wall seconds; then each side's median images per
CPU-second, per wall-second, and per "critical-path second" (driver CPU + worker CPU / workers: the wall time
on idle cores if the workers share the work evenly and the driver does not overlap them), and the ratios new /
base. On a shared machine the CPU figures are the fair ones: wall time also counts the other people's load.
`--same-dataset` then checks that the first run of each side wrote the same dataset: the same rows in every column,
crops with the same pixels (their PNG bytes may differ), the same rejects and identities.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "identities"

# Runs the CLI in the child and reports its own CPU time and that of its (waited-for) worker processes.
WRAPPER = """
import json, resource, sys
from dynamicid.curation.cli import main
def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
try:
    main(sys.argv[1:])
finally:
    print(json.dumps({"driver": cpu(resource.RUSAGE_SELF), "workers": cpu(resource.RUSAGE_CHILDREN)}), file=sys.stderr)
"""


@dataclass
class Timing:
    driver: float  # CPU seconds of the build's own process
    workers: float  # CPU seconds of its worker processes
    wall: float
    count: int  # --workers

    @property
    def cpu(self) -> float:
        return self.driver + self.workers

    @property
    def critical_path(self) -> float:
        return self.driver + self.workers / self.count if self.workers else self.driver


def run_build(pythonpath: str, photos: Path, out: Path, cores: list[int], workers: int, extra: list[str]) -> Timing:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-c", WRAPPER, "build", str(photos)]
    command += [str(out), "--workers", str(workers), "--no-resume", "--no-progress", "--json", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(
            f"benchmarks/curation_compare.py: build with PYTHONPATH={pythonpath!r} failed:\n{result.stderr[-2000:]}"
        )
    usage = json.loads(result.stderr.strip().splitlines()[-1])
    return Timing(usage["driver"], usage["workers"], wall, workers)


def same_dataset(base: Path, new: Path) -> str:
    """'' if the two OUT_DIRs hold the same dataset (crops compared by pixels), else what differs."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    a, b = pq.read_table(base / "data"), pq.read_table(new / "data")
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return f"rows or columns: {a.num_rows} rows vs {b.num_rows}"
    for name in (n for n in a.column_names if n != "image"):
        if not a.column(name).equals(b.column(name)):
            return f"column {name}"
    for x, y in zip(a.column("image").to_pylist(), b.column("image").to_pylist(), strict=True):
        pixels = (np.asarray(Image.open(io.BytesIO(image["bytes"]))) for image in (x, y))
        if x["path"] != y["path"] or not np.array_equal(*pixels):
            return f"crop of {x['path']}"
    for name in ("rejects.parquet", "identities.parquet"):
        if not pq.read_table(base / name).equals(pq.read_table(new / name)):
            return name
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="PYTHONPATH of the reference version ('' = installed)")
    parser.add_argument("--new", required=True, help="PYTHONPATH of the version to compare")
    parser.add_argument("--base-workers", type=int, default=1, help="--workers of the base runs")
    parser.add_argument("--new-workers", type=int, default=1, help="--workers of the new runs")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="PHOTOS_DIR of the build")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side")
    parser.add_argument("--args", default="", help="more build options for both sides, e.g. '--max-upscale 100'")
    parser.add_argument(
        "--new-args", default="", help="more build options for the new side only, e.g. a flag the base lacks"
    )
    parser.add_argument(
        "--same-dataset", action="store_true", help="check that both sides wrote the same dataset (first runs)"
    )
    args = parser.parse_args()
    if not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    available = sorted(os.sched_getaffinity(0))
    for flag, count in (("--base-workers", args.base_workers), ("--new-workers", args.new_workers)):
        if not 1 <= count <= len(available):
            parser.error(f"{flag} {count}: this machine lets the benchmark use 1 to {len(available)} cores")
    images = sum(1 for p in args.photos.rglob("*") if p.is_file())
    both = args.args.split()
    sides = {
        "base": (args.base, args.base_workers, both),
        "new": (args.new, args.new_workers, [*both, *args.new_args.split()]),
    }
    times: dict[str, list[Timing]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="curation-compare-") as work:
        for repeat in range(args.repeats):
            for side, (pythonpath, workers, extra) in sides.items():
                cores = available[-workers:]
                timing = run_build(pythonpath, args.photos, Path(work) / f"{side}-{repeat}", cores, workers, extra)
                times[side].append(timing)
                print(
                    f"{side} run {repeat + 1} (--workers {workers}): {timing.driver:.1f} s CPU driver + "
                    f"{timing.workers:.1f} s CPU workers, {timing.wall:.1f} s wall "
                    f"(load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        difference = same_dataset(Path(work) / "base-0", Path(work) / "new-0") if args.same_dataset else ""
    rates = {
        side: tuple(
            images / statistics.median(getattr(t, name) for t in runs) for name in ("cpu", "wall", "critical_path")
        )
        for side, runs in times.items()
    }
    print(f"{images} files in {args.photos}")
    for side, (per_cpu, per_wall, per_path) in rates.items():
        print(
            f"{side:<5}(--workers {sides[side][1]}) {per_cpu:7.2f} images per CPU-second {per_wall:7.2f} per "
            f"wall-second {per_path:7.2f} per critical-path second"
        )
    ratio = [new / base for new, base in zip(rates["new"], rates["base"], strict=True)]
    print(f"ratio new / base: {ratio[0]:.2f}x (CPU), {ratio[1]:.2f}x (wall), {ratio[2]:.2f}x (critical path)")
    if args.same_dataset:
        print(f"same dataset: {'no, ' + difference + ' differs' if difference else 'yes'}")


if __name__ == "__main__":
    main()
