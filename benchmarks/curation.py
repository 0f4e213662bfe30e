"""Curation figures: end-to-end throughput on real photos, and dedupe/grouping cost on synthetic data at scale.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/curation.py [--sizes 10000,100000,1000000]
        [--photos ../shared/data/faces/identities] [--skip-end-to-end]

Prints one line per figure. Thread counts are pinned to one before numpy loads, so the synthetic figures are
for one core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dynamicid.curation.dedupe import near_duplicate_groups  # noqa: E402
from dynamicid.curation.neighbors import similar_components  # noqa: E402

PER_IDENTITY = 30  # synthetic photos per identity
DIM = 128  # dlib embedding size
SAME_PERSON_COS = 1 - 0.44**2 / 2  # the embedded backend's 0.44 Euclidean threshold as a cosine similarity
DUPLICATE_COS = 1 - 0.11**2 / 2  # 0.25 x that threshold


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit embeddings around n / PER_IDENTITY identity centres, random 64-bit hashes, identity labels."""
    rng = np.random.default_rng(seed)
    ids = max(1, n // PER_IDENTITY)
    centres = rng.normal(size=(ids, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(n) % ids
    x = centres[labels] + rng.normal(scale=0.025, size=(n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    mirrors = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    return x, hashes, mirrors, labels


def measure(func):
    tracemalloc.start()
    start = time.perf_counter()
    result = func()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def bench_synthetic(n: int) -> None:
    x, hashes, mirrors, labels = synthetic(n)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))

    def per_identity_dedupe() -> int:
        groups = 0
        for k in range(len(bounds) - 1):
            idx = order[bounds[k] : bounds[k + 1]]
            rows = [
                {"face": {"phash": int(hashes[i]), "phash_mirror": int(mirrors[i]), "embedding": x[i]}} for i in idx
            ]
            groups += int(near_duplicate_groups(rows, 4, DUPLICATE_COS).max()) + 1
        return groups

    def exact_bytes() -> int:
        seen: dict[str, int] = {}
        for i in range(n):
            seen.setdefault(hashlib.sha256(hashes[i].tobytes()).hexdigest(), i)
        return len(seen)

    def global_grouping() -> int:
        return int(similar_components(x, SAME_PERSON_COS).max()) + 1

    groups, seconds, peak = measure(per_identity_dedupe)
    print(f"dedupe per identity      n={n:>8}  {seconds:7.2f} s  peak {peak:7.1f} MiB  groups={groups}")
    uniques, seconds, peak = measure(exact_bytes)
    print(f"exact-bytes dedupe       n={n:>8}  {seconds:7.2f} s  peak {peak:7.1f} MiB  unique={uniques}")
    found, seconds, peak = measure(global_grouping)
    truth = labels.max() + 1
    print(
        f"--cluster grouping       n={n:>8}  {seconds:7.2f} s  peak {peak:7.1f} MiB  "
        f"identities found={found} (true {truth})"
    )


def bench_end_to_end(photos: Path) -> None:
    from dynamicid.curation import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = build_dataset(photos, Path(tmp) / "out", face_backend="embedded", progress=False)
        total = time.perf_counter() - start
    stages = summary["stages"]
    print(
        f"end-to-end {photos}: {summary['scanned']} files, {summary['kept']} kept, {total:.1f} s, "
        f"{summary['scanned'] / total:.2f} images/s on 1 worker"
    )
    for stage, stats in stages.items():
        print(f"  {stage:<9} {stats['seconds']:7.2f} s  {100 * stats['seconds'] / total:5.1f} %")
    print("  summary:", json.dumps(summary["rejected_by_reason"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument(
        "--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/faces/identities"
    )
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        bench_synthetic(n)
    if not args.skip_end_to_end:
        bench_end_to_end(args.photos)


if __name__ == "__main__":
    main()
