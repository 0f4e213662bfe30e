"""Upscale figures on real photos: what `--max-upscale` and `--crop-size` keep.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curation_upscale.py [--photos ../shared/data/faces/identities]

Builds PHOTOS_DIR (one folder per person) with several crop sizes and upscale limits, rerunning into one output
folder so the face models run once, and prints markdown tables: the share of photos each setting keeps and the
kept crops' upscale histogram.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dynamicid.curation import build_dataset
from dynamicid.curation.inspect_dataset import UPSCALE_BINS, upscale_histogram

SETTINGS = (
    ("512, no limit (before)", {"max_upscale": 1e6}),
    ("512, --max-upscale 1 (never enlarged)", {"max_upscale": 1.0}),
    ("512, --max-upscale 2 (default)", {}),
    ("256, --max-upscale 2", {"crop_size": 256}),
    ("1024, --max-upscale 2", {"crop_size": 1024}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/faces/identities"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="upscale-")) / "out"
    kept_lines, histogram_lines = [], []
    for name, settings in SETTINGS:
        summary = build_dataset(args.photos, out, face_backend="embedded", progress=False, **settings)
        upscale = pq.read_table(out / "data", columns=["quality"]).column("quality").to_pylist()
        values = np.array([q["upscale"] for q in upscale])
        too_small = summary["rejected_by_reason"].get("too_small", 0)
        kept_lines.append(
            f"| {name} | {summary['kept']} / {summary['scanned']} ({summary['kept'] / summary['scanned']:.1%}) | "
            f"{too_small} | {summary['identities']} | {np.median(values):.2f} | {np.percentile(values, 90):.2f} | "
            f"{(values > 1).mean():.1%} | {(values > 2).mean():.1%} |"
        )
        histogram_lines.append(f"| {name} | " + " | ".join(str(n) for n in upscale_histogram(out).values()) + " |")
    print(f"photos: {args.photos}\n")
    print("| crop size, limit | kept / scanned | too_small | identities | median upscale | p90 | > 1x | > 2x |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(kept_lines))
    print("\n| crop size, limit | " + " | ".join(UPSCALE_BINS) + " |")
    print("|---|" + "---|" * len(UPSCALE_BINS))
    print("\n".join(histogram_lines))


if __name__ == "__main__":
    main()
