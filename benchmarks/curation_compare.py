"""End-to-end `dynamicid-curate build` of two checkouts side by side: interleaved runs, one core each, CPU and wall.

    .venv/bin/python benchmarks/curation_compare.py --base "" --new ../pp-faces [--photos PHOTOS] [--repeats 2]

`--base` and `--new` are PYTHONPATH values ("" is the installed package) so the same interpreter runs two versions
of the toolkit. Runs alternate base, new, base, new, ... each into a fresh output folder with `--workers 1
--no-resume`, pinned to one core (`taskset`). Printed per run: user+sys CPU seconds and wall seconds (children
included); then each side's median images per CPU-second and per wall-second, and the ratios new / base. On a
shared machine the CPU figure is the fair one: wall time also counts the other people's load.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "identities"


def run_build(pythonpath: str, photos: Path, out: Path, core: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one `dynamicid-curate build`."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = ["taskset", "-c", str(core), sys.executable, "-m", "dynamicid.curation.cli", "build", str(photos)]
    command += [str(out), "--workers", "1", "--no-resume", "--no-progress", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(
            f"benchmarks/curation_compare.py: build with PYTHONPATH={pythonpath!r} failed:\n{result.stderr[-2000:]}"
        )
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="PYTHONPATH of the reference version ('' = installed)")
    parser.add_argument("--new", required=True, help="PYTHONPATH of the version to compare")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="PHOTOS_DIR of the build")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side")
    parser.add_argument("--core", type=int, default=sorted(os.sched_getaffinity(0))[-1], help="CPU to pin to")
    args = parser.parse_args()
    if not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    images = sum(1 for p in args.photos.rglob("*") if p.is_file())
    times: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="curation-compare-") as work:
        for repeat in range(args.repeats):
            for side, pythonpath in (("base", args.base), ("new", args.new)):
                cpu, wall = run_build(pythonpath, args.photos, Path(work) / f"{side}-{repeat}", args.core)
                times[side].append((cpu, wall))
                load = os.getloadavg()[0]
                print(f"{side} run {repeat + 1}: {cpu:.1f} s CPU, {wall:.1f} s wall (load average {load:.1f})")
    rates = {
        side: (images / statistics.median(c for c, _ in runs), images / statistics.median(w for _, w in runs))
        for side, runs in times.items()
    }
    print(f"{images} files in {args.photos}, --workers 1, one core")
    for side, (per_cpu, per_wall) in rates.items():
        print(f"{side:<5}{per_cpu:>7.2f} images per CPU-second {per_wall:>7.2f} images per wall-second")
    print(
        f"ratio new / base: {rates['new'][0] / rates['base'][0]:.2f}x (CPU), {rates['new'][1] / rates['base'][1]:.2f}x "
        "(wall)"
    )


if __name__ == "__main__":
    main()
