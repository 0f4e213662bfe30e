"""Batched against one-image face analysis, side by side in one run.

    .venv/bin/python benchmarks/faces_batch.py [--backends embedded,insightface] [--device cpu|cuda|auto]
        [--batches 1,16,64] [--limit 96] [--pack PACK_DIR]

Per backend (insightface only with --pack) and batch size: photos per second of detect and of describe
(`FaceAnalyzer.detect_batch` / `describe_batch` on that many decoded photos at a time), and the describe ratio to
batch 1. On the CPU the figures are per CPU-second (process time, pinned to one core: other people's load on a
shared machine does not count); on CUDA they are wall-clock, with the GPU memory per batch size: torch's peak
allocation (`torch.cuda.max_memory_allocated`, the networks run in torch) and this process's use as nvidia-smi
sees it (ONNX Runtime's CUDA arena, which only grows, and the CUDA contexts). Photos: identities/ and
group_photos/ of ../shared/data/faces, decoded once beforehand (decoding is not timed).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dynamicid.faces import FaceAnalyzer, load_array

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"


def photos(root: Path, limit: int) -> list:
    paths = sorted(p for folder in ("identities", "group_photos") for p in (root / folder).rglob("*.*"))
    paths = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    step = max(1, len(paths) // limit)
    return [load_array(p) for p in paths[::step][:limit]]


def process_gpu_mib() -> str:
    """This process's GPU memory as nvidia-smi sees it (MiB), "n/a" without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return "n/a"
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    lines = subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()
    used = [int(line.split(",")[1]) for line in lines if line.split(",")[0].strip() == str(os.getpid())]
    return str(sum(used)) if used else "0"


def torch_peak_mib() -> str:
    """torch's peak CUDA allocation since the last reset (MiB), "-" where torch runs nothing on CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return "-"
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return f"{peak:.0f}"


def run(analyzer: FaceAnalyzer, images: list, batches: list[int]) -> None:
    cuda = analyzer.device == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    detected = analyzer.detect_batch(images)
    analyzer.describe_batch(images[:2], detected[:2])  # warm-up: sessions, CUDA kernels
    faces = sum(map(len, detected))
    print(
        f"{analyzer.backend} on {'cuda' if cuda else 'cpu (1 core, per CPU-second)'}; {platform.machine()} "
        f"{os.cpu_count()}-CPU host, load average {os.getloadavg()[0]:.1f}; {len(images)} photos, {faces} faces"
    )
    memory = f"{'torch peak MiB':>16}{'process MiB':>13}" if cuda else ""
    print(f"{'batch':>6}{'detect photos/s':>17}{'describe photos/s':>19}{'describe faces/s':>18}{'ratio':>7}{memory}")
    base = None
    for batch in batches:
        torch_peak_mib()  # resets the peak
        start = clock()
        for i in range(0, len(images), batch):
            analyzer.detect_batch(images[i : i + batch])
        detect_s = clock() - start
        start = clock()
        for i in range(0, len(images), batch):
            analyzer.describe_batch(images[i : i + batch], detected[i : i + batch])
        describe_s = clock() - start
        base = base or describe_s
        memory = f"{torch_peak_mib():>16}{process_gpu_mib():>13}" if cuda else ""
        print(
            f"{batch:>6}{len(images) / detect_s:>17.1f}{len(images) / describe_s:>19.1f}"
            f"{faces / describe_s:>18.1f}{base / describe_s:>6.2f}x{memory}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="embedded,insightface", help="comma-separated; insightface needs --pack")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--limit", type=int, default=96)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--pack", type=Path, help="insightface: the unzipped pack folder (e.g. buffalo_l)")
    args = parser.parse_args()
    analyzers = []
    for backend in args.backends.split(","):
        if backend == "insightface" and args.pack is None:
            print("insightface: skipped (no --pack PACK_DIR: a local pack such as buffalo_l)")
            continue
        options = {"insightface_root": str(args.pack)} if backend == "insightface" else {}
        try:
            analyzers.append(FaceAnalyzer(backend, device=args.device, **options))
        except (ValueError, FileNotFoundError) as error:
            parser.exit(2, f"benchmarks/faces_batch.py: {str(error).splitlines()[0]}\n")
    if all(analyzer.device == "cpu" for analyzer in analyzers):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    images = photos(args.photos, args.limit)
    for analyzer in analyzers:
        run(analyzer, images, [int(b) for b in args.batches.split(",")])


if __name__ == "__main__":
    main()
