"""Where a `build` goes, step by step: wall time, the driver's CPU and the worker processes' CPU of each step.

    .venv/bin/python benchmarks/curation_steps.py [--photos PHOTOS] [--workers 2] [--rewrite OUT_DIR]

Runs the steps of `build_dataset` one by one (`open_run`, then `run_stage` per step, into a fresh OUT_DIR with
`resume=False`, no progress bars) in this process, and prints, per step: its wall seconds, this process's CPU
seconds, and the CPU seconds of its worker processes (psutil, summed over the children alive around the step;
the local engine keeps one pool for the run, so none is missed). "start" is `open_run`: the workers import the
toolkit and build the face models. A step's wall time close to driver CPU + workers CPU / workers means the
workers were busy; the driver's CPU with idle workers is what `--workers N` cannot divide.

`--rewrite OUT_DIR`: a finished build of PHOTOS_DIR into OUT_DIR; its summary.json is removed and `write` alone runs
again (every other step is reused, untimed): to compare two checkouts' `write` on the same work folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # as `dynamicid-curate` sets it

import psutil


def driver_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workers_cpu() -> float:
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    # Imported here: spawned workers import this file again as `__mp_main__`, and must not import the pipeline.
    from dynamicid.curation.config import CurationConfig
    from dynamicid.curation.pipeline import STAGES, open_run, run_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/faces/identities"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rewrite", type=Path, help="time only `write` again, on this finished build's OUT_DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        rows = []
        start = (time.perf_counter(), driver_cpu(), workers_cpu())
        config = CurationConfig(workers=args.workers)
        out_dir = args.rewrite or Path(out) / "dataset"
        run = open_run(args.photos, out_dir, config, resume=args.rewrite is not None, progress=False)
        try:
            if args.rewrite:
                for step in STAGES[:-1]:
                    run_stage(run, step)
                (out_dir / "summary.json").unlink()
            else:
                rows.append(("start", start, (time.perf_counter(), driver_cpu(), workers_cpu())))
            for step in STAGES[-1:] if args.rewrite else STAGES:
                before = (time.perf_counter(), driver_cpu(), workers_cpu())
                run_stage(run, step)
                rows.append((step, before, (time.perf_counter(), driver_cpu(), workers_cpu())))
        finally:
            run.engine.close()
    print(f"{args.photos}, --workers {args.workers}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':<10}{'wall s':>9}{'driver CPU s':>14}{'workers CPU s':>15}")
    for step, before, after in rows:
        wall, driver, workers = (a - b for a, b in zip(after, before, strict=True))
        print(f"{step:<10}{wall:9.2f}{driver:14.2f}{workers:15.2f}")
    wall, driver, workers = (a - b for a, b in zip(rows[-1][2], rows[0][1], strict=True))
    print(f"{'total':<10}{wall:9.2f}{driver:14.2f}{workers:15.2f}")


if __name__ == "__main__":
    main()
