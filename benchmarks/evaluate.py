"""Scoring throughput of `dynamicid-eval score` (face figures, embedded backend) on the real photos, one CPU core.

    .venv/bin/python benchmarks/evaluate.py [--photos ../shared/data/faces] [--images 40] [--repeats 2]

The photos stand in for generated images: each identities/ photo is a one-person image whose reference is
another photo of the same person, and the two-person group photos are scored with references of both people.
Each repeat runs, interleaved, (a) the face layer alone (`FaceAnalyzer.analyze` on every image) and (b) a full
`measure()` with a fresh `FaceScorer` (references analysed again, matching, figures, bootstrap summary).
Figures are process CPU seconds (the machine is shared; wall time swings with other people's load).
CLIP-T is not included: no real CLIP model is available here.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import cv2
import torch

from dynamicid.evaluate import Case, FaceScorer, measure
from dynamicid.faces import FaceAnalyzer, load_image
from dynamicid.infer.manifest import ManifestPerson

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def benchmark_cases(root: Path, count: int) -> list[Case]:
    """One-person cases (photo k of an identity, photo 0 as reference) and the two-person group photos."""
    identities = root / "identities"
    singles = []
    for folder in sorted(p for p in identities.iterdir() if p.is_dir()):
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        singles += [(photo, photos[0]) for photo in photos[1:]]
    step = max(1, len(singles) // count)
    cases = [
        Case(f"{photo.parent.name}-{photo.stem}", photo, "a photo of a person", (ManifestPerson((reference,)),))
        for photo, reference in singles[::step][:count]
    ]
    pairs = {
        "two_people.jpg": ("obama/obama2.jpg", "biden/biden2.jpg"),
        "kit_with_rose.jpg": ("kit_harington/john1.jpeg", "rose_leslie/" + _first(identities / "rose_leslie")),
    }
    for name, references in pairs.items():
        people = tuple(ManifestPerson((identities / r,)) for r in references)
        cases.append(Case(name, root / "group_photos" / name, "two people", people))
    return cases


def _first(folder: Path) -> str:
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="the shared faces folder")
    parser.add_argument("--images", type=int, default=40, help="one-person images (plus the two group photos)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    args = parser.parse_args()

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    analyzer = FaceAnalyzer("embedded")
    cases = benchmark_cases(args.photos, args.images)
    analyzer.analyze(load_image(cases[0].image))  # model start-up outside the timings

    layer, scoring = [], []
    for _ in range(args.repeats):
        start = time.process_time()
        for case in cases:
            analyzer.analyze(load_image(case.image))
        layer.append(time.process_time() - start)
        start = time.process_time()
        scores = measure(cases, FaceScorer(analyzer))
        scoring.append(time.process_time() - start)
    references = len({r for case in cases for p in case.people for r in p.references})
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load {os.getloadavg()}")
    print(f"{len(cases)} images ({len(scores.per_person)} people, {references} distinct reference photos)")
    for name, times in (("face layer alone", layer), ("dynamicid-eval score", scoring)):
        best = min(times)
        print(
            f"{name:<22} {len(cases) / best:6.2f} images/s  (CPU s per repeat: {', '.join(f'{t:.1f}' for t in times)})"
        )
    ratios = sorted(s / f for s, f in zip(scoring, layer, strict=True))
    print(f"score / face layer: {ratios[len(ratios) // 2]:.2f}x (median of the interleaved pairs)")


if __name__ == "__main__":
    main()
