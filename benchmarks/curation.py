"""Curation figures: end-to-end throughput on real photos, and dedupe/grouping cost on synthetic data at scale.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/curation.py [--sizes 10000,100000,1000000]
        [--photos ../shared/data/faces/identities] [--skip-end-to-end] [--png 60]

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
from dynamicid.curation.grouping import average_linkage  # noqa: E402
from dynamicid.curation.imagehash import HASH_WORDS  # noqa: E402
from dynamicid.curation.neighbors import components, similar_pairs_indexed  # noqa: E402

PER_IDENTITY = 30  # synthetic photos per identity
DIM = 128  # dlib embedding size
SAME_PERSON_COS = 1 - 0.44**2 / 2  # the embedded backend's 0.44 Euclidean threshold as a cosine similarity
DUPLICATE_COS = 1 - 0.22**2 / 2  # 0.5 x that threshold (curation/config.py)


def synthetic(
    n: int, seed: int = 0, lookalike: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit embeddings around n / PER_IDENTITY identity centres, random 256-bit hashes, identity labels.

    With `lookalike`, every second identity's centre lies that Euclidean distance from the one before: closer than
    the same-person threshold's chaining reach, so single linkage merges the two people."""
    rng = np.random.default_rng(seed)
    ids = max(1, n // PER_IDENTITY)
    centres = rng.normal(size=(ids, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if lookalike is not None:
        away = rng.normal(size=(ids, DIM)).astype(np.float32)
        away -= (away * centres).sum(1, keepdims=True) * centres
        away /= np.linalg.norm(away, axis=1, keepdims=True)
        angle = 2 * np.arcsin(lookalike / 2)
        pairs = ids // 2
        centres[1::2][:pairs] = np.cos(angle) * centres[0::2][:pairs] + np.sin(angle) * away[0::2][:pairs]
    labels = np.arange(n) % ids
    x = centres[labels] + rng.normal(scale=0.025, size=(n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=(n, HASH_WORDS), dtype=np.int64)
    mirrors = rng.integers(-(2**63), 2**63 - 1, size=(n, HASH_WORDS), dtype=np.int64)
    return x, hashes, mirrors, labels


def measure(func):
    """Result, process CPU seconds (less sensitive than wall time to other jobs on the machine), peak MiB."""
    tracemalloc.start()
    start = time.process_time()
    result = func()
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def pair_precision_recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Of the pairs put in one group, the share that are one person; of one person's pairs, the share grouped."""

    def pairs(labels: np.ndarray) -> int:
        counts = np.unique(labels, return_counts=True)[1].astype(np.int64)
        return int((counts * (counts - 1) // 2).sum())

    both = pairs(found.astype(np.int64) * (int(truth.max()) + 1) + truth)
    return both / max(pairs(found), 1), both / max(pairs(truth), 1)


def bench_grouping(n: int, lookalike: float | None) -> None:
    """--cluster grouping (average linkage) beside single linkage (components of the same candidate pairs)."""
    x, _, _, labels = synthetic(n, lookalike=lookalike)
    case = f"look-alikes {lookalike}" if lookalike is not None else "separate people"
    for name, group in (
        ("average linkage", lambda: average_linkage(x, SAME_PERSON_COS)),
        ("single linkage ", lambda: components(n, similar_pairs_indexed(x, SAME_PERSON_COS)[0])),
    ):
        found, seconds, peak = measure(group)
        precision, recall = pair_precision_recall(found, labels)
        print(
            f"--cluster {name} n={n:>8} {case:<18} {seconds:7.2f} s cpu  peak {peak:7.1f} MiB  "
            f"groups={found.max() + 1} (true {labels.max() + 1})  pair precision {precision:.3f} recall {recall:.3f}"
        )


def bench_synthetic(n: int) -> None:
    x, hashes, mirrors, labels = synthetic(n)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))

    def per_identity_dedupe() -> int:
        groups = 0
        for k in range(len(bounds) - 1):
            idx = order[bounds[k] : bounds[k + 1]]
            rows = [{"face": {"phash": hashes[i], "phash_mirror": mirrors[i], "embedding": x[i]}} for i in idx]
            groups += int(near_duplicate_groups(rows, 20, DUPLICATE_COS).max()) + 1
        return groups

    def exact_bytes() -> int:
        seen: dict[str, int] = {}
        for i in range(n):
            seen.setdefault(hashlib.sha256(hashes[i].tobytes()).hexdigest(), i)
        return len(seen)

    groups, seconds, peak = measure(per_identity_dedupe)
    print(f"dedupe per identity      n={n:>8}  {seconds:7.2f} s cpu  peak {peak:7.1f} MiB  groups={groups}")
    uniques, seconds, peak = measure(exact_bytes)
    print(f"exact-bytes dedupe       n={n:>8}  {seconds:7.2f} s cpu  peak {peak:7.1f} MiB  unique={uniques}")


def bench_end_to_end(photos: Path) -> None:
    """One in-process build (`--workers 1`): wall and process CPU seconds, per step (wall) and in all."""
    from dynamicid.curation import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        summary = build_dataset(photos, Path(tmp) / "out", face_backend="embedded", progress=False)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    stages = summary["stages"]
    print(
        f"end-to-end {photos}: {summary['scanned']} files, {summary['kept']} kept, {total:.1f} s wall, {cpu:.1f} s "
        f"CPU: {summary['scanned'] / total:.2f} images/s, {summary['scanned'] / cpu:.2f} images per CPU-second on "
        f"1 worker (load average {os.getloadavg()[0]:.1f}; CPU time counts less of other people's load than wall)"
    )
    for stage, stats in stages.items():
        print(f"  {stage:<9} {stats['seconds']:7.2f} s  {100 * stats['seconds'] / total:5.1f} %")
    print("  summary:", json.dumps(summary["rejected_by_reason"]))


def bench_png(photos: Path, count: int) -> None:
    """The crop store's PNG encoder (`png_bytes`) against Pillow's level 3 and its run-length setting (before)."""
    import io
    import zlib

    from PIL import Image

    from dynamicid.curation.analysis import png_bytes
    from dynamicid.faces import FaceAnalyzer, ffhq_align, load_image

    def pillow(**settings):
        def encode(crop: Image.Image) -> bytes:
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG", **settings)
            return buffer.getvalue()

        return encode

    analyzer, crops = FaceAnalyzer("embedded"), []
    for path in sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:count]:
        image = load_image(path)
        crops += [ffhq_align(image, face)[0] for face in analyzer.detect(image)[:1]]
    encoders = {
        "Pillow compress_level=3": pillow(compress_level=3),
        "Pillow level 1, Z_RLE": pillow(compress_level=1, compress_type=zlib.Z_RLE),
        "png_bytes (OpenCV, up filter, Z_RLE)": png_bytes,
    }
    for name, encode in encoders.items():
        start = time.process_time()
        encoded = [encode(crop) for crop in crops]
        seconds = time.process_time() - start
        same = all(
            np.array_equal(np.asarray(Image.open(io.BytesIO(b))), np.asarray(c))
            for b, c in zip(encoded, crops, strict=True)
        )
        print(
            f"PNG {name:<38} {1000 * seconds / len(crops):6.1f} ms cpu per 512 crop  "
            f"{sum(map(len, encoded)) / len(encoded) / 1024:6.1f} KiB  lossless={same}  ({len(crops)} crops)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument(
        "--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/faces/identities"
    )
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--png", type=int, default=0, help="also time the crops' PNG encoding on this many photos")
    parser.add_argument("--lookalike", type=float, default=0.3, help="centre distance of the look-alike case")
    args = parser.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        bench_synthetic(n)
        bench_grouping(n, None)
        bench_grouping(n, args.lookalike)
    if args.png:
        bench_png(args.photos, args.png)
    if not args.skip_end_to_end:
        bench_end_to_end(args.photos)


if __name__ == "__main__":
    main()
